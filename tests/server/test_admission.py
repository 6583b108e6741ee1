"""Admission first: nothing a peer sends is acted on before its handshake is accepted (real server, raw bytes).

Each test sends what an attacker sent against the old transport: a request and frames in ONE write, so
the server reads them together.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from chatcli import protocol as p
from tests.support.credentials import add_user
from tests.support.flutter_app import encode_legacy_send
from tests.support.processes import RunningServer, StartServer, wait_until
from tests.support.wsclients import RawClient, client_frame, legacy, native, recv_frame, send_native

TEXT, CONT, PING = 0x1, 0x0, 0x9
NATIVE = {"Sec-WebSocket-Protocol": p.SUBPROTOCOL}


def native_send(to: str, text: str, client_id: str = "x1") -> bytes:
    return client_frame(TEXT, json.dumps({"type": "send", "id": client_id, "to": to, "text": text}).encode())


def legacy_send(to: str, text: str, auth: str = p.DEFAULT_AUTH_KEY) -> bytes:
    return client_frame(TEXT, encode_legacy_send(to, text, auth).encode())


def stored_rows(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return [tuple(row) for row in conn.execute("SELECT sender, recipient, text FROM messages ORDER BY id")]


def next_text_for(ws_recv: Callable[[], p.ServerFrame]) -> str:
    frame = ws_recv()
    assert isinstance(frame, p.Message), frame
    return frame.text


@pytest.fixture
def accounts_server(start_server: StartServer, tmp_path: Path) -> tuple[RunningServer, dict[str, str], Path]:
    db = tmp_path / "chatcli.db"
    tokens = {name: add_user(db, name) for name in ("alice", "bob", "carol")}
    return start_server(), tokens, db


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/alice", NATIVE, 401),  # no token
    ("/alice", {**NATIVE, "Authorization": "Bearer wrong"}, 403),
    ("/alice?token=wrong", {}, 403),  # a seed app with a wrong token
    ("/alice", {}, 401),  # a seed app without a token
    ("/%ff", {}, 400),  # not a user id: the old server left user="" behind
    ("/alice", {**NATIVE, "Authorization": "Bearer a", "authorization": "Bearer b"}, 400),
])
def test_frames_behind_a_refused_handshake_are_never_acted_on(
        accounts_server: tuple[RunningServer, dict[str, str], Path], path: str, headers: dict[str, str],
        status: int) -> None:
    server, tokens, db = accounts_server
    bob, _ = native(server.ws_url, "bob", key=tokens["bob"])
    attack = native_send("bob", "forged") + legacy_send("bob", "forged") + native_send("bob", "forged", "x2")
    watch = client_frame(TEXT, json.dumps({"type": "watch", "users": [f"u{i}" for i in range(500)]}).encode())
    received = client_frame(TEXT, b'{"type":"received","id":9223372036854775807}')
    raw = RawClient(server.ws_port, path, headers, pipelined=attack + watch + received)
    assert raw.status == status
    raw.response_body()  # the server closes the connection after its answer
    # Carol's message is the first bob sees: the forged ones were neither delivered nor stored.
    carol, _ = native(server.ws_url, "carol", key=tokens["carol"])
    assert send_native(carol, "bob", "real").status == p.Status.DELIVERED
    assert next_text_for(lambda: recv_frame(bob)) == "real"
    assert stored_rows(db) == [("carol", "bob", "real")]
    assert not any("Traceback" in line for line in server.log)
    assert server.wait_log('"event": "handshake-refused"')  # the operator hears of it
    assert not any(tokens["alice"] in line or "token=wrong" in line for line in server.log)


def test_a_refusal_is_logged_as_one_line(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.ws_port), timeout=5) as browser:  # not an upgrade
        browser.sendall(b"GET /alice HTTP/1.1\r\nHost: x\r\n\r\n")
        assert browser.recv(100).startswith(b"HTTP/1.1 426")  # websockets' answer: several lines of text
    assert server.wait_log('"event": "handshake-refused"')
    (line,) = [line for line in server.log if '"handshake-refused"' in line]
    assert "\n" not in json.loads(line)["message"]


def test_a_pipelined_frame_is_acted_on_once_the_handshake_is_accepted(
        accounts_server: tuple[RunningServer, dict[str, str], Path]) -> None:
    server, tokens, db = accounts_server
    bob, _ = native(server.ws_url, "bob", key=tokens["bob"])
    raw = RawClient(server.ws_port, "/alice", {**NATIVE, "Authorization": f"Bearer {tokens['alice']}"},
                    pipelined=native_send("bob", "pipelined but admitted"))
    assert raw.status == 101
    assert next_text_for(lambda: recv_frame(bob)) == "pipelined but admitted"
    assert stored_rows(db) == [("alice", "bob", "pipelined but admitted")]


def test_a_received_ack_cannot_move_the_cursor_past_what_was_sent(server: RunningServer) -> None:
    bob, _ = native(server.ws_url, "bob")
    bob.send(p.encode(p.Received(p.MAX_INT)))  # nothing was ever sent to bob
    who, _ = native(server.ws_url, "carol")
    who.send(p.encode(p.WhoRequest("w")))
    assert isinstance(recv_frame(who), p.Who)  # the server handled bob's frame before this answer
    bob.close()
    alice, _ = native(server.ws_url, "alice")
    wait_until(lambda: send_native(alice, "bob", "after the bogus ack").status == p.Status.STORED,
               what="bob offline")
    bob, _ = native(server.ws_url, "bob")
    assert next_text_for(lambda: recv_frame(bob)) == "after the bogus ack"


def test_an_oversized_frame_behind_a_refused_handshake_gets_a_clean_refusal(
        accounts_server: tuple[RunningServer, dict[str, str], Path]) -> None:
    server, _, _ = accounts_server
    huge_header = bytes([0x81, 0xFF]) + struct.pack("!Q", 2**40) + b"mask"
    raw = RawClient(server.ws_port, "/alice", NATIVE, pipelined=huge_header)
    assert raw.status == 401
    assert "authentication required" in raw.response_body()
    assert not any("Traceback" in line or "AssertionError" in line for line in server.log)


def test_nothing_after_an_invalid_utf8_frame_is_delivered(server: RunningServer) -> None:
    bob, _ = native(server.ws_url, "bob")
    raw = RawClient(server.ws_port, "/mallory", {**NATIVE, "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}"})
    assert raw.status == 101
    raw.recv_frame()  # hello
    raw.sock.sendall(client_frame(TEXT, b"\xff\xfe") + native_send("bob", "after the bad frame"))
    assert raw.recv_close_code() == 1007
    alice, _ = native(server.ws_url, "alice")
    send_native(alice, "bob", "first real message")
    assert next_text_for(lambda: recv_frame(bob)) == "first real message"


def test_a_message_in_too_many_fragments_is_refused_and_others_are_unaffected(server: RunningServer) -> None:
    raw = RawClient(server.ws_port, "/mallory", {**NATIVE, "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}"})
    raw.recv_frame()  # hello
    empties = client_frame(CONT, b"", fin=False) * 1500
    raw.sock.sendall(client_frame(TEXT, b"{", fin=False) + empties)
    assert raw.recv_close_code() == 1009
    alice, _ = native(server.ws_url, "alice")
    bob, _ = native(server.ws_url, "bob")
    assert send_native(alice, "bob", "still fine").status == p.Status.DELIVERED
    assert next_text_for(lambda: recv_frame(bob)) == "still fine"


def test_a_frame_flood_closes_the_flooder_with_1008(start_server: StartServer) -> None:
    server = start_server("--rate", "5", "--burst", "5")
    raw = RawClient(server.ws_port, "/mallory", {**NATIVE, "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}"})
    raw.recv_frame()  # hello
    raw.sock.sendall(client_frame(PING, b"") * 5000)
    assert raw.recv_close_code() == 1008
    alice, _ = native(server.ws_url, "alice")
    bob, _ = native(server.ws_url, "bob")
    assert send_native(alice, "bob", "still fine").status == p.Status.DELIVERED
    assert next_text_for(lambda: recv_frame(bob)) == "still fine"


@pytest.mark.parametrize(("headers", "needle"), [
    ({p.RESUME_AFTER_HEADER: "9" * 5000}, p.RESUME_AFTER_HEADER),
    ({p.RESUME_AFTER_HEADER: "1", p.RESUME_AFTER_HEADER.lower(): "2"}, p.RESUME_AFTER_HEADER),
    ({p.RECEIVE_HEADER: "none", p.RECEIVE_HEADER.upper(): "all"}, p.RECEIVE_HEADER),
    ({p.REPLAY_SINCE_HEADER: "2026-01-01T00:00:00Z", p.REPLAY_SINCE_HEADER.lower(): "x"}, p.REPLAY_SINCE_HEADER),
])
def test_ambiguous_or_huge_headers_get_400_with_a_reason(server: RunningServer, headers: dict[str, str],
                                                         needle: str) -> None:
    auth = {"Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}"}
    raw = RawClient(server.ws_port, "/alice", {**NATIVE, **auth, **headers})
    assert raw.status == 400
    assert needle in raw.response_body()
    assert not any("Traceback" in line for line in server.log)


@pytest.mark.parametrize("path", ["/bad id", "/alice?token=secret x"])
def test_a_request_line_websockets_cannot_parse_gets_400_not_silence(server: RunningServer, path: str) -> None:
    raw = RawClient(server.ws_port, path, NATIVE)  # a raw space: three words no more
    assert raw.status == 400
    assert "expected a WebSocket upgrade, GET /<your-id> HTTP/1.1" in raw.response_body()
    assert server.wait_log("400 malformed request")
    assert not any("secret" in line or "Traceback" in line for line in server.log)  # the line is not echoed
    native(server.ws_url, "alice")[0].close()  # and the server serves on


def test_repeated_wrong_tokens_from_one_address_are_throttled(
        accounts_server: tuple[RunningServer, dict[str, str], Path]) -> None:
    server, tokens, _ = accounts_server
    statuses = [RawClient(server.ws_port, "/alice", {**NATIVE, "Authorization": f"Bearer guess{i}"}).status
                for i in range(12)]
    assert statuses[:10] == [403] * 10 and statuses[10:] == [429, 429]
    # Even the right token waits: a guesser cannot tell a hit from the throttle.
    right = RawClient(server.ws_port, "/alice", {**NATIVE, "Authorization": f"Bearer {tokens['alice']}"})
    assert right.status == 429
    assert "too many failed authentication attempts" in right.response_body()
    assert server.wait_log('"event": "auth-throttled"')


def test_a_seed_app_guessing_the_key_is_cut_off(server: RunningServer) -> None:
    app = legacy(server.ws_url, "mallory")
    for i in range(9):
        app.send(encode_legacy_send("bob", "hi", auth=f"guess{i}"))
        assert app.recv(timeout=5) == p.LEGACY_SEND_ERROR
    app.send(encode_legacy_send("bob", "hi", auth="guess9"))
    assert app.recv(timeout=5) == p.LEGACY_SEND_ERROR
    with pytest.raises(Exception, match="1008"):
        app.recv(timeout=5)
    assert RawClient(server.ws_port, "/mallory").status == 429


def test_a_watch_of_too_many_users_is_refused_and_the_session_stays_open(server: RunningServer) -> None:
    ws, _ = native(server.ws_url, "alice")
    ws.send(p.encode(p.Watch(tuple(f"u{i}" for i in range(513)))))
    error = recv_frame(ws)
    assert isinstance(error, p.Error) and error.code == p.ErrorCode.BAD_FRAME and "512" in error.message
    ws.send(p.encode(p.Watch(("bob",))))
    presence = recv_frame(ws)
    assert isinstance(presence, p.Presence) and presence.user == "bob" and not presence.online
