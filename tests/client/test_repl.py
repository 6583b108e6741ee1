"""`chatcli chat` in a real pseudo-terminal through the real entry point, against a real server."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import ssl
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatcli.client import render
from chatcli.client.render import ConnectionState
from chatcli.protocol import REPLAY_SINCE_HEADER, Message
from tests.support.credentials import add_user, start_tls_server
from tests.support.processes import Chatcli, RunningServer, StartServer, wait_until
from tests.support.wsclients import legacy, native, recv_frame, send_native

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[=>]")


class Terminal:
    """``chatcli chat`` on a pty: type into it, read the screen output as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "chatcli", "chat", *args], stdin=terminal,
                                     stdout=terminal, stderr=terminal, start_new_session=True,
                                     env={**os.environ, "TERM": "xterm-256color",
                                          **env})
        os.close(terminal)
        self.raw = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.controller, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.raw += chunk
            for _ in range(chunk.count(b"\x1b[6n")):  # answer cursor position requests as a terminal does
                os.write(self.controller, b"\x1b[1;1R")

    @property
    def screen(self) -> str:
        """Everything written so far, with terminal escape sequences removed."""
        return _ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def wait_for(self, text: str, timeout: float = 10, count: int = 1, after: int = 0) -> None:
        """Wait until ``text`` is on screen ``count`` times, counting from offset ``after`` of ``screen``."""
        wait_until(lambda: self.screen[after:].count(text) >= count, timeout,
                   f"{text!r} on screen:\n{self.screen[-2000:]}")

    def is_restored(self) -> bool:
        """Line editing and echo are back on, as before the REPL put the terminal in raw mode."""
        lflag = termios.tcgetattr(self.controller)[3]
        return bool(lflag & termios.ICANON and lflag & termios.ECHO)

    def type(self, keys: str) -> None:
        os.write(self.controller, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.controller)


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


def test_chat_sends_receives_and_shows_delivery(terminal: Callable[..., Terminal], chatcli: Chatcli,
                                                server: RunningServer, tmp_home: Path) -> None:
    bob, _ = native(server.ws_url, "bob")
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("connected")
    chat.wait_for("alice → bob")  # the status line (its order is checked in test_status_line_names_…)
    chat.type("hello bob\r")
    message = recv_frame(bob)
    assert isinstance(message, Message) and (message.sender, message.text) == ("alice", "hello bob")
    chat.wait_for("✓ delivered")
    send_native(bob, "alice", "hi alice")
    chat.wait_for("bob: hi alice")
    chat.type("\x04")  # Ctrl-D
    assert chat.proc.wait(timeout=10) == 0
    assert chat.is_restored()
    recall = tmp_home / "xdg_state_home" / "chatcli" / "history"
    assert "hello bob" in recall.read_text()
    assert recall.stat().st_mode & 0o777 == 0o600  # every message typed: for its owner's eyes, as shells keep theirs


def test_alt_enter_adds_a_newline_and_enter_sends_both_lines(terminal: Callable[..., Terminal],
                                                             server: RunningServer) -> None:
    bob, _ = native(server.ws_url, "bob")
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("connected")
    chat.type("line one\x1b\rline two\r")
    message = recv_frame(bob)
    assert isinstance(message, Message) and message.text == "line one\nline two"


def test_refused_message_shows_the_reason_and_help_and_quit_work(
        terminal: Callable[..., Terminal], start_server: StartServer) -> None:
    server = start_server("--ephemeral")  # stores nothing: a message to someone offline is refused
    chat = terminal("alice", "nobody", "--url", server.ws_url)
    chat.wait_for("connected")
    # What needs storage is missing, and the chat says so instead of failing.
    chat.wait_for("this server does not offer read positions and the inbox")
    chat.type("anyone there?\r")
    chat.wait_for("✗ refused (offline)")
    chat.type("/help\r")
    chat.wait_for("Alt+Enter")
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_control_sequences_in_messages_are_shown_not_executed(terminal: Callable[..., Terminal],
                                                              server: RunningServer) -> None:
    bob, _ = native(server.ws_url, "bob")
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("connected")
    send_native(bob, "alice", "title\x1b]0;pwned\x07 clear\x1b[2J bell\x07 end")
    chat.wait_for(" end")
    assert b"\x1b]0;pwned" not in chat.raw and b"\x1b[2J bell" not in chat.raw
    assert "title␛]0;pwned␇ clear␛[2J bell␇ end" in chat.screen


def _pending_while_the_server_is_gone(terminal: Callable[..., Terminal], server: RunningServer, me: str, peer: str,
                                      text: str) -> Terminal:
    """A chat whose server stopped after it connected, with ``text`` typed since: pending."""
    chat = terminal(me, peer, "--url", server.ws_url)
    chat.wait_for("connected")
    server.stop()
    chat.wait_for("reconnecting in")
    chat.type(text + "\r")
    chat.wait_for("1 pending")
    return chat


def test_typed_while_disconnected_waits_then_goes_out_on_reconnect(
        terminal: Callable[..., Terminal], start_server: StartServer) -> None:
    first = start_server()  # to ourselves: our own session receives it
    chat = _pending_while_the_server_is_gone(terminal, first, "alice", "alice", "typed offline")
    start_server("--ws-port", str(first.ws_port))
    chat.wait_for("✓ delivered", timeout=20)
    chat.wait_for("alice: typed offline", count=2)  # our line, and the message as it arrived
    chat.type("\x03")  # Ctrl-C leaves as an interruption
    assert chat.proc.wait(timeout=10) == 130
    assert chat.is_restored()
    assert "Traceback" not in chat.screen


def test_leaving_with_messages_not_acknowledged_asks_twice_and_prints_them(
        terminal: Callable[..., Terminal], start_server: StartServer) -> None:
    chat = _pending_while_the_server_is_gone(terminal, start_server(), "alice", "bob", "typed while the server is gone")
    chat.type("\x04")  # Ctrl-D: a warning, not a silent loss
    chat.wait_for("1 message(s) not acknowledged by the server yet: Ctrl-D or /quit again leaves without them")
    assert chat.proc.poll() is None
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 3  # as a send that could not reach the server
    chat.wait_for("chatcli: not acknowledged, to bob: typed while the server is gone")
    assert chat.is_restored() and "Traceback" not in chat.screen


def test_an_answer_for_another_conversation_names_its_recipient(
        terminal: Callable[..., Terminal], start_server: StartServer) -> None:
    first = start_server()
    chat = _pending_while_the_server_is_gone(terminal, first, "alice", "bob", "for bob, typed offline")
    chat.type("/open carol\r")
    chat.wait_for("conversation with carol")
    start_server("--ws-port", str(first.ws_port))
    chat.wait_for("alice → bob: for bob, typed offline  ✓ stored", timeout=20)  # on carol's screen: says to whom
    chat.type("\x03")
    assert chat.proc.wait(timeout=10) == 130


def test_ctrl_z_suspends_the_chat_as_a_shell_would(terminal: Callable[..., Terminal], server: RunningServer) -> None:
    bob, _ = native(server.ws_url, "bob")
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("bob online")
    # Ctrl-Z: the chat sends its process group SIGTSTP (a shell's job control then stops it). This one
    # leads its own session with no shell, so the kernel discards the signal: the chat carries on.
    chat.type("\x1a")
    chat.type("back again\r")
    message = recv_frame(bob)
    assert isinstance(message, Message) and message.text == "back again"  # no ^Z typed into it
    chat.wait_for("✓ delivered")  # else Ctrl-D would first warn of a message not acknowledged
    chat.type("\x04")
    assert chat.proc.wait(timeout=10) == 0


def test_chat_warns_and_shows_everything_when_the_server_comes_back_with_another_store(
        terminal: Callable[..., Terminal], start_server: StartServer, tmp_path: Path) -> None:
    first = start_server("--db", str(tmp_path / "old.db"))
    chat = terminal("alice", "bob", "--url", first.ws_url)
    chat.wait_for("connected")
    bob, _ = native(first.ws_url, "bob")
    send_native(bob, "alice", "from the old store")  # message 1 of the old store: the chat's cursor
    chat.wait_for("bob: from the old store")
    bob.close()
    first.stop()
    chat.wait_for("reconnecting in")
    replaced = start_server("--ws-port", str(first.ws_port), "--db", str(tmp_path / "new.db"))
    chat.wait_for("the server's message store changed", timeout=20)
    bob, _ = native(replaced.ws_url, "bob")
    ack = send_native(bob, "alice", "first of the new store")
    assert (ack.status, ack.msg_id) == ("delivered", 1)  # the id the chat had already seen, in the old store
    chat.wait_for("bob: first of the new store")
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_chat_opens_with_the_conversation_so_far_each_message_once(terminal: Callable[..., Terminal],
                                                                    server: RunningServer) -> None:
    no_backlog = {REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"}  # these sessions only send
    bob, _ = native(server.ws_url, "bob", headers=no_backlog)
    carol, _ = native(server.ws_url, "carol", headers=no_backlog)
    send_native(bob, "alice", "earlier from bob")
    send_native(carol, "alice", "meanwhile from carol")  # not this conversation, but alice's unread mail
    send_native(bob, "alice", "latest from bob")
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("[1 unread: carol 1]")  # carol's message is counted on the status line, not shown here
    chat.wait_for("bob: latest from bob")
    screen = chat.screen
    assert screen.index("earlier from bob") < screen.index("latest from bob")
    chat.type("hello again\r")
    chat.wait_for("✓ delivered")  # to bob's open session; by now everything that came in is on screen
    assert chat.screen.count("bob: latest from bob") == 1 and "meanwhile from carol" not in chat.screen
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0
    # Shown means confirmed: the next chat shows them as history only, once each; carol's is still unread
    # (delivered is not read: the server keeps the read position apart from the delivery cursor).
    again = terminal("alice", "bob", "--url", server.ws_url)
    again.wait_for("alice: hello again")
    again.wait_for("last 3 message(s) with bob")
    again.wait_for("[1 unread: carol 1]")
    again.type("/quit\r")
    assert again.proc.wait(timeout=10) == 0
    assert again.screen.count("bob: latest from bob") == 1 and "meanwhile from carol" not in again.screen


def test_authentication_refused_is_on_the_status_line_and_exits_4(terminal: Callable[..., Terminal],
                                                                  start_server: StartServer
                                                                  ) -> None:
    server = start_server("--auth-key", "secret")
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("● authentication refused")
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 4


def test_status_line_shows_the_peer_coming_and_going(terminal: Callable[..., Terminal],
                                                      server: RunningServer) -> None:
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("bob offline", timeout=20)
    bob = legacy(server.ws_url, "bob")
    chat.wait_for("bob online")
    went_online = len(chat.screen)
    bob.close()
    chat.wait_for("bob offline", after=went_online)  # redrawn at once, without a keypress
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_status_line_says_when_the_peer_is_hidden_until_they_talk(terminal: Callable[..., Terminal],
                                                                   start_server: StartServer,
                                                                   tmp_path: Path) -> None:
    tokens = {user: add_user(tmp_path / "chatcli.db", user) for user in ("alice", "bob")}
    server = start_server()  # accounts on: --presence contacts by default
    bob, _ = native(server.ws_url, "bob", key=tokens["bob"])
    chat = terminal("alice", "bob", "--url", server.ws_url, env={"CHATCLI_TOKEN": tokens["alice"]})
    chat.wait_for("bob's presence hidden until you exchange a message")
    chat.type("hi bob\r")
    chat.wait_for("✓ delivered")
    chat.wait_for("bob online")
    bob.close()
    chat.wait_for("bob offline")
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_status_line_shows_no_presence_when_the_server_tells_none(terminal: Callable[..., Terminal],
                                                                   start_server: StartServer
                                                                   ) -> None:
    server = start_server("--presence", "off")
    bob = legacy(server.ws_url, "bob")
    chat = terminal("alice", "bob", "--url", server.ws_url)
    chat.wait_for("connected")
    chat.type("hi bob\r")
    chat.wait_for("✓ delivered")
    assert "bob online" not in chat.screen and "bob offline" not in chat.screen and "server error" not in chat.screen
    bob.close()
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


@pytest.mark.parametrize("trust", ["--cafile", "SSL_CERT_FILE"])
def test_chat_over_tls(terminal: Callable[..., Terminal], start_server: StartServer,
                       tmp_path: Path, trust: str) -> None:
    tls = start_tls_server(start_server, tmp_path)
    if trust == "--cafile":
        chat = terminal("alice", "bob", "--url", tls.url, "--cafile", str(tls.cafile))
    else:
        chat = terminal("alice", "bob", "--url", tls.url, env={"SSL_CERT_FILE": str(tls.cafile)})
    chat.wait_for("connected", timeout=20)
    bob, _ = native(tls.url, "bob", ssl=ssl.create_default_context(cafile=str(tls.cafile)))
    chat.wait_for("bob online")
    chat.type("hello over TLS\r")
    message = recv_frame(bob)
    assert isinstance(message, Message) and message.text == "hello over TLS"
    chat.wait_for("✓ delivered")
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 0


def test_untrusted_certificate_is_on_the_status_line_and_exits_3(
        terminal: Callable[..., Terminal], start_server: StartServer, tmp_path: Path) -> None:
    tls = start_tls_server(start_server, tmp_path)
    chat = terminal("alice", "bob", "--url", tls.url)
    chat.wait_for("● TLS certificate not trusted", timeout=20)
    chat.wait_for("--cafile")
    chat.type("/quit\r")
    assert chat.proc.wait(timeout=10) == 3


def test_chat_needs_a_terminal(chatcli: Chatcli, server: RunningServer) -> None:
    run = chatcli("chat", "alice", "bob", "--url", server.ws_url)
    assert run.wait() == 2
    assert "needs a terminal" in run.err[-1]


# ---------------------------------------------------------------------------
# What the screen shows, without a terminal
# ---------------------------------------------------------------------------


def test_safe_text_replaces_every_control_but_newline_and_tab() -> None:
    assert render.safe_text("a\x1b[31mb\rc\x07\x7f\x9b\u202ed\te\nf") == "a␛[31mb␍c␇␡<U+009B><U+202E>d\te\nf"


def test_status_line_names_state_server_and_direction() -> None:
    connected = ConnectionState.CONNECTED
    view = render.StatusView(ConnectionState.RECONNECTING, "ws://h:1", "alice", "bob", retry_in=2.6, pending=("hi",))
    assert render.status_text(view) == "● reconnecting in 3 s  alice → bob  1 pending  ws://h:1\n  … hi"
    assert render.status_text(render.StatusView(connected, "ws://h:1", "alice", "bob")) == \
        "● connected  alice → bob  ws://h:1"
    assert render.status_text(render.StatusView(connected, "ws://h:1", "alice", "bob", peer_online=True)) == \
        "● connected  alice → bob  bob online  ws://h:1"
    assert render.status_text(render.StatusView(connected, "ws://h:1", "alice", "bob", peer_online=False,
                                                peer_hidden=True)) == \
        "● connected  alice → bob  bob's presence hidden until you exchange a message  ws://h:1"


def test_every_connection_state_has_a_status_line_style() -> None:
    for state in ConnectionState:
        assert render.status_text(render.StatusView(state, "ws://h:1", "a", "b")).startswith(f"● {state.value}")
        assert "\x1b[1;3" in render.status_ansi(render.StatusView(state, "ws://h:1", "a", "b"), colour=True)


def test_no_colour_means_no_escape_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    message = Message(1, "bob", "alice", "hi", "2026-01-01T00:00:00.000Z")
    assert "\x1b" in render.message_ansi(message, colour=True)
    assert "\x1b" not in render.message_ansi(message, colour=False)
    assert render.message_json(message) == json.dumps(
        {"id": 1, "from": "bob", "to": "alice", "text": "hi", "ts": "2026-01-01T00:00:00.000Z", "reply_to": None})
