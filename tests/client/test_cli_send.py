"""`chatcli send` through the real entry point against a real server: stdin modes and every exit status."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys

import pytest

from chatcli.protocol import DEFAULT_AUTH_KEY
from tests.support.processes import Chatcli, ChatcliProcess, RunningServer, StartServer


def listening(chatcli: Chatcli, server: RunningServer, user: str, *args: str) -> ChatcliProcess:
    listener = chatcli("listen", user, "--url", server.ws_url, *args)
    listener.wait_stderr("listening as")
    return listener


def texts(listener: ChatcliProcess, n: int) -> list[str]:
    return [json.loads(line)["text"] for line in listener.wait_stdout_lines(n)]


def test_text_argument_is_delivered_and_exit_is_0(chatcli: Chatcli, server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob", "--count", "1")
    sender = chatcli("send", "alice", "bob", "it's \"quoted\" \\ ünïcode", "--url", server.ws_url)
    assert sender.wait() == 0
    assert sender.out == [] and sender.err == []
    assert texts(bob, 1) == ["it's \"quoted\" \\ ünïcode"]
    assert bob.wait() == 0


def test_stdin_is_one_message_with_the_trailing_newline_removed(chatcli: Chatcli, server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob", "--count", "2")
    assert chatcli("send", "alice", "bob", "--url", server.ws_url, stdin="line one\nline two\n").wait() == 0
    assert chatcli("send", "alice", "bob", "-", "--url", server.ws_url, stdin="dash\n").wait() == 0
    assert texts(bob, 2) == ["line one\nline two", "dash"]


def test_lines_sends_each_line_in_order_and_json_prints_each_ack(chatcli: Chatcli,
                                                                 server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob", "--count", "3")
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--url", server.ws_url,
                     stdin="first\n\nsecond\r\nthird")
    assert sender.wait() == 0
    acks = [json.loads(line) for line in sender.out]
    assert [ack["status"] for ack in acks] == ["delivered"] * 3
    assert all(ack["to"] == "bob" and isinstance(ack["msg_id"], int) for ack in acks)
    assert texts(bob, 3) == ["first", "second", "third"]


def test_empty_message_is_a_usage_error(chatcli: Chatcli, server: RunningServer) -> None:
    for args, stdin in (([""], None), ([], "\n"), (["--lines"], "\n\n")):
        sender = chatcli("send", "--url", server.ws_url, "alice", "bob", *args, stdin=stdin)
        assert sender.wait() == 2
        assert "empty" in sender.err[-1] or "no non-empty line" in sender.err[-1]


def test_no_text_with_stdin_a_terminal_is_a_usage_error_not_a_wait(server: RunningServer) -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "chatcli", "send", "alice", "bob", "--url", server.ws_url],
                              stdin=terminal, capture_output=True, text=True, timeout=15)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 2
    assert "stdin is a terminal" in proc.stderr


def test_bad_arguments_exit_2_without_a_traceback(chatcli: Chatcli, server: RunningServer) -> None:
    for args in (["send", "alice"], ["send", "alice", "b b", "hi", "--url", server.ws_url],
                 ["send", "alice", "bob", "hi", "--url", "http://example.com"],
                 ["send", "alice", "bob", "hi", "--timeout", "soon"],
                 ["send", "alice", "bob", "hi", "--auth-key-file", "/nonexistent/key"]):
        run = chatcli(*args)
        assert run.wait() == 2, args
        assert not any("Traceback" in line for line in run.err), run.err


def test_offline_recipient_exits_5_with_the_reason_on_a_server_that_stores_nothing(
        chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--ephemeral")
    sender = chatcli("send", "alice", "nobody", "hello?", "--json", "--url", server.ws_url)
    assert sender.wait() == 5
    assert json.loads(sender.out[0])["reason"] == "offline"
    assert "offline" in sender.err[-1]


def test_offline_recipient_gets_the_message_later_from_a_storing_server(chatcli: Chatcli,
                                                                       server: RunningServer) -> None:
    sender = chatcli("send", "alice", "carol", "while you were out", "--json", "--url", server.ws_url)
    assert sender.wait() == 0
    assert json.loads(sender.out[0])["status"] == "stored"
    carol = chatcli("listen", "carol", "--count", "1", "--url", server.ws_url)
    assert carol.wait() == 0
    assert json.loads(carol.out[0])["text"] == "while you were out"


def test_too_large_message_exits_5(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--max-text-bytes", "16")
    listening(chatcli, server, "bob")
    sender = chatcli("send", "alice", "bob", "x" * 17, "--url", server.ws_url)
    assert sender.wait() == 5
    assert "too-large" in sender.err[-1]


def test_no_server_exits_3(chatcli: Chatcli, server: RunningServer) -> None:
    url = server.ws_url
    server.stop()
    sender = chatcli("send", "alice", "bob", "hi", "--url", url)
    assert sender.wait() == 3
    assert "cannot connect" in sender.err[-1]


def test_wrong_key_exits_4(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--auth-key", "right-key")
    assert chatcli("send", "alice", "bob", "hi", "--url", server.ws_url).wait() == 4
    wrong = chatcli("send", "alice", "bob", "hi", "--url", server.ws_url, env={"CHATCLI_AUTH_KEY": "wrong"})
    assert wrong.wait() == 4
    assert "authentication refused" in wrong.err[-1]


def test_unacknowledged_message_exits_6(chatcli: Chatcli, server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob")
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--timeout", "0.5", "--url", server.ws_url,
                     stdin=subprocess.PIPE)
    assert sender.proc.stdin is not None
    sender.proc.stdin.write("acked\n")
    sender.proc.stdin.flush()
    sender.wait_stdout_lines(1)
    server.proc.send_signal(signal.SIGSTOP)  # the server hangs: no ack will come
    try:
        sender.proc.stdin.write("never acked\n")
        sender.proc.stdin.close()
        assert sender.wait() == 6
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert sender.err[-1].startswith("chatcli: no acknowledgement")
    # What a script needs to resume the stream:
    assert sender.err[-1].endswith("; every line before line 2 was accepted; line 2 sent but not acknowledged "
                                   "(the server may have stored them); nothing after line 2 was sent")
    assert texts(bob, 1)[0] == "acked"


@pytest.mark.parametrize(("sig", "word"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_an_interrupted_line_stream_says_how_far_it_got(chatcli: Chatcli, server: RunningServer,
                                                        sig: signal.Signals, word: str) -> None:
    # Ctrl-C, or a supervisor's SIGTERM (systemd, `timeout`, a CI job cancelled): either way, what to resume.
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--url", server.ws_url, stdin=subprocess.PIPE)
    assert sender.proc.stdin is not None
    sender.proc.stdin.write("one\ntwo\n")
    sender.proc.stdin.flush()
    sender.wait_stdout_lines(2)  # both acknowledged (stored: bob is offline)
    sender.proc.send_signal(sig)
    assert sender.wait() == 130
    assert sender.err[-1] == f"chatcli: {word}: every line up to line 2 was accepted; nothing after it was sent"


def test_default_key_is_the_seed_key(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--auth-key", DEFAULT_AUTH_KEY)
    listening(chatcli, server, "bob")
    assert chatcli("send", "alice", "bob", "hi", "--url", server.ws_url).wait() == 0
