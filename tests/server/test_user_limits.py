"""Rate limits and session caps are per user: every session counts, every costly frame is charged."""

from __future__ import annotations

import time

from chatcli import protocol as p
from tests.support.processes import Chatcli, StartServer, metric, wait_until
from tests.support.wsclients import RawClient, native, recv_frame, send_native

SEND_ONLY = {p.RECEIVE_HEADER: "none"}
RAW_NATIVE_SEND_ONLY = {"Sec-WebSocket-Protocol": p.SUBPROTOCOL, "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}",
                        **SEND_ONLY}


def test_send_only_sessions_count_towards_the_cap_and_share_one_bucket(start_server: StartServer) -> None:
    # The case: 40 send-only sessions with --rate 5 --burst 5 got 200 sends through in 1 s.
    server = start_server("--rate", "40", "--burst", "5")
    sessions = [native(server.ws_url, "alice", headers=SEND_ONLY)[0] for _ in range(16)]
    for _ in range(40 - 16):
        refused = RawClient(server.ws_port, "/alice", RAW_NATIVE_SEND_ONLY)
        assert refused.status == 429 and "too many sessions for alice: at most 16" in refused.response_body()

    started = time.monotonic()
    for number, ws in enumerate(sessions):  # 5 each, written at once: 80 in all
        for i in range(5):
            ws.send(p.encode(p.Send(f"s{number}-{i}", "bob", "hi")))
    # Another user is not slowed down by alice's limit.
    bob, _ = native(server.ws_url, "bob", headers=SEND_ONLY)
    assert send_native(bob, "alice", "unaffected").accepted
    bob_acked = time.monotonic() - started
    acks = [recv_frame(ws, timeout=10) for ws in sessions for _ in range(5)]
    elapsed = time.monotonic() - started

    # Paced, not refused: every message is accepted, in each session's order, but no faster than the
    # bucket grants (5 at once, then 40 a second): the 80th no sooner than 75 / 40 s after the first.
    assert [a.id for a in acks if isinstance(a, p.Ack) and a.accepted] == [
        f"s{number}-{i}" for number in range(16) for i in range(5)]
    assert elapsed >= 75 / 40 * 0.95, f"80 accepted in {elapsed:.2f} s"
    assert bob_acked < elapsed
    assert metric(server, "chatcli_rate_limit_waits_total") > 0
    assert metric(server, "chatcli_messages_refused_total", '{reason="rate-limited"}') == 0
    # Closing one of alice's sessions makes room for one more.
    sessions.pop().close()
    wait_until(lambda: RawClient(server.ws_port, "/alice", RAW_NATIVE_SEND_ONLY).status == 101, timeout=5,
               what="a session slot to free up")


def test_who_history_watch_and_received_draw_on_the_users_bucket(start_server: StartServer) -> None:
    server = start_server("--rate", "4", "--burst", "3")  # a request back every 0.25 s
    asker, _ = native(server.ws_url, "alice", headers=SEND_ONLY)
    watcher, _ = native(server.ws_url, "alice")
    started = time.monotonic()
    asker.send(p.encode(p.WhoRequest("w1")))
    assert isinstance(recv_frame(asker), p.Who)
    asker.send(p.encode(p.HistoryRequest("h1", "bob", 10)))
    assert isinstance(recv_frame(asker), p.History)
    watcher.send(p.encode(p.Watch(("bob",))))  # the third request, from alice's other session
    assert recv_frame(watcher) == p.Presence("bob", False)

    # The bucket is empty: five more requests from both sessions wait their turn, and each is answered.
    asker.send(p.encode(p.WhoRequest("w2")))
    asker.send(p.encode(p.HistoryRequest("h2", "bob", 10)))
    watcher.send(p.encode(p.Watch(("carol",))))
    watcher.send(p.encode(p.Received(1)))  # no answer: the next frame is the send's ack
    watcher.send(p.encode(p.Send("m1", "bob", "after the others")))
    dave, _ = native(server.ws_url, "dave")  # dave has his own bucket: answered at once
    dave.send(p.encode(p.WhoRequest("w3")))
    assert recv_frame(dave) == p.Who("w3", ("alice", "dave"))
    dave_answered = time.monotonic() - started

    assert recv_frame(asker) == p.Who("w2", ("alice", "dave"))
    assert isinstance(history := recv_frame(asker), p.History) and history.id == "h2"
    assert recv_frame(watcher) == p.Presence("carol", False)
    ack = recv_frame(watcher)
    assert isinstance(ack, p.Ack) and ack.id == "m1" and ack.accepted
    elapsed = time.monotonic() - started
    # 8 requests from a bucket of 3 refilled at 4 a second: the last no sooner than 5 / 4 s in.
    assert elapsed >= 5 / 4 * 0.95, f"8 requests answered in {elapsed:.2f} s"
    assert dave_answered < elapsed
    assert metric(server, "chatcli_errors_total", '{code="rate-limited"}') == 0


def test_reconnecting_does_not_refill_the_bucket(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--rate", "0.25", "--burst", "2", "--ping-interval", "0.2")  # one back every 4 s
    url = ("--url", server.ws_url)
    started = time.monotonic()
    assert chatcli("send", "alice", "bob", "one", *url).wait() == 0
    assert chatcli("who", "alice", *url).wait() == 0
    wait_until(lambda: sum('"disconnect"' in line and '"alice"' in line for line in server.log) == 2,
               what="both of alice's sessions to close")
    # A ping to a session opened after that proves a heartbeat ran, which forgets only full buckets.
    raw = RawClient(server.ws_port, "/mallory")
    assert raw.recv_frame() == (0x1, b"connected")
    assert raw.recv_frame()[0] == 0x9

    # A new session of alice's draws on the same empty bucket: its request waits for the refill.
    who = chatcli("who", "alice", *url)
    assert who.wait() == 0
    # Three requests from a bucket of 2 refilled at 0.25 a second: the third no sooner than 4 s in.
    assert time.monotonic() - started >= 4 * 0.95
    assert metric(server, "chatcli_rate_limit_waits_total") >= 1
    assert chatcli("send", "bob", "alice", "bob's own bucket", *url).wait() == 0
