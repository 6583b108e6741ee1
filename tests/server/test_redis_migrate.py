"""``chatcli migrate-to-redis``: a single server's SQLite database becomes a cluster's Redis store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcli import protocol as p
from tests.support.processes import Chatcli, StartServer, kill_leftovers, start_server_process
from tests.support.redis_server import RedisServer
from tests.support.wsclients import native, next_of, recv_frame, send_native


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_accounts_messages_cursors_and_history_move_and_clients_resume(
        start_server: StartServer, chatcli: Chatcli, redis: RedisServer, tmp_path: Path) -> None:
    db = tmp_path / "chatcli.db"
    tokens = {}
    for user in ("alice", "bob", "carol"):
        add = chatcli("user", "add", user, "--db", str(db))
        assert add.wait() == 0
        tokens[user] = add.out[0]
    single = start_server("--db", str(db))
    alice, hello = native(single.ws_url, "alice", key=tokens["alice"])
    stored = [send_native(alice, "bob", f"for bob {i}") for i in range(3)]
    carol, _ = native(single.ws_url, "carol", key=tokens["carol"])
    send_native(alice, "carol", "seen by carol")
    seen = recv_frame(carol)
    assert isinstance(seen, p.Message)
    carol.send(p.encode(p.Received(seen.id)))  # carol's cursor moves past it
    carol.send(p.encode(p.MarkRead("alice", seen.id, receipt=False)))  # and her read position
    carol.send(p.encode(p.Send("c1", "alice", "carol's answer", reply_to=seen.id)))
    assert isinstance(recv_frame(carol), p.Ack)
    carol.close()
    alice.close()
    assert single.stop() == 0

    move = chatcli("migrate-to-redis", "--db", str(db), "--redis", redis.url)
    assert move.wait() == 0, move.err
    assert "moved 5 of 5 messages (100%)" in move.err[0]
    assert "moved 5 messages to 3 users and 3 accounts" in move.err[-1]

    node = start_server_process(["--redis", redis.url])
    try:
        bob, bob_hello = native(node.ws_url, "bob", key=tokens["bob"])  # the old token still works
        assert bob_hello.epoch == hello.epoch  # the same store: clients' cursors stay valid
        got = [recv_frame(bob) for _ in stored]
        assert [(m.id, m.text) for m in got] == [(a.msg_id, f"for bob {i}")  # type: ignore[union-attr]
                                                 for i, a in enumerate(stored)]
        carol, _ = native(node.ws_url, "carol", key=tokens["carol"])
        carol.send(p.encode(p.HistoryRequest("h", "alice")))
        history = recv_frame(carol)  # nothing replayed first: its cursor came across
        assert isinstance(history, p.History)
        assert [(m.sender, m.text, m.reply_to) for m in history.messages] == [
            ("alice", "seen by carol", None), ("carol", "carol's answer", seen.id)]
        carol.send(p.encode(p.InboxRequest("i")))
        inbox = recv_frame(carol)  # the read position and its receipt flag came across
        assert isinstance(inbox, p.Inbox)
        assert [(c.peer, c.read, c.unread) for c in inbox.conversations] == [("alice", seen.id, 0)]
        # Accounts: who shows contacts only, and they came across: alice talked with both, they never did.
        _alice, _ = native(node.ws_url, "alice", key=tokens["alice"],
                           headers={p.REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"})
        for session, me in ((carol, "carol"), (bob, "bob")):
            session.send(p.encode(p.WhoRequest("w")))
            assert recv_frame(session) == p.Who("w", ("alice", me))
        resent = send_native(bob, "alice", "after the move")
        assert resent.accepted and resent.msg_id is not None and resent.msg_id > stored[-1].msg_id  # type: ignore[operator]
        # The moved conversation (an entry a message) goes on in runs (an entry a commit): counts, history and
        # replies see both.
        for i in range(2):  # sent together: most often one commit
            _alice.send(p.encode(p.Send(f"l{i}", "bob", f"later {i}")))
        assert [next_of(_alice, p.Ack).accepted for _ in range(2)] == [True, True]
        assert [next_of(bob, p.Message).text for _ in range(2)] == ["later 0", "later 1"]
        bob.send(p.encode(p.InboxRequest("i")))
        assert [(c.peer, c.unread) for c in next_of(bob, p.Inbox).conversations] == [("alice", 5)]
        bob.send(p.encode(p.MarkRead("alice", stored[1].msg_id)))  # type: ignore[arg-type]
        bob.send(p.encode(p.InboxRequest("i")))
        inbox = next_of(bob, p.Inbox)
        assert [(c.peer, c.unread) for c in inbox.conversations] == [("alice", 3)]  # for bob 2, later 0 and 1
        bob.send(p.encode(p.Send("b2", "alice", "re: the first", reply_to=stored[0].msg_id)))
        assert next_of(bob, p.Ack).accepted
        bob.send(p.encode(p.HistoryRequest("h", "alice")))
        assert [m.text for m in next_of(bob, p.History).messages] == [
            "for bob 0", "for bob 1", "for bob 2", "after the move", "later 0", "later 1", "re: the first"]
    finally:
        kill_leftovers([node.proc])

    again = chatcli("migrate-to-redis", "--db", str(db), "--redis", redis.url)
    assert again.wait() == 1 and "already holds a chatcli store" in again.err[-1]
    missing = chatcli("migrate-to-redis", "--db", str(tmp_path / "nothing.db"), "--redis", redis.url)
    assert missing.wait() == 1 and "no database at" in missing.err[-1]
