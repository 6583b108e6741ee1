"""Storage failures and large backlogs against a real server and its real SQLite file (issue 8, items 2, 5, 6).

Failures are made the way they happen: another process holds the write lock, the file is
deleted, a trigger makes SQLite fail a write as a full disk does, a table is damaged.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from chatcli import protocol as p
from chatcli.server.relay import HISTORY_QUEUE
from chatcli.server.storage import NewMessage, SQLiteStore
from tests.support.flutter_app import encode_legacy_send
from tests.support.processes import Chatcli, RunningServer, StartServer, wait_until
from tests.support.wsclients import client_frame, legacy, native, recv_frame, request_head, send_native

#: A text whose native JSON is six times its size: every character becomes \u0001.
CONTROL_TEXT = "\x01" * 60_000


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chatcli.db"


@pytest.fixture
def admin(db: Path, server: RunningServer) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the server's database (the sqlite3 shell, a backup)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    yield conn
    conn.close()


def health(server: RunningServer) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(server.http_url + "/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(server: RunningServer, name: str) -> float:
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def store_legacy(server: RunningServer, to: str, texts: list[str]) -> None:
    """Store messages the way the seed app sends them (text kept as sent)."""
    sender = legacy(server.ws_url, "alice")
    for text in texts:
        sender.send(encode_legacy_send(to, text))
        assert sender.recv(timeout=10) == p.LEGACY_SEND_SUCCESS
    sender.close()


def non_reading_session(server: RunningServer, user: str, headers: dict[str, str]) -> socket.socket:
    """A native session on a socket with a tiny receive buffer that never reads past the handshake."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.ws_port))
    sock.sendall(request_head(f"/{user}", {"Sec-WebSocket-Protocol": p.SUBPROTOCOL,
                                           "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}", **headers}))
    assert sock.recv(12).startswith(b"HTTP/1.1 101")
    return sock


def who_answers(server: RunningServer) -> bool:
    """Another client connects (resuming, which checks the id against the store) and its request is
    answered: the event loop is not stuck."""
    probe, _ = native(server.ws_url, "probe", headers={p.RECEIVE_HEADER: "none", p.RESUME_AFTER_HEADER: "1"})
    probe.send(p.encode(p.WhoRequest("w")))
    answered = isinstance(recv_frame(probe, timeout=4), p.Who)
    probe.close()
    return answered


# -- item 5: the event loop never waits for the database ---------------------------------------


def test_a_writer_holding_the_lock_does_not_freeze_other_sessions(server: RunningServer,
                                                                  admin: sqlite3.Connection) -> None:
    alice, _ = native(server.ws_url, "alice")
    admin.execute("BEGIN IMMEDIATE")  # as the sqlite3 shell or a backup would
    alice.send(p.encode(p.Send("c1", "bob", "waits for the lock")))
    assert who_answers(server), "the server stopped answering while another process held the lock"
    with pytest.raises(TimeoutError):
        alice.recv(timeout=0.2)  # not acknowledged before it is committed
    admin.execute("COMMIT")
    ack = recv_frame(alice)
    assert isinstance(ack, p.Ack) and ack.status == p.Status.STORED


def test_acks_come_in_order_while_batches_grow_behind_a_held_lock(server: RunningServer,
                                                                  admin: sqlite3.Connection) -> None:
    alice, _ = native(server.ws_url, "alice")
    admin.execute("BEGIN IMMEDIATE")
    for i in range(50):
        alice.send(p.encode(p.Send(f"c{i}", "bob", f"m{i}")))
    assert who_answers(server)
    admin.execute("COMMIT")
    acks = [recv_frame(alice) for _ in range(50)]
    assert [a.id for a in acks] == [f"c{i}" for i in range(50)]  # type: ignore[union-attr]
    ids = [a.msg_id for a in acks]  # type: ignore[union-attr]
    assert ids == sorted(ids) and {a.status for a in acks} == {p.Status.STORED}  # type: ignore[union-attr]
    bob, _ = native(server.ws_url, "bob")
    assert [recv_frame(bob).text for _ in range(50)] == [f"m{i}" for i in range(50)]  # type: ignore[union-attr]


# -- item 5: acks say exactly what happened -----------------------------------------------------


def test_a_failed_index_after_commit_refuses_nothing(server: RunningServer, admin: sqlite3.Connection) -> None:
    """With the disk full, indexing (after the burst) fails: the committed messages are still acked, and
    delivered."""
    admin.execute("CREATE TRIGGER full BEFORE INSERT ON inbox BEGIN SELECT RAISE(ABORT, 'database or disk is full'); "
                  "END")
    alice, _ = native(server.ws_url, "alice")
    total = 2500
    for start in range(0, total, 1000):
        count = min(1000, total - start)
        for i in range(start, start + count):
            alice.send(p.encode(p.Send(f"c{i}", "bob", f"m{i}")))
        acks = [recv_frame(alice) for _ in range(count)]
        assert {a.status for a in acks} == {p.Status.STORED}, acks[-1]  # type: ignore[union-attr]
    assert server.wait_log('"event": "storage-index-failed"')
    admin.execute("DROP TRIGGER full")
    bob, _ = native(server.ws_url, "bob")
    got = [recv_frame(bob) for _ in range(total)]
    assert [m.text for m in got] == [f"m{i}" for i in range(total)]  # type: ignore[union-attr]


def test_the_indexes_catch_up_once_the_server_is_quiet(server: RunningServer, admin: sqlite3.Connection) -> None:
    """A burst's commits leave the inbox and search indexes behind (far below the lag a commit would index
    at); the server indexes them in the quiet moment after it, so a search or an inbox then waits for nothing."""
    alice, _ = native(server.ws_url, "alice")
    for i in range(300):
        alice.send(p.encode(p.Send(f"c{i}", "bob", f"word{i} and more")))
    assert {recv_frame(alice).status for _ in range(300)} == {p.Status.STORED}  # type: ignore[union-attr]
    last = admin.execute("SELECT max(id) FROM messages").fetchone()[0]

    def indexed() -> tuple[int, int]:
        return (admin.execute("SELECT indexed_upto FROM inbox_progress").fetchone()[0],
                admin.execute("SELECT indexed_upto FROM search_progress").fetchone()[0])

    wait_until(lambda: indexed() == (last, last), what="the indexes to catch up")
    assert admin.execute("SELECT count(*) FROM message_search WHERE message_search MATCH 'word299'").fetchone()[0] == 1


def test_a_failing_commit_refuses_and_health_recovers_with_the_next_success(server: RunningServer,
                                                                              admin: sqlite3.Connection) -> None:
    assert health(server)[0] == 200
    admin.execute("CREATE TRIGGER full BEFORE INSERT ON messages BEGIN "
                  "SELECT RAISE(ABORT, 'database or disk is full'); END")
    alice, _ = native(server.ws_url, "alice")
    ack = send_native(alice, "bob", "not stored")
    assert (ack.status, ack.reason) == (p.Status.REFUSED, p.Reason.STORAGE_FAILED)
    status, body = health(server)
    assert (status, body["status"], body["storage"]["ok"]) == (503, "degraded", False)
    assert "disk is full" in body["storage"]["error"]
    admin.execute("DROP TRIGGER full")
    assert send_native(alice, "bob", "stored").status == p.Status.STORED
    status, body = health(server)
    assert (status, body["status"], body["storage"]["ok"]) == (200, "ok", True)
    bob, _ = native(server.ws_url, "bob")
    assert recv_frame(bob).text == "stored"  # type: ignore[union-attr]
    assert not any("Traceback" in line for line in server.log)


def test_a_deleted_database_is_refused_not_acked(start_server: StartServer, db: Path) -> None:
    server = start_server()
    alice, _ = native(server.ws_url, "alice")
    assert send_native(alice, "bob", "kept").status == p.Status.STORED
    db.unlink()
    for text in ("would vanish", "would vanish too"):
        ack = send_native(alice, "bob", text)
        assert (ack.status, ack.reason) == (p.Status.REFUSED, p.Reason.STORAGE_FAILED)
    status, body = health(server)
    assert (status, body["status"]) == (503, "degraded") and "deleted" in body["storage"]["error"]
    assert sum('"event": "storage-lost"' in line for line in server.log) == 1  # loudly, once
    assert server.stop() == 0
    restarted = start_server()
    bob, _ = native(restarted.ws_url, "bob")
    with pytest.raises(TimeoutError):
        bob.recv(timeout=0.3)  # the new file has nothing acked as stored after the deletion


def test_health_notices_a_deleted_file_before_any_write(server: RunningServer, db: Path) -> None:
    db.unlink()
    status, body = health(server)
    assert (status, body["storage"]["ok"]) == (503, False) and "deleted" in body["storage"]["error"]


def test_a_damaged_database_closes_only_the_reader_with_a_reason(server: RunningServer,
                                                                 admin: sqlite3.Connection) -> None:
    alice, _ = native(server.ws_url, "alice")
    assert send_native(alice, "bob", "for bob").status == p.Status.STORED
    admin.execute("DROP TABLE cursors")  # a damaged file: reading bob's cursor fails
    bob, _ = native(server.ws_url, "bob")
    with pytest.raises(ConnectionClosed) as closed:
        recv_frame(bob)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert "storage failed" in closed.value.rcvd.reason
    assert health(server)[0] == 503
    carol, _ = native(server.ws_url, "carol", headers={p.RESUME_AFTER_HEADER: "0"})  # no cursor needed
    assert send_native(alice, "carol", "still works").status == p.Status.DELIVERED
    assert recv_frame(carol).text == "still works"  # type: ignore[union-attr]
    assert not any("Traceback" in line for line in server.log)


def test_a_corrupted_file_closes_the_reader_with_a_reason_and_stays_reported(start_server: StartServer,
                                                                            db: Path) -> None:
    with SQLiteStore(db) as store:
        for _ in range(5):
            store.append([NewMessage("alice", "bob", "x" * 500, 1000.0, None) for _ in range(2000)])
        while store.index_some():  # indexed, as a server does when quiet
            pass
    with db.open("r+b") as file:  # a damaged stretch in the middle of the file
        file.seek(db.stat().st_size // 2)
        file.write(b"\xa5" * 4096 * 50)
    server = start_server()
    bob, _ = native(server.ws_url, "bob")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            recv_frame(bob)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    alice, _ = native(server.ws_url, "alice")
    assert send_native(alice, "carol", "new").status == p.Status.STORED  # a write elsewhere still works
    status, body = health(server)
    assert (status, body["status"]) == (503, "degraded") and "malformed" in body["storage"]["error"]
    assert not any("Traceback" in line for line in server.log)


def test_a_stored_row_with_an_invalid_sender_is_skipped_not_fatal(server: RunningServer,
                                                                  admin: sqlite3.Connection) -> None:
    """Old servers could store a message from the empty user (issue 8, item 1)."""
    admin.execute("INSERT INTO messages (sender, recipient, text, ts) VALUES ('', 'bob', 'forged', 1e9)")
    alice, _ = native(server.ws_url, "alice")
    assert send_native(alice, "bob", "good").status == p.Status.STORED
    bob, _ = native(server.ws_url, "bob")
    assert recv_frame(bob).text == "good"  # type: ignore[union-attr]
    assert server.wait_log('"event": "bad-stored-message"')
    assert send_native(alice, "bob", "live").status == p.Status.DELIVERED  # the session survived
    assert recv_frame(bob).text == "live"  # type: ignore[union-attr]


# -- item 2: answers bounded in bytes, paced by the reader ---------------------------------------


def test_history_cut_by_the_byte_cap_says_more_and_the_cli_pages_on(chatcli: Chatcli,
                                                                    server: RunningServer) -> None:
    store_legacy(server, "bob", [CONTROL_TEXT + str(i) for i in range(4)])
    bob, _ = native(server.ws_url, "bob", headers={p.RECEIVE_HEADER: "none"})
    bob.send(p.encode(p.HistoryRequest("h", "alice", limit=4)))
    answer = recv_frame(bob)
    assert isinstance(answer, p.History) and answer.more
    assert 1 <= len(answer.messages) < 4 and answer.messages[-1].text.endswith("3")  # the newest first
    run = chatcli("history", "bob", "alice", "--json", "--limit", "4", "--url", server.ws_url)
    assert run.wait() == 0
    assert [json.loads(line)["text"][-1] for line in run.out] == ["0", "1", "2", "3"]


def test_history_beyond_one_answer_and_before_an_id(chatcli: Chatcli, server: RunningServer) -> None:
    """--limit above the protocol's 1,000 a request pages back; --before starts a page at an older message;
    both the one-shot path and the asyncio one (--mark-read) page the same way."""
    store_legacy(server, "pager", [f"m{i}" for i in range(1205)])
    for extra in ([], ["--mark-read"]):
        run = chatcli("history", "pager", "alice", "--json", "--limit", "1204", *extra, "--url", server.ws_url)
        assert run.wait() == 0, run.err
        texts = [json.loads(line)["text"] for line in run.out]
        assert texts == [f"m{i}" for i in range(1, 1205)]
        ids = [json.loads(line)["id"] for line in run.out]
        older = chatcli("history", "pager", "alice", "--json", "--limit", "5", "--before", str(ids[0]), *extra,
                        "--url", server.ws_url)
        assert older.wait() == 0, older.err
        assert [json.loads(line)["text"] for line in older.out] == ["m0"]  # the only one left before it


def test_pipelined_history_requests_are_answered_one_at_a_time_and_bounded(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice", headers={p.RECEIVE_HEADER: "none"})
    send_native(alice, "bob", "hello")
    extra = 3
    requests = [p.encode(p.HistoryRequest(f"h{i}", "bob")) for i in range(HISTORY_QUEUE + 1 + extra)]
    alice.socket.sendall(b"".join(client_frame(0x1, r.encode()) for r in requests))  # one write: read together
    frames = [recv_frame(alice) for _ in requests]
    answers = [f for f in frames if isinstance(f, p.History)]
    refusals = [f for f in frames if isinstance(f, p.Error)]
    assert [a.id for a in answers] == [f"h{i}" for i in range(HISTORY_QUEUE + 1)]
    assert len(refusals) == extra and all("too many history requests" in e.message for e in refusals)


def test_a_session_that_does_not_read_is_not_sent_its_whole_backlog(server: RunningServer) -> None:
    count = 60  # about 21 MB as native frames
    store_legacy(server, "bob", [CONTROL_TEXT] * count)
    before = metric(server, "chatcli_bytes_sent_total")
    stuck = non_reading_session(server, "bob", {p.RESUME_AFTER_HEADER: "0"})
    stalled: list[float] = []

    def sending_stopped() -> bool:  # two looks in a row saw the same total
        stalled.append(metric(server, "chatcli_bytes_sent_total"))
        return len(stalled) > 10 and stalled[-1] == stalled[-10] > before

    wait_until(sending_stopped, timeout=20, what="the server to stop sending to a session that does not read")
    assert stalled[-1] - before < count * len(CONTROL_TEXT) * 6 / 2
    assert who_answers(server)
    stuck.close()
    bob, _ = native(server.ws_url, "bob", headers={p.RESUME_AFTER_HEADER: "0"}, max_size=None)
    assert [len(recv_frame(bob).text) for _ in range(count)] == [len(CONTROL_TEXT)] * count  # type: ignore[union-attr]


# -- item 6: Chatcli-Since ------------------------------------------------------------------


def test_since_replays_from_the_first_message_at_or_after_the_time(server: RunningServer,
                                                                   admin: sqlite3.Connection) -> None:
    alice, _ = native(server.ws_url, "alice")
    acks = [send_native(alice, "bob", f"m{i}") for i in range(3)]
    admin.execute("UPDATE messages SET ts = 1000 + id")  # three known accept times, increasing with ids
    since = p.format_ts(1000 + acks[1].msg_id)  # type: ignore[operator]
    bob, _ = native(server.ws_url, "bob", headers={p.REPLAY_SINCE_HEADER: since})
    assert [recv_frame(bob).text for _ in range(2)] == ["m1", "m2"]  # type: ignore[union-attr]


def test_accept_times_never_go_back_even_after_a_restart(start_server: StartServer, db: Path) -> None:
    """A clock that went back between two runs must not hide new messages from Chatcli-Since."""
    first = start_server()
    alice, _ = native(first.ws_url, "alice")
    send_native(alice, "bob", "before")
    assert first.stop() == 0
    with sqlite3.connect(db) as conn:  # as if the previous run's clock was a day ahead
        conn.execute("UPDATE messages SET ts = ts + 86400")
        (ahead,) = conn.execute("SELECT ts FROM messages").fetchone()
    second = start_server()
    alice, _ = native(second.ws_url, "alice")
    ack = send_native(alice, "bob", "after")
    assert ack.ts is not None and p.parse_ts(ack.ts) >= ahead - 0.001
    bob, _ = native(second.ws_url, "bob", headers={p.REPLAY_SINCE_HEADER: p.format_ts(ahead)})
    assert [recv_frame(bob).text for _ in range(2)] == ["before", "after"]  # type: ignore[union-attr]
