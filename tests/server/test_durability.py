"""Store-and-forward against real server processes and real SQLite files."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatcli import protocol as p
from tests.support.flutter_app import decode_legacy_message, encode_legacy_send
from tests.support.processes import RunningServer, StartServer, wait_until
from tests.support.wsclients import RawClient, legacy, native, recv_frame, send_native


def messages(ws, count: int) -> list[p.Message]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(count):
        frame = recv_frame(ws)
        assert isinstance(frame, p.Message), frame
        out.append(frame)
    return out


def nothing_more(ws, timeout: float = 0.3) -> bool:  # type: ignore[no-untyped-def]
    """True when no frame arrives within ``timeout`` (the only way to observe an absence)."""
    try:
        ws.recv(timeout=timeout)
    except TimeoutError:
        return True
    return False


def test_offline_native_recipient_gets_stored_messages_in_order(server: RunningServer) -> None:
    alice, hello = native(server.ws_url, "alice")
    assert set(hello.features) >= {p.Feature.STORE, p.Feature.RESUME, p.Feature.HISTORY}
    acks = [send_native(alice, "bob", f"m{i}", client_id=f"id-{i}") for i in range(5)]
    assert {a.status for a in acks} == {p.Status.STORED}
    bob, _ = native(server.ws_url, "bob")
    got = messages(bob, 5)
    assert [m.text for m in got] == [f"m{i}" for i in range(5)]
    assert [m.id for m in got] == [a.msg_id for a in acks]
    assert all(m.sender == "alice" for m in got)


def test_offline_legacy_recipient_gets_messages_right_after_connected(server: RunningServer) -> None:
    alice = legacy(server.ws_url, "alice")
    for text in ("first", "it's second"):
        alice.send(encode_legacy_send("bob", text))
        assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    bob = legacy(server.ws_url, "bob")  # asserts `connected` came first
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "first")
    assert decode_legacy_message(bob.recv(timeout=5)) == ("alice", "it's second")
    bob.close()
    # Written to a seed client counts as received: the next connection starts clean.
    again = legacy(server.ws_url, "bob")
    assert nothing_more(again)


def test_received_cursor_decides_what_a_new_session_gets(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    acks = [send_native(alice, "bob", f"m{i}", client_id=f"c{i}") for i in range(3)]
    bob, _ = native(server.ws_url, "bob")
    got = messages(bob, 3)
    bob.send(p.encode(p.Received(got[1].id)))  # handled the first two only
    bob.close()
    bob, _ = native(server.ws_url, "bob")
    assert [m.id for m in messages(bob, 1)] == [acks[2].msg_id]
    assert nothing_more(bob)


def test_resume_after_and_since_replay_from_a_point(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    bob, _ = native(server.ws_url, "bob")
    acks = [send_native(alice, "bob", f"m{i}", client_id=f"c{i}") for i in range(4)]
    assert [m.text for m in messages(bob, 4)] == ["m0", "m1", "m2", "m3"]
    bob.send(p.encode(p.Received(acks[-1].msg_id)))  # type: ignore[arg-type]
    bob.close()
    resumed, _ = native(server.ws_url, "bob", headers={p.RESUME_AFTER_HEADER: str(acks[1].msg_id)})
    assert [m.text for m in messages(resumed, 2)] == ["m2", "m3"]
    everything, _ = native(server.ws_url, "bob", headers={p.REPLAY_SINCE_HEADER: "2000-01-01T00:00:00Z"})
    assert [m.text for m in messages(everything, 4)] == ["m0", "m1", "m2", "m3"]
    future, _ = native(server.ws_url, "bob", headers={p.REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"})
    assert nothing_more(future)


@pytest.mark.parametrize(("header", "value"), [(p.RESUME_AFTER_HEADER, "-1"), (p.RESUME_AFTER_HEADER, "x"),
                                               (p.RESUME_AFTER_HEADER, "9" * 30),
                                               (p.REPLAY_SINCE_HEADER, "yesterday")])
def test_bad_resume_headers_are_refused_at_the_handshake(server: RunningServer, header: str, value: str) -> None:
    raw = RawClient(server.ws_port, "/bob", {"Sec-WebSocket-Protocol": p.SUBPROTOCOL,
                                             "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}", header: value})
    assert raw.status == 400 and header in raw.response_body()


def test_duplicate_client_id_is_answered_with_the_original_id(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    bob, _ = native(server.ws_url, "bob")
    first = send_native(alice, "bob", "once", client_id="retry-me")
    again = send_native(alice, "bob", "once", client_id="retry-me")
    assert (again.msg_id, again.duplicate, first.duplicate) == (first.msg_id, True, False)
    assert [m.text for m in messages(bob, 1)] == ["once"]
    assert nothing_more(bob)


def test_history_both_directions_with_limit(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    send_native(alice, "bob", "hi bob", client_id="a1")
    send_native(alice, "carol", "not in this conversation", client_id="a2")
    alice.close()
    bob, _ = native(server.ws_url, "bob")
    assert [m.text for m in messages(bob, 1)] == ["hi bob"]
    send_native(bob, "alice", "hi alice", client_id="b1")
    alice, _ = native(server.ws_url, "alice")
    assert [m.text for m in messages(alice, 1)] == ["hi alice"]
    assert send_native(alice, "bob", "bye", client_id="a3").status == p.Status.DELIVERED
    alice.send(p.encode(p.HistoryRequest("h1", "bob", limit=2)))
    history = recv_frame(alice)
    assert isinstance(history, p.History) and (history.id, history.peer) == ("h1", "bob")
    assert [(m.sender, m.to, m.text) for m in history.messages] == [("bob", "alice", "hi alice"),
                                                                    ("alice", "bob", "bye")]
    alice.send(p.encode(p.HistoryRequest("h2", "bob")))
    everything = recv_frame(alice)
    assert [m.text for m in everything.messages] == ["hi bob", "hi alice", "bye"]  # type: ignore[union-attr]


def test_stored_messages_survive_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    first = start_server()
    alice, _ = native(first.ws_url, "alice")
    assert send_native(alice, "bob", "kept", client_id="k1").status == p.Status.STORED
    assert first.stop() == 0
    second = start_server()
    bob, _ = native(second.ws_url, "bob")
    assert [m.text for m in messages(bob, 1)] == ["kept"]


def test_kill_9_loses_no_acknowledged_message(start_server: StartServer) -> None:
    """Send a stream, kill -9 the server mid-way, restart: every acked message arrives exactly once."""
    server = start_server()
    received: list[p.Message] = []
    bob, _ = native(server.ws_url, "bob")
    alice, _ = native(server.ws_url, "alice")
    acked: dict[int, str] = {}

    def collect() -> None:
        try:
            while True:
                frame = recv_frame(bob, timeout=10)
                if isinstance(frame, p.Message):
                    received.append(frame)
        except (ConnectionClosed, TimeoutError, OSError):
            return

    reader = threading.Thread(target=collect)
    reader.start()
    window = 20
    sent = 0

    def pump() -> None:
        nonlocal sent
        try:
            for i in range(5000):
                alice.send(p.encode(p.Send(f"k{i}", "bob", f"msg {i}")))
                sent = i + 1
                if i >= window:
                    ack = recv_frame(alice)
                    if isinstance(ack, p.Ack) and ack.accepted:
                        acked[ack.msg_id] = ack.id  # type: ignore[index]
        except (ConnectionClosed, OSError):
            return

    writer = threading.Thread(target=pump)
    writer.start()
    wait_until(lambda: len(acked) >= 300, timeout=10, what="300 acknowledged messages")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    writer.join(10)
    reader.join(10)
    assert len(acked) >= 300 and sent < 5000, "the kill must land while messages are still being sent"

    restarted = start_server()
    last_seen = max((m.id for m in received), default=0)
    bob, _ = native(restarted.ws_url, "bob", headers={p.RESUME_AFTER_HEADER: str(last_seen)})
    while True:
        try:
            frame = recv_frame(bob, timeout=1)
        except TimeoutError:
            break
        if isinstance(frame, p.Message):
            received.append(frame)
    ids = [m.id for m in received]
    assert len(ids) == len(set(ids)), "a message arrived twice"
    assert set(acked) <= set(ids), f"{len(set(acked) - set(ids))} acknowledged message(s) lost"
    assert ids == sorted(ids)


def test_retention_prunes_old_messages_and_health_reports_size(start_server: StartServer, tmp_path: Path) -> None:
    first = start_server()
    alice, _ = native(first.ws_url, "alice")
    send_native(alice, "bob", "old news", client_id="o1")
    first.stop()
    with sqlite3.connect(tmp_path / "chatcli.db") as db:  # age the message by a day
        db.execute("UPDATE messages SET ts = ts - 86400")
    second = start_server("--retention", "12h")
    assert second.wait_log("retention: messages older than 12 hours are deleted")  # what the operator set
    assert second.wait_log('"event": "pruned"')
    bob, _ = native(second.ws_url, "bob")
    assert nothing_more(bob)
    with urllib.request.urlopen(second.http_url + "/healthz", timeout=5) as resp:
        health = json.loads(resp.read())
    assert health["storage"]["mode"] == "sqlite" and health["storage"]["db_bytes"] > 0


def test_ephemeral_server_has_no_history(start_server: StartServer) -> None:
    server = start_server("--ephemeral")
    alice, hello = native(server.ws_url, "alice")
    assert p.Feature.STORE not in hello.features and p.Feature.HISTORY not in hello.features
    alice.send(p.encode(p.HistoryRequest("h", "bob")))
    error = recv_frame(alice)
    assert isinstance(error, p.Error) and error.code == p.ErrorCode.UNAVAILABLE


def test_unusable_db_path_is_a_clear_error(start_server: StartServer, tmp_path: Path) -> None:
    (tmp_path / "not-a-db").write_text("this is not sqlite" * 100)
    with pytest.raises(RuntimeError, match="cannot open the message store"):
        start_server("--db", str(tmp_path / "not-a-db"))


@pytest.mark.parametrize(("args", "says"), [
    (("--retention", "30"), "give '30' a unit, e.g. 30d (days)"),  # not 30 seconds of undelivered messages
    (("--ping-timeout", "nan"), "--ping-timeout must be a positive number, not nan"),  # nan: never timed out
    (("--http-timeout", "inf"), "--http-timeout must be a positive number, not inf"),
    (("--max-buffer", "0"), "--max-buffer must be a positive number, not 0"),  # the option's own name
])
def test_server_settings_that_cannot_mean_what_they_say_are_usage_errors(tmp_path: Path, args: tuple[str, ...],
                                                                         says: str) -> None:
    result = subprocess.run([sys.executable, "-m", "chatcli", "serve", "--db", str(tmp_path / "x.db"), *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and says in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.db").exists()


def test_db_and_ephemeral_together_is_a_usage_error(start_server: StartServer) -> None:
    with pytest.raises(RuntimeError, match="exclude each other"):
        start_server("--ephemeral", "--db", "x.db")


def test_native_unknown_user_handshake_still_refused_with_store(server: RunningServer) -> None:
    with pytest.raises(InvalidStatus):
        native(server.ws_url, "bad%21id")


def test_send_only_session_neither_receives_nor_counts_as_online(server: RunningServer) -> None:
    sender_only, _ = native(server.ws_url, "bob", headers={p.RECEIVE_HEADER: "none"})
    alice, _ = native(server.ws_url, "alice")
    assert send_native(alice, "bob", "for bob's listener").status == p.Status.STORED
    assert send_native(sender_only, "alice", "bob can still send").status == p.Status.DELIVERED
    assert [m.text for m in messages(alice, 1)] == ["bob can still send"]
    assert nothing_more(sender_only)
    listener, _ = native(server.ws_url, "bob")
    assert [m.text for m in messages(listener, 1)] == ["for bob's listener"]
