"""A one-message ``chatcli send`` over its blocking socket (``client/wire.py``, ``client/oneshot.py``).

Against a real server whose SQLite file the test holds locked (``BEGIN IMMEDIATE``), so a message
waits for its commit, and so its ack, as long as the test wants: long enough to time out, to be
pinged, or to lose its server. The frame-level tests feed RFC 6455's own example frames through a
socket pair.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from chatcli.client import oneshot
from chatcli.client.settings import ClientSettings
from chatcli.client.wire import Closed, InvalidResponse, WebSocket, _masked
from chatcli.errors import ConnectError
from tests.support.processes import Chatcli, RunningServer, StartServer, metric, wait_until

#: Over ten times a handshake's bytes: once the server has read this many, the send frame arrived.
LONG_TEXT = "x" * 10_000


@contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Hold SQLite's write lock on ``db``: the server's commits wait (its busy timeout is 5 s)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def wait_for_the_message(server: RunningServer) -> None:
    wait_until(lambda: metric(server, "chatcli_bytes_received_total") >= len(LONG_TEXT), what="the send frame")


def test_no_ack_within_the_timeout_exits_6(chatcli: Chatcli, server: RunningServer, tmp_path: Path) -> None:
    with write_locked(tmp_path / "chatcli.db"):
        sender = chatcli("send", "alice", "bob", "hi", "--timeout", "0.5", "--url", server.ws_url)
        assert sender.wait() == 6
    assert sender.err == ["chatcli: no acknowledgement from the server within 0.5 s"]


def test_pings_are_answered_while_the_ack_is_awaited(chatcli: Chatcli, start_server: StartServer,
                                                     tmp_path: Path) -> None:
    server = start_server("--ping-interval", "0.1", "--ping-timeout", "0.3")
    with write_locked(tmp_path / "chatcli.db"):
        sender = chatcli("send", "alice", "bob", LONG_TEXT, "--json", "--url", server.ws_url)
        wait_for_the_message(server)
        sent = metric(server, "chatcli_bytes_sent_total")
        # Five pings (9 bytes each), well past the pong timeout of each.
        wait_until(lambda: metric(server, "chatcli_bytes_sent_total") >= sent + 45, what="pings")
    assert sender.wait() == 0, sender.err
    assert json.loads(sender.out[0])["status"] == "stored"
    assert metric(server, "chatcli_sessions_opened_total", '{protocol="chatcli.v1"}') == 1
    assert metric(server, "chatcli_sessions_closed_total", '{why="dead-peer"}') == 0


def test_a_server_lost_before_the_ack_gets_the_message_again_once(chatcli: Chatcli, start_server: StartServer,
                                                                  tmp_path: Path) -> None:
    first = start_server()
    with write_locked(tmp_path / "chatcli.db"):  # the first server never commits it
        sender = chatcli("send", "alice", "bob", LONG_TEXT, "--json", "--timeout", "20", "--url", first.ws_url)
        wait_for_the_message(first)
        first.stop(9)
    second = start_server("--ws-port", str(first.ws_port))
    assert sender.wait(timeout=30) == 0, sender.err
    ack = json.loads(sender.out[0])
    assert (ack["status"], ack["duplicate"]) == ("stored", False)
    bob = chatcli("listen", "bob", "--url", second.ws_url, "--since", "all", "--timeout", "1")
    assert bob.wait() == 0
    assert [(m["id"], m["text"]) for m in map(json.loads, bob.out)] == [(ack["msg_id"], LONG_TEXT)]


def test_a_server_that_never_comes_back_exits_3_after_the_timeout(chatcli: Chatcli, server: RunningServer,
                                                                  tmp_path: Path) -> None:
    with write_locked(tmp_path / "chatcli.db"):
        sender = chatcli("send", "alice", "bob", LONG_TEXT, "--timeout", "1", "--url", server.ws_url)
        wait_for_the_message(server)
        server.stop(9)
    assert sender.wait() == 3
    assert "no reconnection within 1 s (1 message(s) unacknowledged)" in sender.err[-1]


def test_an_http_port_is_not_a_websocket_server(chatcli: Chatcli, server: RunningServer) -> None:
    sender = chatcli("send", "alice", "bob", "hi", "--url", f"ws://127.0.0.1:{server.http_port}")
    assert sender.wait() == 3
    assert sender.err[-1].startswith(f"chatcli: cannot connect to ws://127.0.0.1:{server.http_port}: HTTP 4")


def test_a_server_that_does_not_answer_the_handshake_exits_3(chatcli: Chatcli) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never answers
        port = silent.getsockname()[1]
        sender = chatcli("send", "alice", "bob", "hi", "--timeout", "0.5", "--url", f"ws://127.0.0.1:{port}")
        assert sender.wait() == 3
    assert sender.err[-1] == f"chatcli: cannot connect to ws://127.0.0.1:{port}: no answer in 0.5 s"


def test_a_proxy_in_the_environment_is_gone_through_as_before(chatcli: Chatcli, server: RunningServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    env = {"https_proxy": proxy, "no_proxy": "", "NO_PROXY": ""}
    for command in (["send", "alice", "bob", "hi"], ["history", "alice", "bob"]):
        through_proxy = chatcli(*command, "--url", server.ws_url, env=env)
        assert through_proxy.wait() == 3 and "connection refused" in through_proxy.err[-1]
    bypassed = {**env, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    assert chatcli("send", "alice", "bob", "hi", "--url", server.ws_url, env=bypassed).wait() == 0


#: Forces websockets' client (a proxy is configured) without using the proxy (bypassed for the server).
WEBSOCKETS_PATH = {"https_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}


def test_both_transports_answer_alike(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--ephemeral", "--auth-key", "k", "--max-text-bytes", "16")
    url = ["--url", server.ws_url]
    key = {"CHATCLI_AUTH_KEY": "k"}
    for args, env in ((["send", "alice", "nobody", "hi", "--json", *url], key),
                      (["send", "alice", "bob", "x" * 17, *url], key),
                      (["history", "alice", "bob", *url], key),
                      (["send", "alice", "bob", "hi", *url], {"CHATCLI_AUTH_KEY": "wrong"}),
                      (["send", "alice", "bob", "hi", "--url", "ws://127.0.0.1:9"], key),
                      (["send", "alice", "nobody", "hi", *url], key)):  # refused: nobody is offline
        oneshot, websockets = chatcli(*args, env=env), chatcli(*args, env={**env, **WEBSOCKETS_PATH})
        assert oneshot.wait() == websockets.wait() != 0, args
        assert oneshot.err == websockets.err, args
        assert [line.split(",", 1)[1] for line in oneshot.out] == [line.split(",", 1)[1] for line in websockets.out]
    assert "refused: offline" in oneshot.err[-1]  # the last case


def test_an_empty_stdin_is_refused_before_connecting(chatcli: Chatcli) -> None:
    sender = chatcli("send", "alice", "bob", "--url", "ws://127.0.0.1:1")  # stdin: /dev/null
    assert sender.wait() == 2 and "empty" in sender.err[-1]


def test_a_message_that_is_not_utf8_is_refused_before_connecting(chatcli: Chatcli) -> None:
    """A stray 0xff byte (here in argv, as os.fsencode passes it) is named as such, not as a "lone surrogate"."""
    sender = chatcli("send", "alice", "bob", "caf\udce9", "--url", "ws://127.0.0.1:1")  # Latin-1 café
    assert sender.wait() == 2
    assert sender.err[-1] == "chatcli: the message is not valid UTF-8 text: byte 0xe9 at character 4"


# -- frames (RFC 6455, section 5.7's examples) ---------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[WebSocket, socket.socket]]:
    """A client ``WebSocket`` on one end of a socket pair, the raw other end as the server."""
    client, server = socket.socketpair()
    yield WebSocket(client, None, b""), server
    client.close()
    server.close()


def soon() -> float:
    return time.monotonic() + 5


def test_a_client_frame_is_masked_as_the_rfc_shows() -> None:
    assert _masked(b"Hello", bytes.fromhex("37fa213d")) == bytes.fromhex("7f9f4d5158")


def test_fragments_are_joined_and_a_ping_between_them_is_answered(pair: tuple[WebSocket, socket.socket]) -> None:
    ws, server = pair
    server.sendall(bytes.fromhex("01 03 48656c") + bytes.fromhex("89 05 48656c6c6f") + bytes.fromhex("80 02 6c6f"))
    assert ws.receive_text(soon()) == "Hello"
    pong = server.recv(100)
    assert pong[0] == 0x8A and pong[1] == 0x80 | 5  # a final pong, masked, 5 bytes
    assert _masked(pong[6:], pong[2:6]) == b"Hello"


def test_long_frames_and_the_servers_close(pair: tuple[WebSocket, socket.socket]) -> None:
    ws, server = pair
    text = "é" * 40_000  # 80,000 bytes: the 8-byte length form
    server.sendall(bytes.fromhex("81 7f") + (80_000).to_bytes(8, "big") + text.encode())
    assert ws.receive_text(soon()) == text
    ws.send_text("x" * 300, soon())  # the 2-byte length form
    assert server.recv(4) == bytes.fromhex("81 fe 012c")
    server.recv(1000)
    server.sendall(bytes.fromhex("88 05 03e9") + b"bye")
    with pytest.raises(Closed) as closed:
        ws.receive_text(soon())
    assert (closed.value.code, closed.value.reason) == (1001, "bye")
    echo = server.recv(100)
    assert echo[0] == 0x88 and _masked(echo[6:], echo[2:6]) == bytes.fromhex("03e9")


@pytest.mark.parametrize("frame", [
    "82 01 78",  # binary
    "80 01 78",  # a continuation with nothing to continue
    "c1 01 78",  # a reserved bit (no extension was negotiated)
    "81 81 00000000 78",  # masked by the server
    "81 7f 7fffffffffffffff",  # absurdly long
])
def test_frames_a_server_must_not_send(pair: tuple[WebSocket, socket.socket], frame: str) -> None:
    ws, server = pair
    server.sendall(bytes.fromhex(frame))
    with pytest.raises(InvalidResponse):
        ws.receive_text(soon())


def test_closing_gives_up_on_a_server_that_never_answers(pair: tuple[WebSocket, socket.socket]) -> None:
    ws, server = pair
    ws.close()  # waits for the server's close frame at most CLOSE_TIMEOUT, then closes the socket
    close = server.recv(100)
    assert close[0] == 0x88 and _masked(close[6:], close[2:6]) == (1000).to_bytes(2, "big")
    assert server.recv(100) == b""


def text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


@pytest.mark.parametrize(("frames", "error"), [
    ([text_frame('{"type":"message","id":1,"from":"a","to":"b","text":"t","ts":"x"}')],
     "ws://h:1 sent Message before its hello"),
    ([text_frame("not json")], "ws://h:1 broke the protocol: not JSON"),
    ([text_frame('{"type":"from-the-future"}')], "ws://h:1 sent no hello within 0.2 s"),  # skipped, then silence
    ([bytes.fromhex("88 02 03f0")], "lost the connection to the server (close code 1008)"),
])
def test_a_bad_start_is_a_connect_error(pair: tuple[WebSocket, socket.socket], frames: list[bytes],
                                        error: str) -> None:
    ws, server = pair
    server.sendall(b"".join(frames))
    with pytest.raises(ConnectError) as failed:
        oneshot._read_hello(ws, ClientSettings(url="ws://h:1", timeout=0.2))
    assert str(failed.value).startswith(error)
