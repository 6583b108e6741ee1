"""Rate limits and session caps are per user: every session counts, every costly frame is charged."""

from __future__ import annotations

import json
import time

from websockets.sync.client import ClientConnection

from chatcli import protocol as p
from tests.support.processes import Chatcli, StartServer, metric, wait_until
from tests.support.wsclients import RawClient, native, recv_frame, send_native

SEND_ONLY = {p.RECEIVE_HEADER: "none"}
RAW_NATIVE_SEND_ONLY = {"Sec-WebSocket-Protocol": p.SUBPROTOCOL, "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}",
                        **SEND_ONLY}


def test_send_only_sessions_count_towards_the_cap_and_share_one_bucket(start_server: StartServer) -> None:
    # The case: 40 send-only sessions with --rate 5 --burst 5 got 200 sends through in 1 s.
    server = start_server("--rate", "5", "--burst", "5")
    started = time.monotonic()
    sessions = [native(server.ws_url, "alice", headers=SEND_ONLY)[0] for _ in range(16)]
    for _ in range(40 - 16):
        refused = RawClient(server.ws_port, "/alice", RAW_NATIVE_SEND_ONLY)
        assert refused.status == 429 and "too many sessions for alice: at most 16" in refused.response_body()

    for number, ws in enumerate(sessions):  # 5 each, written at once: 80 in all
        for i in range(5):
            ws.send(p.encode(p.Send(f"s{number}-{i}", "bob", "hi")))
    acks = [recv_frame(ws) for ws in sessions for _ in range(5)]
    elapsed = time.monotonic() - started

    accepted = [a for a in acks if isinstance(a, p.Ack) and a.accepted]
    limited = [a for a in acks if isinstance(a, p.Ack) and a.reason == p.Reason.RATE_LIMITED]
    assert len(accepted) + len(limited) == 80
    assert 5 <= len(accepted) <= 5 + 5 * elapsed, f"{len(accepted)} accepted in {elapsed:.2f} s"
    # Another user is not slowed down by alice's limit.
    bob, _ = native(server.ws_url, "bob", headers=SEND_ONLY)
    assert send_native(bob, "alice", "unaffected").accepted
    # Closing one of alice's sessions makes room for one more.
    sessions.pop().close()
    wait_until(lambda: RawClient(server.ws_port, "/alice", RAW_NATIVE_SEND_ONLY).status == 101, timeout=5,
               what="a session slot to free up")


def _error(ws: ClientConnection) -> p.Error:
    frame = recv_frame(ws)
    assert isinstance(frame, p.Error), frame
    return frame


def test_who_history_watch_and_received_draw_on_the_users_bucket(start_server: StartServer) -> None:
    server = start_server("--rate", "0.05", "--burst", "3")  # a token back only every 20 s
    asker, _ = native(server.ws_url, "alice", headers=SEND_ONLY)
    watcher, _ = native(server.ws_url, "alice")
    asker.send(p.encode(p.WhoRequest("w1")))
    assert isinstance(recv_frame(asker), p.Who)
    asker.send(p.encode(p.HistoryRequest("h1", "bob", 10)))
    assert isinstance(recv_frame(asker), p.History)
    watcher.send(p.encode(p.Watch(("bob",))))  # the third token, from alice's other session
    assert recv_frame(watcher) == p.Presence("bob", False)

    asker.send(p.encode(p.WhoRequest("w2")))
    refused = _error(asker)
    assert (refused.code, refused.details) == (p.ErrorCode.RATE_LIMITED, {"id": "w2"})
    assert "too many requests" in refused.message
    asker.send(p.encode(p.HistoryRequest("h2", "bob", 10)))
    refused = _error(asker)
    assert (refused.code, refused.details) == (p.ErrorCode.RATE_LIMITED, {"id": "h2"})
    watcher.send(p.encode(p.Watch(("carol",))))
    assert _error(watcher).code == p.ErrorCode.RATE_LIMITED
    watcher.send(p.encode(p.Received(1)))  # refused quietly: no frame answers it…
    ack = send_native(watcher, "bob", "over the limit")  # …so the next frame is this send's ack
    assert ack.reason == p.Reason.RATE_LIMITED
    assert metric(server, "chatcli_errors_total", '{code="rate-limited"}') == 4
    # Bob has his own bucket.
    bob, _ = native(server.ws_url, "bob")
    bob.send(p.encode(p.WhoRequest("w3")))
    assert recv_frame(bob) == p.Who("w3", ("alice", "bob"))


def test_reconnecting_does_not_refill_the_bucket(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--rate", "0.05", "--burst", "2", "--ping-interval", "0.2")
    url = ("--url", server.ws_url)
    assert chatcli("send", "alice", "bob", "one", *url).wait() == 0
    assert chatcli("who", "alice", *url).wait() == 0
    wait_until(lambda: sum('"disconnect"' in line and '"alice"' in line for line in server.log) == 2,
               what="both of alice's sessions to close")
    # A ping to a session opened after that proves a heartbeat ran, which forgets only full buckets.
    raw = RawClient(server.ws_port, "/mallory")
    assert raw.recv_frame() == (0x1, b"connected")
    assert raw.recv_frame()[0] == 0x9

    who = chatcli("who", "alice", *url)
    assert who.wait() == 5 and "rate-limited" in who.err[-1]
    send = chatcli("send", "alice", "bob", "two", "--json", *url)
    assert send.wait() == 5 and json.loads(send.out[-1])["reason"] == p.Reason.RATE_LIMITED
    assert chatcli("send", "bob", "alice", "bob's own bucket", *url).wait() == 0
