"""The relay server, through real WebSocket clients against a real ``chatcli serve`` process."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatcli import protocol as p
from tests.support.flutter_app import decode_legacy_message, encode_legacy_send
from tests.support.processes import RunningServer
from tests.support.samples import NASTY_TEXTS
from tests.support.wsclients import RawClient, legacy, native, recv_frame, send_native


def http_get(server: RunningServer, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


# -- legacy (seed Flutter) clients ---------------------------------------------------


def test_legacy_clients_chat_with_sender_as_author(server: RunningServer) -> None:
    alice, bob = legacy(server.ws_url, "alice"), legacy(server.ws_url, "bob")
    alice.send(encode_legacy_send("bob", "hello bob"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    frame = bob.recv(timeout=5)
    assert frame == "{'cmd':'send','userid':'alice', 'msgtext':'hello bob'}"
    assert decode_legacy_message(frame) == ("alice", "hello bob")


def test_legacy_text_arrives_intact_and_server_survives(server: RunningServer) -> None:
    """Every nasty text through one server (a server per text cost ~10 s of the suite for nothing more)."""
    alice, bob = legacy(server.ws_url, "alice"), legacy(server.ws_url, "bob")
    for text in NASTY_TEXTS:
        alice.send(encode_legacy_send("bob", text))
        assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS, text
        assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", text), text
        assert server.proc.poll() is None, text


def test_legacy_fake_keys_cannot_redirect_or_spoof(server: RunningServer) -> None:
    alice, bob, mallory = (legacy(server.ws_url, u) for u in ("alice", "bob", "mallory"))
    alice.send(encode_legacy_send("bob", "x','userid':'mallory"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "x','userid':'mallory")
    mallory.send(encode_legacy_send("bob", "probe"))  # mallory got nothing: her next frame is her own ack
    assert mallory.recv(timeout=5) == p.LEGACY_SEND_SUCCESS


def test_legacy_json_and_quote_replaced_forms(server: RunningServer) -> None:
    alice, bob = legacy(server.ws_url, "alice"), legacy(server.ws_url, "bob")
    alice.send(json.dumps({"auth": p.DEFAULT_AUTH_KEY, "cmd": "send", "userid": "bob", "msgtext": "it's json"}))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "it's json")
    alice.send("{'userid':'bob','cmd':'send','msgtext':'reordered','auth':'addauthkeyifrequired'}")
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "reordered")


@pytest.mark.parametrize("storage", [(), ("--ephemeral",)], ids=["sqlite", "ephemeral"])
@pytest.mark.parametrize("recipient", ["native", "seed"])
def test_a_lone_surrogate_in_a_seed_frame_is_refused_and_harms_nothing(start_server, storage: tuple[str, ...],  # type: ignore[no-untyped-def]
                                                                       recipient: str) -> None:
    # JSON's "\ud800" is no character: it once failed the commit (a traceback and a degraded /healthz with
    # SQLite; with --ephemeral an ack for a message never delivered, or the acks of the whole batch lost).
    server = start_server(*storage)
    bob = native(server.ws_url, "bob")[0] if recipient == "native" else legacy(server.ws_url, "bob")
    evil, carol = legacy(server.ws_url, "evil"), legacy(server.ws_url, "carol")
    evil.send(json.dumps({"cmd": "send", "auth": p.DEFAULT_AUTH_KEY, "userid": "bob", "msgtext": "a\ud800b"}))
    carol.send(encode_legacy_send("bob", "right after"))
    assert evil.recv(timeout=5) == p.LEGACY_SEND_ERROR
    assert carol.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    if recipient == "native":
        assert recv_frame(bob).text == "right after"  # type: ignore[union-attr]
    else:
        assert decode_legacy_message(bob.recv(timeout=5)) == ("carol", "right after")
    status, _, health = http_get(server, "/healthz")
    assert status == 200 and json.loads(health)["status"] == "ok"
    assert not any("Traceback" in line or "ERROR" in line for line in server.log)


def test_ephemeral_server_refuses_offline_recipient_with_send_error(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--ephemeral")
    alice = legacy(server.ws_url, "alice")
    alice.send(encode_legacy_send("nobody", "hello?"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_ERROR


def test_legacy_errors_are_acks_the_app_understands(server: RunningServer) -> None:
    alice, bob = legacy(server.ws_url, "alice"), legacy(server.ws_url, "bob")
    alice.send(encode_legacy_send("bob", "hi", auth="wrong"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_ERROR
    alice.send("{'auth':'addauthkeyifrequired','cmd':'foo','userid':'bob', 'msgtext':'x'}")
    assert alice.recv(timeout=5) == "foo:error"
    for junk in ["junk", "{not json", "[1,2]", "{'cmd':5}", ""]:
        alice.send(junk)
        assert alice.recv(timeout=5) == p.LEGACY_SEND_ERROR, junk
    alice.send(b"\x00\x01binary")
    assert alice.recv(timeout=5) == p.LEGACY_SEND_ERROR
    # Nothing of this reached bob, and alice's session still works.
    alice.send(encode_legacy_send("bob", "still here"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "still here")


def test_custom_auth_key_applies_to_legacy_and_native(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--auth-key", "s3cret")
    alice, _bob = legacy(server.ws_url, "alice"), legacy(server.ws_url, "bob")
    alice.send(encode_legacy_send("bob", "hi"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_ERROR
    alice.send(encode_legacy_send("bob", "hi", auth="s3cret"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    with pytest.raises(InvalidStatus) as refused:
        native(server.ws_url, "carol")
    assert refused.value.response.status_code == 403
    carol, _ = native(server.ws_url, "carol", key="s3cret")
    assert send_native(carol, "bob", "ok").status == p.Status.DELIVERED


# -- native clients ------------------------------------------------------------------


def test_native_hello_ack_and_message(server: RunningServer) -> None:
    alice, hello = native(server.ws_url, "alice")
    assert (hello.user, hello.protocol, hello.max_text_bytes) == ("alice", 1, p.DEFAULT_MAX_TEXT_BYTES)
    assert hello.server.startswith("chatcli/")
    bob, _ = native(server.ws_url, "bob")
    ack = send_native(alice, "bob", "hi bob", client_id="m-1")
    assert (ack.id, ack.status) == ("m-1", p.Status.DELIVERED)
    assert ack.msg_id is not None and ack.ts is not None
    message = recv_frame(bob)
    assert isinstance(message, p.Message)
    assert (message.id, message.sender, message.to, message.text) == (ack.msg_id, "alice", "bob", "hi bob")
    p.parse_ts(message.ts)


def test_native_and_legacy_talk_both_ways(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    bob = legacy(server.ws_url, "bob")
    assert send_native(alice, "bob", "it's from native").status == p.Status.DELIVERED
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "it's from native")
    bob.send(encode_legacy_send("alice", "it's from \"legacy\""))
    assert bob.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    message = recv_frame(alice)
    assert isinstance(message, p.Message)
    assert (message.sender, message.text) == ("bob", "it's from \"legacy\"")


def test_native_refusals_have_reasons(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--ephemeral")
    alice, _ = native(server.ws_url, "alice")
    assert send_native(alice, "nobody", "hi").reason == p.Reason.OFFLINE
    assert send_native(alice, "alice", "").reason == p.Reason.EMPTY
    big = "é" * (p.DEFAULT_MAX_TEXT_BYTES // 2 + 1)  # under the limit in characters, over it in bytes
    assert send_native(alice, "alice", big).reason == p.Reason.TOO_LARGE


def test_native_bad_frames_get_errors_and_session_survives(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    bob, _ = native(server.ws_url, "bob")
    cases = {"not json": p.ErrorCode.BAD_JSON, "[]": p.ErrorCode.BAD_FRAME,
             '{"type":"teleport"}': p.ErrorCode.UNKNOWN_TYPE,
             '{"type":"send","id":"x","to":"bad id!","text":"t"}': p.ErrorCode.BAD_FRAME}
    for frame, code in cases.items():
        alice.send(frame)
        error = recv_frame(alice)
        assert isinstance(error, p.Error) and error.code == code, frame
    alice.send(b"\x01\x02")
    error = recv_frame(alice)
    assert isinstance(error, p.Error) and error.code == p.ErrorCode.BINARY_UNSUPPORTED
    assert send_native(alice, "bob", "after the junk").status == p.Status.DELIVERED
    assert recv_frame(bob).text == "after the junk"  # type: ignore[union-attr]


def test_fragmented_text_message_is_reassembled(server: RunningServer) -> None:
    bob, _ = native(server.ws_url, "bob")
    raw = RawClient(server.ws_port, "/alice")
    assert raw.status == 101
    frame = encode_legacy_send("bob", "in two parts").encode()
    raw.send_frame(0x1, frame[:10], fin=False)
    raw.send_frame(0x0, frame[10:], fin=True)
    assert raw.recv_frame() == (0x1, b"connected")
    assert raw.recv_frame() == (0x1, b"send:success")
    assert recv_frame(bob).text == "in two parts"  # type: ignore[union-attr]


def test_oversize_frame_is_closed_with_1009_others_unaffected(server: RunningServer) -> None:
    alice, bob = legacy(server.ws_url, "alice"), legacy(server.ws_url, "bob")
    raw = RawClient(server.ws_port, "/mallory")
    raw.recv_frame()  # connected
    raw.send_frame(0x1, b"x" * (p.DEFAULT_MAX_TEXT_BYTES + p.FRAME_OVERHEAD_BYTES + 1))
    assert raw.recv_close_code() == 1009
    alice.send(encode_legacy_send("bob", "unaffected"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "unaffected")


def test_invalid_utf8_is_closed_with_1007(server: RunningServer) -> None:
    raw = RawClient(server.ws_port, "/mallory")
    raw.recv_frame()
    raw.send_frame(0x1, b"\xff\xfe not utf-8")
    assert raw.recv_close_code() == 1007
    assert http_get(server, "/healthz")[0] == 200


# -- sessions and user ids -------------------------------------------------------------


def test_every_session_of_a_user_receives_and_closing_one_keeps_the_other(server: RunningServer) -> None:
    alice = legacy(server.ws_url, "alice")
    bob1, bob2 = legacy(server.ws_url, "bob"), legacy(server.ws_url, "bob")
    bob_native, _ = native(server.ws_url, "bob")
    alice.send(encode_legacy_send("bob", "to all of you"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(bob1.recv(timeout=5)) == ("alice", "to all of you")
    assert decode_legacy_message(bob2.recv(timeout=5)) == ("alice", "to all of you")
    assert recv_frame(bob_native).text == "to all of you"  # type: ignore[union-attr]
    bob1.close()
    bob_native.close()
    alice.send(encode_legacy_send("bob", "still reachable"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(bob2.recv(timeout=5)) == ("alice", "still reachable")


def test_a_ping_gets_its_pong_and_a_close_its_close_at_once(server: RunningServer) -> None:
    """websockets' own answers are written as soon as the frame that asks for them is read: a connection is
    queued for writing only when something was queued to it, and these are queued by websockets itself."""
    raw = RawClient(server.ws_port, "/pinger")
    assert raw.recv_frame() == (0x1, p.LEGACY_CONNECTED.encode())
    raw.send_frame(0x9, b"still there?")
    assert raw.recv_frame() == (0xA, b"still there?")
    raw.send_frame(0x8, (1000).to_bytes(2, "big") + b"bye")
    assert raw.recv_close_code() == 1000
    raw.close()


def test_query_string_is_not_part_of_the_id(server: RunningServer) -> None:
    alice = legacy(server.ws_url, "alice")
    legacy(server.ws_url, "555?x=1")
    alice.send(encode_legacy_send("555", "numeric id"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS


@pytest.mark.parametrize("user", ["constructor", "toString", "valueOf", "hasOwnProperty"])
def test_ids_that_crashed_the_seed_are_ordinary(server: RunningServer, user: str) -> None:
    peer = legacy(server.ws_url, user)
    alice = legacy(server.ws_url, "alice")
    alice.send(encode_legacy_send(user, "hello"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert decode_legacy_message(peer.recv(timeout=5)) == ("alice", "hello")


def test_percent_encoded_id_is_decoded(server: RunningServer) -> None:
    _, hello = native(server.ws_url, "al%69ce")
    assert hello.user == "alice"


@pytest.mark.parametrize("path", ["/", "/bad%20id", "/a/b", "/" + "x" * 65, "/%FF", "/.hidden"])
def test_invalid_ids_are_refused_at_the_handshake_with_a_reason(server: RunningServer, path: str) -> None:
    raw = RawClient(server.ws_port, path)
    assert raw.status == 400
    assert "user id" in raw.response_body()


def test_native_handshake_needs_the_key(server: RunningServer) -> None:
    missing = RawClient(server.ws_port, "/alice", {"Sec-WebSocket-Protocol": p.SUBPROTOCOL})
    assert missing.status == 401 and "Authorization" in missing.response_body()
    wrong = RawClient(server.ws_port, "/alice", {"Sec-WebSocket-Protocol": p.SUBPROTOCOL,
                                                 "Authorization": "Bearer nope"})
    assert wrong.status == 403


def test_unknown_subprotocol_is_refused(server: RunningServer) -> None:
    raw = RawClient(server.ws_port, "/alice", {"Sec-WebSocket-Protocol": "chatcli.v9"})
    assert raw.status == 400 and "chatcli.v1" in raw.response_body()


# -- HTTP side, logs, shutdown ---------------------------------------------------------


def test_http_root_health_and_404(server: RunningServer) -> None:
    status, ctype, body = http_get(server, "/")
    assert status == 200 and "running" in body and ctype.startswith("text/plain")
    legacy(server.ws_url, "alice")
    status, ctype, body = http_get(server, "/healthz")
    health = json.loads(body)
    assert (status, ctype, health["status"], health["sessions"]) == (200, "application/json", "ok", 1)
    assert http_get(server, "/nope")[0] == 404


def test_one_log_line_per_connect_and_disconnect(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    alice.send(p.encode(p.Send("c", "alice", "not logged")))
    recv_frame(alice)
    recv_frame(alice)
    alice.close()
    legacy(server.ws_url, "bob").close()
    server.stop()
    events = [json.loads(line) for line in server.log if line.startswith("{")]
    connects = [e for e in events if e.get("event") in ("connect", "disconnect")]
    assert [(e["event"], e["user"], e["protocol"]) for e in connects] == [
        ("connect", "alice", "chatcli.v1"), ("disconnect", "alice", "chatcli.v1"),
        ("connect", "bob", "legacy"), ("disconnect", "bob", "legacy")]
    assert all(e["peer"].startswith("127.0.0.1:") for e in connects)
    assert not any("not logged" in line for line in server.log)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_closes_sessions_with_1001_and_exits_0(server: RunningServer, sig: int) -> None:
    alice, _ = native(server.ws_url, "alice")
    bob = legacy(server.ws_url, "bob")
    assert server.stop(sig) == 0
    for ws in (alice, bob):
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert not any("Traceback" in line for line in server.log)


def test_warns_when_serving_the_network_with_the_default_key(start_server) -> None:  # type: ignore[no-untyped-def]
    exposed = start_server("--host", "0.0.0.0")
    assert exposed.wait_log('"default-key-exposed"')
    keyed = start_server("--host", "0.0.0.0", "--auth-key", "k")
    local = start_server()
    for server in (keyed, local):
        server.stop()
        assert not any('"default-key-exposed"' in line for line in server.log)


def test_busy_port_is_a_clear_error(server: RunningServer, start_server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="cannot listen"):
        start_server("--ws-port", str(server.ws_port))
