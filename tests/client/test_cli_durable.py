"""Durable messages seen from the commands: listen's cursor, send's resends, history, chat's history.

Real ``chatcli serve`` processes on one SQLite file (``start_server`` keeps ``tmp_path/chatcli.db``),
so a restarted server still has every message.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from chatcli import protocol as p
from tests.support.processes import Chatcli, ChatcliProcess, RunningServer, StartServer, wait_until
from tests.support.wsclients import native, send_native


def listening(chatcli: Chatcli, server: RunningServer, user: str, *args: str) -> ChatcliProcess:
    listener = chatcli("listen", user, "--url", server.ws_url, *args)
    listener.wait_stderr("listening as")
    return listener


def printed(listener: ChatcliProcess) -> list[tuple[int, str]]:
    return [(line["id"], line["text"]) for line in map(json.loads, listener.out)]


def listen_once(chatcli: Chatcli, server: RunningServer, user: str, *args: str) -> list[tuple[int, str]]:
    """Run ``listen`` for a short while, as a cron job would, and return what it printed."""
    run = chatcli("listen", user, "--url", server.ws_url, "--timeout", "1", *args)
    assert run.wait() == 0, run.err
    return printed(run)


def send_stored(server: RunningServer, to: str, *texts: str, sender: str = "alice") -> list[int]:
    """Send as ``sender`` (not ``to``: its own session would receive the messages), as stored messages."""
    # A far-future replay point: the sending session gets no backlog of its own between the acks.
    session, _ = native(server.ws_url, sender, headers={p.REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"})
    acks = [send_native(session, to, text) for text in texts]
    session.close()
    assert all(ack.accepted for ack in acks)
    return [ack.msg_id for ack in acks if ack.msg_id is not None]


# ---------------------------------------------------------------------------
# listen: the cursor
# ---------------------------------------------------------------------------


def test_listen_gets_every_message_exactly_once_across_a_server_restart(chatcli: Chatcli,
                                                                        start_server: StartServer) -> None:
    first = start_server()
    # --from keeps the server-side cursor where it is: only listen's own cursor prevents repeats.
    bob = listening(chatcli, first, "bob", "--from", "alice")
    before = send_stored(first, "bob", "m0", "m1", "m2")
    bob.wait_stdout_lines(3)
    first.stop()
    bob.wait_stderr("reconnecting in")
    second = start_server("--ws-port", str(first.ws_port))
    bob.wait_stderr("reconnected as bob", timeout=20)
    after = send_stored(second, "bob", "m3", "m4")
    bob.wait_stdout_lines(5)
    send_stored(second, "bob", "m5")  # one more: nothing was replayed between
    bob.wait_stdout_lines(6)
    assert [text for _, text in printed(bob)] == [f"m{i}" for i in range(6)]
    ids = [msg_id for msg_id, _ in printed(bob)]
    assert ids == sorted(set(ids)) and ids[:5] == before + after


def test_listen_confirms_what_it_printed_but_a_filtered_listener_does_not(chatcli: Chatcli,
                                                                          server: RunningServer) -> None:
    send_stored(server, "bob", "one", "two")
    carol_only = listen_once(chatcli, server, "bob", "--from", "carol")
    assert carol_only == []
    assert [text for _, text in listen_once(chatcli, server, "bob")] == ["one", "two"]
    assert listen_once(chatcli, server, "bob") == []  # confirmed: the next listen starts after them


def test_cursor_file_resumes_exactly_after_the_last_printed_message(chatcli: Chatcli, server: RunningServer,
                                                                    tmp_path: Path) -> None:
    cursor = tmp_path / "bob.cursor"
    # A filtered listener does not move the server-side cursor: only the file says where it stopped.
    bob = listening(chatcli, server, "bob", "--from", "alice", "--cursor-file", str(cursor))
    first = send_stored(server, "bob", "a", "b", "c")
    bob.wait_stdout_lines(3)
    epoch = native(server.ws_url, "carol")[1].epoch  # the store's identity, in every hello
    wait_until(lambda: cursor.exists() and cursor.read_text() == f"{first[-1]} {epoch}\n", what="the cursor file")
    bob.proc.send_signal(signal.SIGKILL)
    bob.wait()
    later = send_stored(server, "bob", "d", "e")
    assert listen_once(chatcli, server, "bob", "--from", "alice", "--cursor-file", str(cursor)) == \
        list(zip(later, ["d", "e"], strict=True))
    assert listen_once(chatcli, server, "bob", "--from", "alice", "--cursor-file", str(cursor)) == []
    assert not list(tmp_path.glob(".bob.cursor.*.tmp"))  # no temporary file left behind (the .lock stays)


def test_cursor_file_errors_exit_2(chatcli: Chatcli, server: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "corrupt").write_text("not an id\n")
    for path, message in ((tmp_path / "corrupt", "is corrupt"), (tmp_path / "no" / "dir", "does not exist")):
        run = chatcli("listen", "bob", "--url", server.ws_url, "--cursor-file", str(path))
        assert run.wait() == 2
        assert message in run.err[-1] and not any("Traceback" in line for line in run.err)


def test_since_replays_from_an_id_a_duration_or_everything(chatcli: Chatcli, server: RunningServer) -> None:
    ids = send_stored(server, "bob", "x", "y", "z")
    assert len(listen_once(chatcli, server, "bob")) == 3  # now confirmed: a plain listen prints nothing
    assert [text for _, text in listen_once(chatcli, server, "bob", "--since", "all")] == ["x", "y", "z"]
    assert [text for _, text in listen_once(chatcli, server, "bob", "--since", str(ids[0]))] == ["y", "z"]
    assert [text for _, text in listen_once(chatcli, server, "bob", "--since", "1h")] == ["x", "y", "z"]
    for bad in ("soon", "-3", "1y"):
        run = chatcli("listen", "bob", "--url", server.ws_url, "--since", bad)
        assert run.wait() == 2, bad
        assert "invalid --since" in run.err[-1]


# ---------------------------------------------------------------------------
# send: resends after a drop
# ---------------------------------------------------------------------------


def test_send_killed_server_mid_stream_every_line_arrives_exactly_once(chatcli: Chatcli,
                                                                       start_server: StartServer) -> None:
    first = start_server()
    lines = [f"line {i}" for i in range(5000)]
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--timeout", "30", "--url", first.ws_url,
                     stdin=subprocess.PIPE)
    assert sender.proc.stdin is not None
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines))
    sender.proc.stdin.close()
    sender.wait_stdout_lines(200)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    acked_before_kill = len(sender.out)
    start_server("--ws-port", str(first.ws_port))
    assert sender.wait(timeout=60) == 0, sender.err
    assert acked_before_kill < len(lines), "the kill must land while lines are still being sent"
    acks = [json.loads(line) for line in sender.out]
    assert len(acks) == len(lines) and all(ack["status"] == "stored" for ack in acks)
    assert len({ack["msg_id"] for ack in acks}) == len(lines)
    bob = chatcli("listen", "bob", "--url", first.ws_url, "--since", "all", "--count", str(len(lines)),
                  "--timeout", "30")
    assert bob.wait(timeout=40) == 0
    assert [text for _, text in printed(bob)] == lines


def test_send_to_an_offline_user_of_an_ephemeral_server_is_still_refused(chatcli: Chatcli,
                                                                         start_server: StartServer) -> None:
    server = start_server("--ephemeral")
    run = chatcli("send", "alice", "nobody", "hi", "--json", "--url", server.ws_url)
    assert run.wait() == 5
    assert json.loads(run.out[0])["reason"] == "offline"


# ---------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------


def conversation(server: RunningServer) -> None:
    send_stored(server, "bob", "hi bob")
    send_stored(server, "alice", "hi \x1b[2J alice\nsecond line", sender="bob")
    send_stored(server, "carol", "not this conversation")
    send_stored(server, "bob", "bye")


def test_history_prints_the_conversation_oldest_first_safely(chatcli: Chatcli, server: RunningServer) -> None:
    conversation(server)
    run = chatcli("history", "alice", "bob", "--url", server.ws_url)
    assert run.wait() == 0
    assert len(run.out) == 4 and all("\x1b" not in line for line in run.out)  # not a terminal: no colour
    assert run.out[0].endswith(" alice: hi bob") and run.out[3].endswith(" alice: bye")
    assert run.out[1].endswith(" bob: hi ␛[2J alice") and run.out[2].strip() == "second line"
    assert run.out[0][:16].replace("-", "").replace(":", "").replace(" ", "").isdigit()  # YYYY-MM-DD HH:MM


def test_history_json_has_the_listen_schema_and_limit_keeps_the_latest(chatcli: Chatcli,
                                                                       server: RunningServer) -> None:
    conversation(server)
    run = chatcli("history", "bob", "alice", "--json", "--limit", "2", "--url", server.ws_url)
    assert run.wait() == 0
    lines = [json.loads(line) for line in run.out]
    assert [set(line) for line in lines] == [{"id", "from", "to", "text", "ts", "reply_to"}] * 2
    assert [(line["from"], line["text"]) for line in lines] == [("bob", "hi \x1b[2J alice\nsecond line"),
                                                                ("alice", "bye")]
    assert lines[0]["id"] < lines[1]["id"]


def test_history_on_an_ephemeral_server_exits_5(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--ephemeral")
    run = chatcli("history", "alice", "bob", "--url", server.ws_url)
    assert run.wait() == 5
    assert "keeps no history" in run.err[-1]
    for bad in (["--limit", "0"], ["--limit", "100001"], ["--limit", "many"], ["--before", "0"]):
        assert chatcli("history", "alice", "bob", *bad, "--url", server.ws_url).wait() == 2


def test_history_and_listen_sessions_leave_messages_for_the_listener(chatcli: Chatcli,
                                                                     server: RunningServer) -> None:
    send_stored(server, "alice", "waiting for alice", sender="carol")
    assert chatcli("history", "alice", "bob", "--url", server.ws_url).wait() == 0
    assert chatcli("send", "alice", "bob", "hello", "--url", server.ws_url).wait() == 0
    assert [text for _, text in listen_once(chatcli, server, "alice")] == ["waiting for alice"]


def test_json_acks_say_whether_they_answer_a_resend(chatcli: Chatcli, server: RunningServer) -> None:
    run = chatcli("send", "alice", "bob", "hi", "--json", "--url", server.ws_url)
    assert run.wait() == 0
    ack = json.loads(run.out[0])
    assert (ack["status"], ack["duplicate"]) == (p.Status.STORED, False)
