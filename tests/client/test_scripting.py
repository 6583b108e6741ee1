"""Issue 13 through the real entry point against real servers: listen --exec hooks, ask, replies, search.

One storing server serves the whole module (each test uses users of its own), plus an ephemeral one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcli import protocol as p
from chatcli.client import render
from tests.support.flutter_app import decode_legacy_message, encode_legacy_send
from tests.support.processes import (
    Chatcli,
    RunningServer,
    StartServer,
    kill_leftovers,
    start_server_process,
    wait_until,
)
from tests.support.wsclients import legacy, native, recv_frame, send_native


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server_process(["--db", str(tmp_path_factory.mktemp("scripting") / "chat.db")])
    yield server
    kill_leftovers([server.proc])


@pytest.fixture(scope="module")
def ephemeral() -> Iterator[RunningServer]:
    server = start_server_process(["--ephemeral"])
    yield server
    kill_leftovers([server.proc])


def _user(name: str) -> str:
    """A user id of this test alone: the module's server is shared."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _send_all(server: RunningServer, sender: str, to: str, texts: list[str]) -> list[int]:
    ws, _ = native(server.ws_url, sender, headers={p.RECEIVE_HEADER: "none"})
    ids = []
    for text in texts:
        ack = send_native(ws, to, text)
        assert ack.msg_id is not None
        ids.append(ack.msg_id)
    ws.close()
    return ids


def _send_reply(ws: object, to: str, text: str, reply_to: int) -> p.Ack:
    ws.send(p.encode(p.Send(uuid.uuid4().hex, to, text, reply_to=reply_to)))  # type: ignore[attr-defined]
    ack = recv_frame(ws)  # type: ignore[arg-type]
    assert isinstance(ack, p.Ack)
    return ack


# -- listen --exec ---------------------------------------------------------------------------------

#: Logs each run, fails the first attempt of every 4th message (a marker file remembers), is slow enough
#: that a kill -9 lands mid-stream.
FLAKY_HOOK = """
read line
echo "$CHATCLI_ID $CHATCLI_ATTEMPT" >> "$LOG"
sleep 0.05
if [ $((CHATCLI_ID % 4)) -eq 0 ] && [ ! -e "$MARKS/$CHATCLI_ID" ]; then : > "$MARKS/$CHATCLI_ID"; exit 1; fi
printf '%s\\n' "$line" | grep -q "\\"id\\": $CHATCLI_ID" || exit 9
"""


def test_hooks_run_every_message_at_least_once_through_failures_and_kill_9(
        chatcli: Chatcli, shared: RunningServer, tmp_path: Path) -> None:
    me, peer = _user("hooked"), _user("feeder")
    log, marks, cursor = tmp_path / "runs.log", tmp_path / "marks", tmp_path / "cursor"
    marks.mkdir()
    env = {"LOG": str(log), "MARKS": str(marks)}
    ids = _send_all(shared, peer, me, [f"m{n}" for n in range(24)])
    args = ("listen", me, "--url", shared.ws_url, "--cursor-file", str(cursor), "--exec", FLAKY_HOOK)
    first = chatcli(*args, env=env)
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 8, what="8 hook runs")
    os.kill(first.proc.pid, signal.SIGKILL)  # mid-stream: hooks done, one maybe running, most not started
    first.wait()
    ids += _send_all(shared, peer, me, [f"late{n}" for n in range(6)])  # arrive while nobody listens
    second = chatcli(*args, env=env)
    wait_until(lambda: {json.loads(line)["id"] for line in second.out} >= set(ids[-6:]), timeout=20,
               what="the late messages handled")
    wait_until(lambda: cursor.read_text().split()[0] == str(ids[-1]), what="the cursor at the last message")
    second.proc.send_signal(signal.SIGINT)
    second.wait()
    runs = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    ran = {msg_id for msg_id, _ in runs}
    assert ran == set(ids)  # every message's hook ran, none skipped
    handled = [json.loads(line)["id"] for line in first.out + second.out]
    assert set(handled) == set(ids)  # each one succeeded at least once (printed on success only)
    failing = {msg_id for msg_id in ids if msg_id % 4 == 0}  # each fails once, on its first run ever
    assert {int(mark.name) for mark in marks.iterdir()} == failing
    assert {msg_id for msg_id, attempt in runs if attempt == 2} <= failing
    reported = [line for line in first.err + second.err if "hook failed for message" in line]
    # Each failure is reported and retried; the kill may land between a hook's exit and its report.
    assert len(failing) - 1 <= len(reported) <= len(failing)
    assert "exit status 1" in reported[0] and "retrying in" in reported[0]
    assert len(runs) >= len(ids) + len(reported)  # the retries ran
    assert "Traceback" not in "\n".join(first.err + second.err)


def test_dead_letters_timeouts_and_per_sender_order_with_parallel_hooks(
        chatcli: Chatcli, shared: RunningServer, tmp_path: Path) -> None:
    me, ann, ben = _user("worker"), _user("ann"), _user("ben")
    dead, log = tmp_path / "dead.jsonl", tmp_path / "order.log"
    hook = ('read line; case "$CHATCLI_TEXT" in poison) exit 3;; hang) sleep 30;; esac; '
            'sleep 0.0$((CHATCLI_ID % 7)); echo "$CHATCLI_FROM $CHATCLI_TEXT" >> "$LOG"')
    ann_ids = _send_all(shared, ann, me, ["a0", "poison", "a1", "a2", "hang", "a3"])
    ben_ids = _send_all(shared, ben, me, ["b0", "b1", "b2", "b3"])
    worker = chatcli("listen", me, "--url", shared.ws_url, "--exec", hook, "--parallel", "4", "--max-attempts", "2",
                     "--dead-letter", str(dead), "--exec-timeout", "0.5", "--count", "10", env={"LOG": str(log)})
    assert worker.wait(timeout=30) == 0, worker.err
    lines = log.read_text().splitlines()
    assert [line.split()[1] for line in lines if line.startswith(ann)] == ["a0", "a1", "a2", "a3"]
    assert [line.split()[1] for line in lines if line.startswith(ben)] == ["b0", "b1", "b2", "b3"]
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [(d["id"], d["text"], d["attempts"]) for d in letters] == [(ann_ids[1], "poison", 2),
                                                                       (ann_ids[4], "hang", 2)]
    assert letters[0]["error"] == "exit status 3" and "killed" in letters[1]["error"]
    assert set(letters[0]) == {"id", "from", "to", "text", "ts", "reply_to", "attempts", "error"}
    printed = {json.loads(line)["id"] for line in worker.out}  # stdout: only the messages whose hook succeeded
    assert printed == set(ann_ids + ben_ids) - {ann_ids[1], ann_ids[4]}
    assert sum("written to" in line for line in worker.err) == 2


def test_hook_options_are_checked_before_connecting(chatcli: Chatcli, tmp_path: Path) -> None:
    for args, says in [(("--exec", "true", "--", "true"), "give the hook once"),
                       (("--", "/no/such/program"), "not an executable program"),
                       (("--exec", "true", "--max-attempts", "2"), "go together"),
                       (("--max-attempts", "2", "--dead-letter", str(tmp_path / "d")), "need a hook"),
                       (("--exec", "true", "--max-attempts", "1", "--dead-letter", str(tmp_path)), "dead-letter")]:
        run = chatcli("listen", "bob", "--url", "ws://127.0.0.1:9", *args)
        assert run.wait() == 2, (args, run.err)
        assert says in "\n".join(run.err), (args, run.err)


# -- ask --------------------------------------------------------------------------------------------


def _question_for(ws: object) -> p.Message:
    while True:
        frame = recv_frame(ws, timeout=10)  # type: ignore[arg-type]
        if isinstance(frame, p.Message):
            return frame


def test_ask_is_answered_by_a_reply_and_not_by_another_message(chatcli: Chatcli, shared: RunningServer) -> None:
    me, peer = _user("asker"), _user("oracle")
    oracle, _ = native(shared.ws_url, peer)
    asking = chatcli("ask", me, peer, "Deploy 4.2?", "--url", shared.ws_url, "--json")
    question = _question_for(oracle)
    assert question.text == "Deploy 4.2?" and question.sender == me
    send_native(oracle, me, "unrelated chatter")  # not a reply: ask keeps waiting, and says why
    asking.wait_stderr(f"{peer} wrote a message that is not a reply to the question; still waiting for a reply "
                       f"(/reply in the chat, or send --reply-to {question.id}; ask --any takes any message)")
    _send_reply(oracle, me, "go ahead", question.id)
    assert asking.wait() == 0, asking.err
    answer = json.loads(asking.out[0])
    assert (answer["text"], answer["reply_to"], answer["from"]) == ("go ahead", question.id, peer)


def test_ask_timing_out_counts_the_messages_that_did_not_reply(chatcli: Chatcli, shared: RunningServer) -> None:
    me, peer = _user("asker"), _user("oracle")
    oracle, _ = native(shared.ws_url, peer)
    asking = chatcli("ask", me, peer, "Deploy 4.3?", "--timeout", "3", "--url", shared.ws_url)
    _question_for(oracle)
    send_native(oracle, me, "yes")  # answered, but not as a reply
    send_native(oracle, me, "I said yes")
    assert asking.wait() == 6
    assert asking.err[-1] == (f"chatcli: no answer from {peer} within 3 s (2 message(s) from {peer} did not reply "
                              "to the question)")


def test_ask_any_is_answered_by_a_seed_apps_plain_message(chatcli: Chatcli, shared: RunningServer) -> None:
    me, peer = _user("asker"), _user("seed")
    app = legacy(shared.ws_url, peer)
    asking = chatcli("ask", me, peer, "lunch?", "--any", "--url", shared.ws_url)
    wait_until(lambda: decode_legacy_message(str(app.recv(timeout=10))) == (me, "lunch?"), what="the question")
    app.send(encode_legacy_send(me, "yes, at 1"))
    assert asking.wait() == 0, asking.err
    assert asking.out == ["yes, at 1"]


def test_ask_unanswered_times_out_with_6(chatcli: Chatcli, shared: RunningServer) -> None:
    asking = chatcli("ask", _user("asker"), _user("nobody"), "anyone?", "--timeout", "1", "--url", shared.ws_url)
    assert asking.wait() == 6
    assert "no answer from" in asking.err[-1] and asking.out == []


def test_ask_with_the_server_down_all_along_exits_3_not_6(chatcli: Chatcli) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    asking = chatcli("ask", "asker", "nobody", "anyone?", "--timeout", "1", "--url", f"ws://127.0.0.1:{port}")
    assert asking.wait() == 3
    assert f"could not connect to ws://127.0.0.1:{port} in 1 s" in asking.err[-1] and asking.out == []


@pytest.mark.parametrize(("answer", "status", "printed"), [("Yes!", 0, []), ("approve", 0, []), ("n", 7, []),
                                                            ("deny", 7, []), ("maybe later", 8, ["maybe later"])])
def test_ask_yes_no_statuses(chatcli: Chatcli, shared: RunningServer, answer: str, status: int,
                             printed: list[str]) -> None:
    me, peer = _user("deploybot"), _user("alice")
    alice, _ = native(shared.ws_url, peer)
    asking = chatcli("ask", me, peer, "Deploy 4.2 to prod?", "--yes-no", "--url", shared.ws_url)
    _send_reply(alice, me, answer, _question_for(alice).id)
    assert asking.wait() == status, asking.err
    assert asking.out == printed


# -- replies ----------------------------------------------------------------------------------------


def test_replies_are_checked_per_conversation_and_carried_to_every_client(
        chatcli: Chatcli, shared: RunningServer) -> None:
    alice, bob, carol = _user("alice"), _user("bob"), _user("carol")
    (question,) = _send_all(shared, alice, bob, ["shall we?"])
    (elsewhere,) = _send_all(shared, carol, alice, ["hi alice"])
    app = legacy(shared.ws_url, alice)  # the seed app of alice: gets the text as before
    listener = chatcli("listen", alice, "--url", shared.ws_url, "--count", "1", "--since", str(elsewhere))
    ok = chatcli("send", bob, alice, "yes we shall", "--reply-to", str(question), "--url", shared.ws_url)
    assert ok.wait() == 0, ok.err
    assert listener.wait() == 0
    line = json.loads(listener.out[0])
    assert (line["text"], line["reply_to"]) == ("yes we shall", question)
    wait_until(lambda: decode_legacy_message(str(app.recv(timeout=10))) == (bob, "yes we shall"), what="seed app")
    for reply_to, why in [(elsewhere, "carol's conversation with alice"), (10**12, "no such message")]:
        refused = chatcli("send", bob, alice, "sneaky", "--reply-to", str(reply_to), "--url", shared.ws_url)
        assert refused.wait() == 5, why
        assert "bad-reply" in refused.err[-1] and "not in your conversation" in refused.err[-1]
    history = chatcli("history", bob, alice, "--json", "--url", shared.ws_url)
    assert history.wait() == 0
    assert [(json.loads(x)["text"], json.loads(x)["reply_to"]) for x in history.out] == [
        ("shall we?", None), ("yes we shall", question)]


def test_an_ephemeral_server_checks_replies_and_says_search_is_unavailable(
        chatcli: Chatcli, ephemeral: RunningServer) -> None:
    alice, bob = _user("alice"), _user("bob")
    ws, _ = native(ephemeral.ws_url, alice)
    listening = chatcli("listen", bob, "--url", ephemeral.ws_url, "--count", "1")
    listening.wait_stderr("listening as")
    question = send_native(ws, bob, "there?").msg_id
    assert question is not None
    ok = chatcli("send", bob, alice, "here", "--reply-to", str(question), "--url", ephemeral.ws_url)
    assert ok.wait() == 0, ok.err
    assert _question_for(ws).reply_to == question  # the reply, as alice's session gets it
    search = chatcli("search", alice, "here", "--url", ephemeral.ws_url)
    assert search.wait() == 5
    assert "does not support search" in search.err[-1]


# -- search -----------------------------------------------------------------------------------------


def test_search_sees_only_ones_own_conversations_newest_first_with_limits(
        chatcli: Chatcli, shared: RunningServer) -> None:
    alice, bob, carol = _user("alice"), _user("bob"), _user("carol")
    first = _send_all(shared, alice, bob, ["Lunch at noon?", "the deploy went fine"])
    second = _send_all(shared, bob, alice, ["lunch: yes!"])
    _send_all(shared, carol, bob, ["secret lunch with bob"])

    def search(user: str, *args: str) -> list[dict[str, object]]:
        run = chatcli("search", user, *args, "--json", "--url", shared.ws_url)
        assert run.wait() == 0, run.err
        return [json.loads(line) for line in run.out]

    assert [m["id"] for m in search(alice, "lunch")] == [second[0], first[0]]
    assert [m["text"] for m in search(carol, "lunch")] == ["secret lunch with bob"]  # never alice's
    assert [m["text"] for m in search(bob, "lunch", "--peer", carol)] == ["secret lunch with bob"]
    assert [m["text"] for m in search(bob, "lunch", "--limit", "1")] == ["secret lunch with bob"]
    assert search(alice, "lunch", "--since", "2099-01-01T00:00:00Z") == []
    assert [m["text"] for m in search(alice, "DEPLOY", "--since", "1h")] == ["the deploy went fine"]
    assert set(search(alice, "deploy")[0]) == {"id", "from", "to", "text", "ts", "reply_to"}
    bad = chatcli("search", alice, "x", "--limit", "201", "--url", shared.ws_url)
    assert bad.wait() == 2


def test_search_highlights_the_match_on_a_terminal() -> None:
    message = p.Message(7, "bob", "alice", "Deploy done, deployment log: deploy", "2026-11-27T06:00:00.000Z")
    coloured = render.search_ansi(message, "deploy", colour=True)
    assert coloured.count("\x1b[1;7m") == 2  # the whole words, any case; not "deployment"
    plain = render.search_ansi(message, "deploy", colour=False)
    assert "\x1b" not in plain and "bob → alice: Deploy done" in plain


def test_search_is_rate_limited_per_user(chatcli: Chatcli, shared: RunningServer) -> None:
    ws, _ = native(shared.ws_url, _user("curious"), headers={p.RECEIVE_HEADER: "none"})
    answers = []
    for n in range(12):  # one at a time: the history/search queue of a session is not what is tested here
        ws.send(p.encode(p.SearchRequest(f"s{n}", "anything")))
        answers.append(recv_frame(ws))
    refused = [a for a in answers if isinstance(a, p.Error)]
    assert refused and all(a.code == p.ErrorCode.RATE_LIMITED for a in refused)
    assert sum(isinstance(a, p.Search) for a in answers) == 10



def test_sigterm_stops_listen_and_kills_the_running_hook(chatcli: Chatcli, shared: RunningServer,
                                                         tmp_path: Path) -> None:
    me = _user("busy")
    pid_file = tmp_path / "hook.pid"
    _send_all(shared, _user("boss"), me, ["take your time"])
    # The hook as argv after --, no shell of ours in between (this one is the hook's own).
    worker = chatcli("listen", me, "--url", shared.ws_url, "--", "/bin/sh", "-c",
                     f"echo $$ > {pid_file}; exec sleep 30")
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the hook running")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait() == 130
    hook = int(pid_file.read_text())
    wait_until(lambda: not Path(f"/proc/{hook}").exists() or "Z" in Path(f"/proc/{hook}/stat").read_text().split()[2],
               what="the hook killed")
    assert worker.out == []  # not handled: it runs again next time


def test_with_parallel_hooks_the_cursor_waits_for_the_lowest_unfinished_message(
        chatcli: Chatcli, shared: RunningServer, tmp_path: Path) -> None:
    me, slow, quick = _user("worker"), _user("slow"), _user("quick")
    gate, cursor = tmp_path / "gate", tmp_path / "cursor"
    (held,) = _send_all(shared, slow, me, ["wait for the gate"])
    others = _send_all(shared, quick, me, ["q1", "q2", "q3"])
    hook = f'case "$CHATCLI_TEXT" in wait*) while [ ! -e {gate} ]; do sleep 0.05; done;; esac'
    worker = chatcli("listen", me, "--url", shared.ws_url, "--parallel", "2", "--cursor-file", str(cursor),
                     "--count", "4", "--exec", hook)
    wait_until(lambda: len(worker.out) == 3, what="the quick sender's hooks done")
    assert [json.loads(line)["id"] for line in worker.out] == others  # past the held one, in their order
    assert not cursor.exists() or int(cursor.read_text().split()[0]) < held  # never past an unfinished hook
    gate.touch()
    assert worker.wait() == 0
    assert int(cursor.read_text().split()[0]) == others[-1]


def test_ask_survives_a_server_restart_and_gets_the_answer_sent_meanwhile(
        chatcli: Chatcli, start_server: StartServer) -> None:
    first = start_server()
    oracle, _ = native(first.ws_url, "oracle")
    asking = chatcli("ask", "asker", "oracle", "still there?", "--url", first.ws_url)
    question = _question_for(oracle)
    first.stop()
    asking.wait_stderr("reconnecting in")
    second = start_server("--ws-port", str(first.ws_port))  # the same database
    oracle, _ = native(second.ws_url, "oracle", headers={p.RECEIVE_HEADER: "none"})
    _send_reply(oracle, "asker", "yes", question.id)  # asker may still be away: stored, then resumed after
    assert asking.wait(timeout=30) == 0, asking.err
    assert asking.out == ["yes"]


# -- the REPL: /reply, quotes, /search ------------------------------------------------------------


def test_chat_replies_with_quotes_and_searches_the_conversation(shared: RunningServer, tmp_home: Path) -> None:
    from tests.client.test_repl import Terminal

    me, peer, other = _user("alice"), _user("bob"), _user("carol")
    bob, _ = native(shared.ws_url, peer)
    chat = Terminal([me, peer, "--url", shared.ws_url], {})
    try:
        chat.wait_for(f"{peer} online")
        chat.type("/reply too early\r")
        chat.wait_for("nothing to reply to yet")
        question = send_native(bob, me, "deploy 4.2 now?\nsecond line").msg_id
        chat.wait_for(f"{peer}: deploy 4.2 now?")
        chat.type("/reply yes,  go\r")  # to the last message of the conversation, the text as typed
        answer = _question_for(bob)
        assert (answer.text, answer.reply_to) == ("yes,  go", question)
        chat.wait_for(f"↪ {peer}: deploy 4.2 now?…")
        chat.wait_for("✓ delivered")
        _send_reply(bob, me, "done", answer.id)
        chat.wait_for(f"↪ {me}: yes,  go")
        chat.type(f"/reply {question}\r")  # no text: the next line is the reply
        chat.wait_for("type the reply")
        chat.type("and the logs\r")
        assert _question_for(bob).reply_to == question
        chat.type("/reply 999999999 nope\r")
        chat.wait_for("refused (bad-reply)")
        # An id beyond any message id is no message: said at once, nothing left pending (it once stopped
        # every later session of the chat, under a status line that said "connected").
        chat.type("/reply 99999999999999999999 hi\r")
        chat.wait_for("no message #99999999999999999999")
        chat.type("still here\r")
        assert _question_for(bob).text == "still here"
        chat.wait_for("✓ delivered", count=3)
        assert "pending" not in chat.screen.splitlines()[-1]
        chat.type("/search deploy\r")
        chat.wait_for(f"1 message(s) with {peer} matching 'deploy'")
        chat.wait_for(f"{peer} → {me}: deploy 4.2 now?")
        mark = len(chat.screen)
        chat.type(f"/open {other}\r")  # another conversation, then back: its history shows the quotes again
        chat.wait_for(f"conversation with {other}", after=mark)
        chat.type(f"/open {peer}\r")
        chat.wait_for(f"the last 5 message(s) with {peer}", after=mark)
        chat.wait_for(f"↪ {peer}: deploy 4.2 now?…", after=mark, count=2)
        chat.wait_for(f"↪ {me}: yes,  go", after=mark)
        chat.type("/help\r")
        chat.wait_for("/reply [ID] [TEXT]: answer the last message")
        chat.wait_for("/search TEXT: find this conversation's messages")
        chat.type("/quit\r")
        assert chat.proc.wait(timeout=10) == 0
        assert "Traceback" not in chat.screen
    finally:
        chat.close()


def test_hooks_keep_moving_the_cursor_when_the_reader_of_stdout_leaves(shared: RunningServer, tmp_path: Path,
                                                                       tmp_home: Path) -> None:
    me = _user("piped")
    ids = _send_all(shared, _user("boss"), me, ["o1", "o2", "o3"])
    cursor, ran = tmp_path / "cursor", tmp_path / "ran"
    listen = (f"{sys.executable} -m chatcli listen {me} --url {shared.ws_url} --count 3 --cursor-file {cursor} "
              f"--exec 'echo $CHATCLI_ID >> {ran}'")
    result = subprocess.run(["sh", "-c", f"{listen} | head -1"], capture_output=True, text=True, timeout=60)
    assert result.stdout.count("\n") == 1 and "o1" in result.stdout
    assert "Traceback" not in result.stderr and "exception" not in result.stderr, result.stderr
    assert ran.read_text().split() == [str(i) for i in ids]
    assert cursor.read_text().split()[0] == str(ids[-1])  # the next run repeats nothing


def test_a_cursor_file_that_cannot_be_written_stops_hooks_with_a_clear_error(shared: RunningServer,
                                                                             tmp_path: Path, tmp_home: Path) -> None:
    import resource

    me = _user("fullfs")
    _send_all(shared, _user("boss"), me, ["h1", "h2"])
    cursor = tmp_path / "cursors" / "cursor"
    cursor.parent.mkdir()

    def no_file_growth() -> None:  # as on a full disk: every write fails (EFBIG; Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    result = subprocess.run([sys.executable, "-m", "chatcli", "listen", me, "--url", shared.ws_url, "--count", "2",
                             "--cursor-file", str(cursor), "--exec", "true"],
                            capture_output=True, text=True, timeout=60, preexec_fn=no_file_growth)
    assert result.returncode == 1, result.stderr
    assert "cannot write the cursor file" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert [p.name for p in cursor.parent.iterdir() if p.name.endswith(".tmp")] == []  # nothing left behind


def test_two_listens_cannot_share_a_cursor_file(chatcli: Chatcli, shared: RunningServer, tmp_path: Path) -> None:
    me, cursor = _user("cron"), tmp_path / "cursor"
    first = chatcli("listen", me, "--url", shared.ws_url, "--cursor-file", str(cursor), "--exec", "true")
    first.wait_stderr("listening as")
    second = chatcli("listen", me, "--url", shared.ws_url, "--cursor-file", str(cursor), "--exec", "true")
    assert second.wait() == 2  # or every message would run its hook twice
    assert "is in use by another chatcli listen" in second.err[-1]
    first.proc.terminate()
    first.wait()
    third = chatcli("listen", me, "--url", shared.ws_url, "--cursor-file", str(cursor), "--timeout", "0.5")
    assert third.wait() == 0  # the lock went with the process


def test_a_count_not_reached_because_hooks_keep_failing_says_so(chatcli: Chatcli, shared: RunningServer) -> None:
    me = _user("failing")
    _send_all(shared, _user("boss"), me, ["will not be handled"])
    worker = chatcli("listen", me, "--url", shared.ws_url, "--count", "1", "--timeout", "2", "--exec", "exit 1")
    assert worker.wait() == 6
    # Not "received 1 of 1" alone, which reads like success: the message came, its hook never succeeded.
    assert "received 1 of 1 messages in 2 s; the hooks of 1 of them had not succeeded (" in worker.err[-1]
