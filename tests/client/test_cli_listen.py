"""`chatcli listen` through the real entry point against a real server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from datetime import datetime

from tests.support.processes import Chatcli, ChatcliProcess, RunningServer, StartServer, wait_until
from tests.support.wsclients import native, send_native


def listening(chatcli: Chatcli, server: RunningServer, user: str, *args: str) -> ChatcliProcess:
    listener = chatcli("listen", user, "--url", server.ws_url, *args)
    listener.wait_stderr("listening as")
    return listener


def test_each_message_is_one_json_line_with_the_documented_schema(chatcli: Chatcli,
                                                                  server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob", "--count", "2")
    alice, _ = native(server.ws_url, "alice")
    send_native(alice, "bob", "first", "c1")
    # The line is flushed at once: it is there before the second message is even sent.
    line = json.loads(bob.wait_stdout_lines(1)[0])
    send_native(alice, "bob", "escape \x1b[2J and\nnewline", "c2")
    assert bob.wait() == 0
    assert set(line) == {"id", "from", "to", "text", "ts", "reply_to"} and line["reply_to"] is None
    assert (line["from"], line["to"], line["text"]) == ("alice", "bob", "first")
    assert datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    second = json.loads(bob.out[1])
    assert second["text"] == "escape \x1b[2J and\nnewline" and second["id"] > line["id"]
    assert "\x1b" not in bob.out[1]  # JSON escapes controls: a terminal showing the line stays safe


def test_from_keeps_only_that_sender(chatcli: Chatcli, server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob", "--count", "1", "--from", "carol")
    alice, _ = native(server.ws_url, "alice")
    carol, _ = native(server.ws_url, "carol")
    send_native(alice, "bob", "from alice")
    send_native(carol, "bob", "from carol")
    assert bob.wait() == 0
    assert [json.loads(line)["text"] for line in bob.out] == ["from carol"]


def test_timeout_ends_with_0_without_count_and_6_when_count_is_not_reached(chatcli: Chatcli,
                                                                           server: RunningServer) -> None:
    quiet = chatcli("listen", "bob", "--timeout", "0.5", "--url", server.ws_url)
    counting = chatcli("listen", "carol", "--timeout", "0.5", "--count", "1", "--url", server.ws_url)
    assert quiet.wait() == 0
    assert counting.wait() == 6
    assert "received 0 of 1" in counting.err[-1]


def test_reader_closing_early_ends_listen_quietly_with_0(server: RunningServer, tmp_home: object) -> None:
    script = (f"{sys.executable} -m chatcli listen bob --url {server.ws_url} | head -1; "
              'echo "listen exited with ${PIPESTATUS[0]}" >&2')
    pipeline = subprocess.Popen(["/bin/bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
    alice, _ = native(server.ws_url, "alice")
    n = 0

    def pipeline_done() -> bool:
        # Keep sending: the first message goes to head, the next ones hit the closed pipe.
        nonlocal n
        n += 1
        send_native(alice, "bob", f"message {n}", f"c{n}")
        return pipeline.poll() is not None

    wait_until(pipeline_done, timeout=15, what="listen | head -1 to end")
    out, err = pipeline.communicate(timeout=5)
    assert json.loads(out)["text"].startswith("message ")
    assert "listen exited with 0" in err
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_an_idle_listen_ends_when_its_reader_does(server: RunningServer, tmp_home: object) -> None:
    # One message, then silence: listen learns that head has exited without a next message to write.
    script = (f"{sys.executable} -m chatcli listen bob --url {server.ws_url} | head -1; "
              'echo "listen exited with ${PIPESTATUS[0]}" >&2')
    pipeline = subprocess.Popen(["/bin/bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
    wait_until(lambda: any('"connect"' in line and '"bob"' in line for line in server.log), what="bob's listen")
    alice, _ = native(server.ws_url, "alice")
    assert send_native(alice, "bob", "the only one").status == "delivered"
    out, err = pipeline.communicate(timeout=10)
    assert json.loads(out)["text"] == "the only one"
    assert "listen exited with 0" in err
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_listen_survives_a_server_restart(chatcli: Chatcli, start_server: StartServer) -> None:
    first = start_server()
    bob = listening(chatcli, first, "bob", "--count", "2")
    alice, _ = native(first.ws_url, "alice")
    send_native(alice, "bob", "before restart")
    bob.wait_stdout_lines(1)
    first.stop()
    bob.wait_stderr("reconnecting in")
    second = start_server("--ws-port", str(first.ws_port))
    bob.wait_stderr("reconnected as bob", timeout=20)
    alice, _ = native(second.ws_url, "alice")
    assert send_native(alice, "bob", "after restart", "c2").status in ("delivered", "stored")
    assert bob.wait() == 0
    assert [json.loads(line)["text"] for line in bob.out] == ["before restart", "after restart"]


def test_no_reconnect_exits_3_when_the_server_goes_away(chatcli: Chatcli, server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob", "--no-reconnect")
    server.stop()
    assert bob.wait() == 3
    assert "lost the connection" in bob.err[-1] or "closed the session" in bob.err[-1]


def test_no_reconnect_exits_3_when_nothing_listens(chatcli: Chatcli, server: RunningServer) -> None:
    url = server.ws_url
    server.stop()
    assert chatcli("listen", "bob", "--no-reconnect", "--url", url).wait() == 3


def test_authentication_refusal_exits_4_at_once(chatcli: Chatcli,
                                                start_server: StartServer) -> None:
    server = start_server("--auth-key", "secret")
    bob = chatcli("listen", "bob", "--url", server.ws_url)  # reconnects by default, but not after a refusal
    assert bob.wait() == 4
    assert "authentication refused" in bob.err[-1]


def test_ctrl_c_exits_130_without_a_traceback(chatcli: Chatcli, server: RunningServer) -> None:
    bob = listening(chatcli, server, "bob")
    bob.proc.send_signal(signal.SIGINT)
    assert bob.wait() == 130
    assert not any("Traceback" in line for line in bob.err), bob.err


def test_listen_that_never_reached_the_server_exits_3_at_its_timeout(chatcli: Chatcli) -> None:
    # From cron, "nothing came" must not hide "the server was down the whole time".
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = chatcli("listen", "bob", "--timeout", "1", "--url", f"ws://127.0.0.1:{port}")
    assert listen.wait() == 3
    assert listen.out == []
    assert f"could not connect to ws://127.0.0.1:{port} in 1 s" in listen.err[-1]


def test_closed_standard_streams_are_named_or_left_alone(server: RunningServer, tmp_home: object) -> None:
    alice, _ = native(server.ws_url, "alice")
    send_native(alice, "bob", "something to print")
    command = f"{sys.executable} -m chatcli history bob alice --url {server.ws_url} >&-"  # started with no stdout
    history = subprocess.run(["/bin/bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert history.returncode == 1
    assert history.stderr.strip() == "chatcli: cannot write the output: stdout is closed"
    for options, complaint in (("", "the message is empty"), ("--lines", "stdin held no non-empty line to send")):
        command = f"{sys.executable} -m chatcli send alice bob {options} --url {server.ws_url} <&-"  # no stdin
        send = subprocess.run(["/bin/bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert (send.returncode, send.stderr.strip()) == (2, f"chatcli: {complaint}")
    command = f"{sys.executable} -m chatcli listen bob --timeout 1 --url {server.ws_url} 2>&-"  # no stderr
    listen = subprocess.run(["/bin/bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert listen.returncode == 0
    assert [json.loads(line)["text"] for line in listen.stdout.splitlines()] == ["something to print"]  # no notices
