"""The chat experience (issue 12) as users meet it: REPLs in real pseudo-terminals, ``chatcli inbox``,
``--mark-read``, and the seed app beside it all. One server for the module: each test has its own users."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection

from chatcli.protocol import Inbox, InboxRequest, Message, encode
from tests.client.test_repl import Terminal
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

#: A REPL's status line is drawn at the bottom of the terminal; its last drawing is what a user sees.
NO_BACKLOG = {"Chatcli-Since": "2999-01-01T00:00:00Z"}  # sessions that only send


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server_process(["--db", str(tmp_path_factory.mktemp("chat") / "chatcli.db")])
    yield server
    kill_leftovers([server.proc])


@pytest.fixture
def terminal(tmp_home: Path) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> Terminal:
        term = Terminal(list(args), env or {})
        opened.append(term)
        return term

    yield factory
    for term in opened:
        term.close()


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_two_users_see_typing_receipts_and_unread_counts_change(terminal: Callable[..., Terminal],
                                                                 shared: RunningServer, tmp_path: Path) -> None:
    url = shared.ws_url
    carol, _ = native(url, "carol1", headers=NO_BACKLOG)
    alice = terminal("alice1", "bob1", "--url", url)
    bob = terminal("bob1", "alice1", "--url", url)
    alice.wait_for("bob1 online")
    bob.wait_for("alice1 online")
    bells = alice.raw.count(b"\x07")
    send_native(carol, "alice1", "psst, alice")  # another conversation: counted, not shown; the bell rings
    alice.wait_for("[1 unread: carol1 1]")
    assert "psst, alice" not in alice.screen
    assert alice.raw.count(b"\x07") > bells
    bob.type("hello ali")  # typing, not sent yet
    alice.wait_for("bob1 is typing…")
    bob.type("ce\r")
    alice.wait_for("bob1: hello alice")  # (which clears the indicator: test_repl_units.py)
    bob.wait_for("bob1: hello alice  ✓✓ read")  # alice's REPL showed it: a receipt
    alice.type("/quit\r")
    bob.type("/quit\r")
    assert alice.proc.wait(timeout=10) == 0 and bob.proc.wait(timeout=10) == 0
    again = terminal("bob1", "alice1", "--url", url)  # the server remembers what alice read
    again.wait_for("last 1 message(s) with alice1")
    again.wait_for("bob1: hello alice  ✓✓ read")
    again.type("/quit\r")
    assert again.proc.wait(timeout=10) == 0


def test_no_receipts_no_typing_and_notify_off_are_respected(terminal: Callable[..., Terminal],
                                                             shared: RunningServer) -> None:
    url = shared.ws_url
    dan, _ = native(url, "dan2")
    quiet = terminal("quiet2", "dan2", "--url", url, "--no-receipts", "--no-typing", "--notify", "off")
    quiet.wait_for("dan2 online")
    quiet.type("hi dan")  # no typing event goes out
    send_native(dan, "quiet2", "can you read this?")
    quiet.wait_for("dan2: can you read this?")
    quiet.type("\r")
    message = recv_frame(dan, events=True)  # the first frame dan gets is the message: no typing, no receipt
    assert isinstance(message, Message) and message.text == "hi dan"
    bells = quiet.raw.count(b"\x07")
    other, _ = native(url, "eve2", headers=NO_BACKLOG)
    send_native(other, "quiet2", "elsewhere")
    quiet.wait_for("[1 unread: eve2 1]")
    assert quiet.raw.count(b"\x07") == bells  # --notify off: no bell
    quiet.type("/quit\r")
    assert quiet.proc.wait(timeout=10) == 0


def test_desktop_notification_through_notify_send(terminal: Callable[..., Terminal], shared: RunningServer,
                                                  tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "notify-send.calls"
    _script(bin_dir / "notify-send", f'printf "%s|" "$@" >> "{calls}"\n')
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    chat = terminal("fay3", "--url", shared.ws_url, "--notify", "desktop", env={"PATH": path})
    chat.wait_for("connected")
    sender, _ = native(shared.ws_url, "gus3", headers=NO_BACKLOG)
    send_native(sender, "fay3", "desktop hello")
    chat.wait_for("[1 unread: gus3 1]")
    wait_until(lambda: calls.exists() and "desktop hello" in calls.read_text(), what="notify-send called")
    assert "chatcli: gus3" in calls.read_text()
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_open_next_inbox_and_completion(terminal: Callable[..., Terminal], shared: RunningServer) -> None:
    url = shared.ws_url
    carol, _ = native(url, "carol4", headers=NO_BACKLOG)
    dave, _ = native(url, "dave4", headers=NO_BACKLOG)
    send_native(carol, "amy4", "from carol")
    send_native(dave, "amy4", "from dave, one")
    send_native(dave, "amy4", "from dave, two")
    chat = terminal("amy4", "--url", url)  # no PEER: the inbox
    chat.wait_for("inbox: 2 conversation(s)")
    chat.wait_for("amy4 → inbox")
    chat.wait_for("[3 unread: dave4 2, carol4 1]")
    screen = chat.screen
    assert screen.index("dave4") < screen.index("carol4")  # the most recent first
    assert "2 unread" in screen and "1 unread" in screen
    chat.type("typed with nobody open\r")
    chat.wait_for("no conversation open")
    chat.type("/next\r")  # the most recent with unread messages
    chat.wait_for("conversation with dave4 (2 unread)")
    chat.wait_for("dave4: from dave, two")
    chat.wait_for("[1 unread: carol4 1]")
    chat.type("/inbox\r")
    chat.wait_for("inbox: 2 conversation(s)", count=2)
    mark = len(chat.screen)
    chat.type("/op\t")  # completes the command … (completions come asynchronously: wait for each)
    chat.wait_for("en", after=mark)
    mark = len(chat.screen)
    chat.type(" car\t")  # … and the peer
    chat.wait_for("ol4", after=mark)
    chat.type("\r")
    chat.wait_for("conversation with carol4 (1 unread)")
    chat.wait_for("carol4: from carol")
    chat.type("/next\r")
    chat.wait_for("no unread messages")
    chat.type("/open not/an-id\r")
    chat.wait_for("invalid user id 'not/an-id'")
    chat.type("/open\r")
    chat.wait_for("usage: /open PEER")
    chat.type("/help\r")
    for command in ("/open PEER", "/next", "/inbox", "/help", "/quit", "Ctrl-X Ctrl-E"):
        chat.wait_for(command)
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0
    assert "Traceback" not in chat.screen


def test_read_positions_are_shared_by_the_sessions_of_one_user(terminal: Callable[..., Terminal],
                                                               shared: RunningServer) -> None:
    url = shared.ws_url
    hal, _ = native(url, "hal5", headers=NO_BACKLOG)
    send_native(hal, "ida5", "first")
    send_native(hal, "ida5", "second")
    laptop = terminal("ida5", "--url", url)
    laptop.wait_for("[2 unread: hal5 2]")
    desktop = terminal("ida5", "hal5", "--url", url)  # a second session of ida shows them …
    desktop.wait_for("hal5: second")
    probe, _ = native(url, "ida5", headers={**NO_BACKLOG, "Chatcli-Receive": "none"})
    wait_until(lambda: _unread(probe) == 0, what="the server to keep ida5's read position")
    laptop.type("/next\r")  # … and the first was told (before the server answered the probe)
    laptop.wait_for("no unread messages")
    third = terminal("ida5", "--url", url)  # a third machine: nothing unread that was read on another
    third.wait_for("inbox: 1 conversation(s)")
    third.type("/next\r")
    third.wait_for("no unread messages")
    for term in (laptop, desktop, third):
        term.type("/quit\r")
        assert term.proc.wait(timeout=10) == 0


def _unread(ws: ClientConnection) -> int:
    ws.send(encode(InboxRequest("probe")))
    answer = recv_frame(ws)
    assert isinstance(answer, Inbox)
    return sum(c.unread for c in answer.conversations)


def test_inbox_json_count_and_mark_read(chatcli: Chatcli, shared: RunningServer,
                                        start_server: StartServer) -> None:
    url = shared.ws_url
    gina, _ = native(url, "gina6", headers=NO_BACKLOG)
    hank, _ = native(url, "hank6", headers=NO_BACKLOG)
    send_native(gina, "fred6", "one from gina")
    send_native(gina, "fred6", "two from gina " + "x" * 100)
    send_native(hank, "fred6", "one from hank")

    def inbox(*args: str) -> list[str]:
        run = chatcli("inbox", "fred6", *args, "--url", url)
        assert run.wait() == 0, run.err
        return run.out

    lines = [json.loads(line) for line in inbox("--json")]
    assert [(c["peer"], c["unread"], c["last_from"]) for c in lines] == [("hank6", 1, "hank6"), ("gina6", 2, "gina6")]
    assert set(lines[0]) == {"peer", "unread", "read", "last_id", "last_from", "last_ts", "preview", "peer_read"}
    assert lines[1]["preview"] == ("two from gina " + "x" * 100)[:80]
    assert inbox("--count") == ["3"] and inbox("--count", "--json") == ['{"unread": 3}']
    text = inbox()
    assert text[0].startswith("hank6") and "1 unread" in text[0] and "hank6: one from hank" in text[0]
    # history and listen mark nothing read unless asked
    assert chatcli("history", "fred6", "gina6", "--url", url).wait() == 0
    assert inbox("--count") == ["3"]
    assert chatcli("history", "fred6", "gina6", "--mark-read", "--url", url).wait() == 0
    assert inbox("--count") == ["1"]
    listen = chatcli("listen", "fred6", "--mark-read", "--count", "1", "--since", "all", "--from", "hank6",
                     "--url", url)
    assert listen.wait() == 0 and json.loads(listen.out[0])["text"] == "one from hank"
    assert inbox("--count") == ["0"]
    # A server that keeps no read positions: a clear refusal, exit 5.
    ephemeral = start_server("--ephemeral")
    refused = chatcli("inbox", "fred6", "--url", ephemeral.ws_url)
    assert refused.wait() == 5
    assert "keeps no read positions" in refused.err[-1]
    listening = chatcli("listen", "fred6", "--mark-read", "--url", ephemeral.ws_url)
    listening.wait_stderr("nothing is marked read")


def test_editor_round_trip(terminal: Callable[..., Terminal], shared: RunningServer, tmp_path: Path) -> None:
    editor = _script(tmp_path / "editor", "printf 'written in the editor\\nsecond line\\n' > \"$1\"\n")
    judy, _ = native(shared.ws_url, "judy7")
    chat = terminal("ivan7", "judy7", "--url", shared.ws_url, env={"VISUAL": str(editor), "EDITOR": str(editor)})
    chat.wait_for("judy7 online")
    chat.type("\x18\x05")  # Ctrl-X Ctrl-E: the editor writes the message; saving sends it
    message = recv_frame(judy)
    assert isinstance(message, Message) and message.text == "written in the editor\nsecond line"
    chat.wait_for("✓ delivered")
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_an_editor_text_that_cannot_be_sent_keeps_the_draft(terminal: Callable[..., Terminal],
                                                             start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("--max-text-bytes", "1000")
    judy, _ = native(server.ws_url, "judy9")
    not_utf8 = _script(tmp_path / "latin1", "printf 'caf\\351' > \"$1\"\n")  # Latin-1, not UTF-8
    chat = terminal("ivan9", "judy9", "--url", server.ws_url, env={"VISUAL": str(not_utf8)})
    chat.wait_for("judy9 online")
    chat.type("my draft")
    chat.type("\x18\x05")
    chat.wait_for("the editor saved text that is not UTF-8 (byte 0xe9 at offset 3): nothing sent, the draft is kept")
    assert "Traceback" not in chat.screen and "Unhandled exception" not in chat.screen
    chat.type(" to judy\r")  # the draft was kept: it goes out whole
    message = recv_frame(judy)
    assert isinstance(message, Message) and message.text == "my draft to judy"
    mark = len(chat.screen)
    chat.type("x" * 1500 + "\r")  # over this server's 1,000 bytes: not accepted, not printed, the draft kept
    chat.wait_for("1,500 bytes: this server takes messages of at most 1,000 bytes; nothing sent", after=mark)
    chat.type("\x08" * 600 + "\r")  # cut to 900: accepted
    message = recv_frame(judy)
    assert isinstance(message, Message) and message.text == "x" * 900
    chat.wait_for("✓ delivered", count=2)  # acknowledged: /quit leaves at once
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_seed_apps_get_none_of_it(terminal: Callable[..., Terminal], shared: RunningServer) -> None:
    app = legacy(shared.ws_url, "kim8")
    chat = terminal("lee8", "kim8", "--url", shared.ws_url)
    chat.wait_for("kim8 online")
    chat.type("hi kim")  # a typing event, which an app cannot show
    app.send(encode_legacy_send("lee8", "hello from the app"))
    assert app.recv(timeout=5) == "send:success"
    chat.wait_for("kim8: hello from the app")  # shown: a read position and a receipt, which the app cannot show
    chat.type("\r")
    # The app's next frame is lee8's message: no typing, receipt or read frame came before it.
    assert decode_legacy_message(str(app.recv(timeout=5))) == ("lee8", "hi kim")
    chat.wait_for("✓ delivered")  # acknowledged: /quit leaves at once
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_a_reconnect_does_not_show_the_conversation_again(terminal: Callable[..., Terminal],
                                                          start_server: StartServer) -> None:
    first = start_server()
    bob, _ = native(first.ws_url, "bob", headers=NO_BACKLOG)
    send_native(bob, "alice", "before the restart")
    chat = terminal("alice", "bob", "--url", first.ws_url)
    chat.wait_for("the last 1 message(s) with bob")
    bob.close()
    first.stop()
    chat.wait_for("reconnecting in")
    again = start_server("--ws-port", str(first.ws_port))
    bob, _ = native(again.ws_url, "bob", headers=NO_BACKLOG)
    send_native(bob, "alice", "after the restart")
    chat.wait_for("bob: after the restart", timeout=20)  # a history asked again would hold it until shown
    assert chat.screen.count("message(s) with bob") == 1 and chat.screen.count("before the restart") == 1
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_every_unread_message_is_shown_in_order_when_more_than_a_screenful_came(
        terminal: Callable[..., Terminal], shared: RunningServer) -> None:
    sender, _ = native(shared.ws_url, "hank7", headers=NO_BACKLOG)
    for n in range(1, 26):  # more than the 20 a conversation opens with
        send_native(sender, "ivy7", f"hb {n:02d}.")
    chat = terminal("ivy7", "hank7", "--url", shared.ws_url)
    chat.wait_for("the last 25 message(s) with hank7")
    chat.wait_for("hank7: hb 25.")
    screen = chat.screen
    shown = [screen.index(f"hank7: hb {n:02d}.") for n in range(1, 26)]
    assert shown == sorted(shown) and screen.index("unread:") < shown[0]  # all, once, in order
    assert all(screen.count(f"hb {n:02d}.") == 1 for n in range(1, 26))
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_without_server_history_messages_of_another_conversation_show_when_it_opens(
        terminal: Callable[..., Terminal], start_server: StartServer) -> None:
    server = start_server("--ephemeral")
    chat = terminal("alice8", "bob8", "--url", server.ws_url)
    chat.wait_for("connected")
    carol, _ = native(server.ws_url, "carol8")
    assert send_native(carol, "alice8", "eph carol 1").status == "delivered"
    chat.wait_for("[1 unread: carol8 1]")
    assert send_native(carol, "alice8", "eph carol 2").status == "delivered"

    def counted_both() -> bool:  # /inbox lists the counts (the status line redraws only what changed)
        if "carol8: 2 unread" in chat.screen:
            return True
        chat.type("/inbox\r")
        return False

    wait_until(counted_both, what="both messages counted")
    chat.type("/next\r")
    chat.wait_for("2 message(s) that came while it was closed")
    chat.wait_for("carol8: eph carol 2")
    assert chat.screen.index("carol8: eph carol 1") < chat.screen.index("carol8: eph carol 2")
    chat.type("/open bob8\r")
    chat.wait_for("conversation with bob8")
    chat.type("/inbox\r")
    chat.wait_for("no unread messages")  # read now: the count is gone
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0
