"""Issues 12 and 13 on a cluster: read positions, the inbox, receipts, typing, replies and search work
across ``chatcli serve --redis`` nodes as on one server. Two nodes on one real redis-server, shared by the
module (each test has its own user names); the unread and search bounds in process, on the engine."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatcli import protocol as p
from chatcli.errors import StorageError
from chatcli.server.engine import redis_search
from chatcli.server.engine.base import InboxPage, NewMessage
from chatcli.server.engine.redis_lua import RUN_MAX, UNREAD_COUNT_MAX
from tests.client.test_repl import Terminal
from tests.server.fakes import make_engine
from tests.support.processes import RunningServer, kill_leftovers, start_server_process, wait_until
from tests.support.redis_server import RedisServer, redis_cli, shared_redis
from tests.support.wsclients import native, next_of, recv_frame, send_native


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, RunningServer]]:
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    started: list[RunningServer] = []
    try:
        started += [start_server_process(["--redis", redis.url]) for _ in range(2)]
        yield started[0], started[1]
    finally:
        kill_leftovers(node.proc for node in started)
        redis.stop()


def online_on(node: RunningServer, user: str, asker: str) -> bool:
    ws, _ = native(node.ws_url, asker, headers={p.REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"})
    ws.send(p.encode(p.WhoRequest("w")))
    answer = recv_frame(ws)
    ws.close()
    return isinstance(answer, p.Who) and user in answer.users


def test_a_read_through_one_node_is_kept_told_and_counted_through_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    alice, hello = native(one.ws_url, "alice1")
    assert {p.Feature.READS, p.Feature.RECEIPTS, p.Feature.TYPING, p.Feature.REPLIES} <= set(hello.features)
    alice_elsewhere, _ = native(two.ws_url, "alice1")
    bob, _ = native(two.ws_url, "bob1")
    wait_until(lambda: online_on(one, "bob1", "x1") and online_on(two, "alice1", "y1"), 5, "presence across nodes")
    ids = [send_native(bob, "alice1", f"news {n}").msg_id for n in range(3)]
    assert [next_of(alice, p.Message).id for _ in ids] == ids
    alice.send(p.encode(p.MarkRead("bob1", ids[1])))  # through node one
    assert next_of(alice_elsewhere, p.ReadPosition) == p.ReadPosition("bob1", ids[1])  # her session on node two
    assert next_of(bob, p.Receipt) == p.Receipt("alice1", ids[1])  # the sender, on node two
    later, _ = native(two.ws_url, "alice1", headers={p.REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"})
    later.send(p.encode(p.InboxRequest("i")))
    inbox = next_of(later, p.Inbox)
    assert [(c.peer, c.unread, c.read, c.last_id, c.preview) for c in inbox.conversations] == [
        ("bob1", 1, ids[1], ids[2], "news 2")]
    bob.send(p.encode(p.InboxRequest("b")))  # bob learns how far alice read: she sends receipts
    assert [(c.peer, c.unread, c.peer_read) for c in next_of(bob, p.Inbox).conversations] == [("alice1", 0, ids[1])]
    alice.send(p.encode(p.MarkRead("bob1", ids[0])))  # never back
    assert next_of(alice_elsewhere, p.ReadPosition) == p.ReadPosition("bob1", ids[1])


def test_two_chats_on_two_nodes_see_typing_receipts_and_unread_counts(
        nodes: tuple[RunningServer, RunningServer], tmp_home: Path) -> None:
    """issue 12's first REPL test, each user on another node: what the chat shows comes across."""
    one, two = nodes
    alice = Terminal(["alice5", "bob5", "--url", one.ws_url], {})
    bob = Terminal(["bob5", "alice5", "--url", two.ws_url], {})
    try:
        alice.wait_for("bob5 online")
        bob.wait_for("alice5 online")
        carol, _ = native(two.ws_url, "carol5", headers={p.REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"})
        send_native(carol, "alice5", "psst")  # through node two, for alice's other conversation
        alice.wait_for("[1 unread: carol5 1]")
        bob.type("hello ali")
        alice.wait_for("bob5 is typing…")
        bob.type("ce\r")
        alice.wait_for("bob5: hello alice")
        bob.wait_for("bob5: hello alice  ✓✓ read")  # alice's chat on node one showed it
        for term in (alice, bob):
            term.type("/quit\r")
            assert term.proc.wait(timeout=10) == 0
    finally:
        alice.close()
        bob.close()


def test_typing_crosses_nodes_once_per_interval_and_never_to_the_offline(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    alice, _ = native(one.ws_url, "alice2")
    bob, _ = native(two.ws_url, "bob2")
    wait_until(lambda: online_on(one, "bob2", "x2"), 5, "bob online on node one")
    alice.send(p.encode(p.Typing("bob2")))
    assert next_of(bob, p.PeerTyping) == p.PeerTyping("alice2")
    alice.send(p.encode(p.Typing("bob2")))  # within the interval: dropped at node one
    send_native(alice, "bob2", "a message after")
    assert isinstance(recv_frame(bob, events=True), p.Message)  # not a second typing before it
    alice.send(p.encode(p.Typing("carol2")))  # offline: nothing published, nothing kept
    send_native(alice, "bob2", "still here")


def test_replies_cross_nodes_live_in_history_and_in_a_backlog(nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    alice, _ = native(one.ws_url, "alice3")
    bob, _ = native(two.ws_url, "bob3")
    wait_until(lambda: online_on(one, "bob3", "x3"), 5, "bob online on node one")
    question = send_native(alice, "bob3", "deploy?").msg_id
    assert next_of(bob, p.Message).id == question
    bob.send(p.encode(p.Send("r1", "alice3", "yes", reply_to=question)))
    bob.send(p.encode(p.Send("r2", "carol3", "not your conversation", reply_to=question)))
    acks = [next_of(bob, p.Ack), next_of(bob, p.Ack)]
    assert [(a.status, a.reason) for a in acks] == [(p.Status.DELIVERED, None), (p.Status.REFUSED, p.Reason.BAD_REPLY)]
    live = next_of(alice, p.Message)  # committed on node two, delivered by node one from Redis
    assert (live.text, live.reply_to) == ("yes", question)
    alice.close()
    wait_until(lambda: not online_on(two, "alice3", "y3"), 5, "alice offline on node two")
    assert send_native(bob, "alice3", "and later", client_id="r3").status == p.Status.STORED
    bob.send(p.encode(p.Send("r4", "alice3", "also this", reply_to=live.id)))
    assert next_of(bob, p.Ack).accepted
    back, _ = native(two.ws_url, "alice3")  # the backlog, through the other node
    backlog = [next_of(back, p.Message) for _ in range(3)]
    assert [(m.text, m.reply_to) for m in backlog] == [("yes", question), ("and later", None), ("also this", live.id)]
    back.send(p.encode(p.HistoryRequest("h", "bob3")))
    history = next_of(back, p.History)
    assert [m.reply_to for m in history.messages] == [None, question, None, live.id]


def test_unread_counts_are_exact_within_their_bound(tmp_path: Path) -> None:
    engine = make_engine("redis", tmp_path)
    try:
        count = 2 * UNREAD_COUNT_MAX + 50
        for n in range(count):  # one message a commit: a run of one id each in the conversation stream
            engine.append([NewMessage("bob", "alice", f"m{n}", 1000.0)], {}, lambda _: None)
        # carol's come in one commit: one run of them all
        engine.append([NewMessage("carol", "alice", f"c{n}", 1000.0) for n in range(count)], {}, lambda _: None)
        bob_ids = range(1, count + 1)
        carol_ids = range(count + 1, 2 * count + 1)

        def unread_after(peer: str, position: int) -> int:
            engine.mark_read({("alice", peer): (position, True)}, lambda _: None)
            pages: list[InboxPage] = []
            engine.read_inbox("alice", 10, pages.append)
            (conversation,) = [c for c in pages[0].conversations if c.peer == peer]
            assert conversation.read == position and conversation.last.text[1:] == str(count - 1)
            return conversation.unread

        # Exact when nothing or everything is read, or either side of the position is within the bound (in
        # runs); past it on both sides, the bound (a lower bound: "100 or more").
        positions = (0, 50, UNREAD_COUNT_MAX + 20, count - 30, count)
        assert [unread_after("bob", bob_ids[n - 1] if n else 0) for n in positions] == [
            count, count - 50, UNREAD_COUNT_MAX, 30, 0]
        # A run is counted id by id: carol's one run is exact at every position, and her conversation starts
        # after bob's (a position before it: all of hers).
        assert [unread_after("carol", carol_ids[n - 1] if n else 0) for n in positions] == [
            count, count - 50, count - UNREAD_COUNT_MAX - 20, 30, 0]
        # A conversation that does not exist keeps no position: the read hash grows with contacts only.
        kept: list[Any] = []
        engine.mark_read({("alice", "nobody"): (5, True)}, kept.append)
        assert kept == [{("alice", "nobody"): 0}]
        assert redis_cli(shared_redis(), "HEXISTS", "{u:alice}:r", "nobody") == "0"
    finally:
        engine.close()


def test_retention_deletes_a_conversation_run_once_all_of_it_is_pruned(tmp_path: Path) -> None:
    engine = make_engine("redis", tmp_path)
    try:
        engine.presence.joined("alice")
        engine.append([NewMessage("bob", "alice", "old", 10.0), NewMessage("bob", "alice", "new", 20.0)], {},
                      lambda _: None)  # one commit: one run of two ids
        engine.append([], {"alice": 2}, lambda _: None)  # acknowledged: only then prunable
        asyncio.run(engine.settle())

        def conversation() -> tuple[list[str], list[tuple[str, int]]]:
            answers: list[Any] = []
            engine.read_history("alice", p.HistoryRequest("h", "bob"), answers.append)
            engine.read_inbox("alice", 10, answers.append)
            history = p.parse_server_frame(answers[0])
            assert isinstance(history, p.History)
            return [m.text for m in history.messages], [(c.peer, c.unread) for c in answers[1].conversations]

        assert asyncio.run(engine.prune(15.0, 100)) == 1
        assert conversation() == (["new"], [("bob", 1)])  # the run stays for "new"; "old" is no longer counted
        assert redis_cli(shared_redis(), "XLEN", "{u:alice}:p:bob") == "1"
        assert asyncio.run(engine.prune(25.0, 100)) == 1
        assert conversation() == ([], [])
        assert redis_cli(shared_redis(), "XLEN", "{u:alice}:p:bob") == "0"
        assert redis_cli(shared_redis(), "HINCRBY", "{u:alice}:n", "bob", "0") == "0"  # no id beyond a first left
    finally:
        engine.close()


def test_search_through_another_node_finds_both_directions(nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    alice, _ = native(one.ws_url, "alice4")
    sent = send_native(alice, "bob4", "the deploy is at noon").msg_id
    bob, _ = native(two.ws_url, "bob4")  # alice's message comes first, from his backlog
    bob.send(p.encode(p.Send("b1", "alice4", "noon deploy: fine")))
    answered = next_of(bob, p.Ack).msg_id
    bob.send(p.encode(p.SearchRequest("s", "DEPLOY noon")))
    assert [m.id for m in next_of(bob, p.Search).messages] == [answered, sent]


def search_texts(engine: Any, user: str, text: str, **fields: Any) -> tuple[list[str], bool]:
    answers: list[Any] = []
    engine.read_search(user, p.SearchRequest("s", text, **fields), answers.append)
    frame = p.parse_server_frame(answers[0])
    assert isinstance(frame, p.Search)
    return [m.text for m in frame.messages], frame.more


def test_a_search_merges_every_conversation_newest_first_and_says_more_when_its_bound_cut_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine("redis", tmp_path)
    try:
        batch = [NewMessage("alice", "bob", "needle, the oldest", 1000.0)]
        for n in range(200):  # both directions with five peers, interleaved: eleven streams to merge
            peer = f"peer{n % 5}"
            batch.append(NewMessage(peer, "alice", f"hay {n}", 1000.0) if n % 2 else
                         NewMessage("alice", peer, f"hay {n}", 1000.0))
        engine.append(batch, {}, lambda _: None)
        texts, more = search_texts(engine, "alice", "hay", limit=100)
        assert texts == [f"hay {n}" for n in range(199, 99, -1)] and not more
        assert search_texts(engine, "alice", "needle") == (["needle, the oldest"], False)
        monkeypatch.setattr(redis_search, "SCAN_MAX_ENTRIES", 100)
        assert search_texts(engine, "alice", "needle") == ([], True)  # cut short: the client may page on
    finally:
        engine.close()


def test_a_burst_to_one_peer_is_kept_in_bounded_runs_and_read_page_by_page(tmp_path: Path) -> None:
    engine = make_engine("redis", tmp_path)
    try:
        count = 3 * RUN_MAX + 5  # one commit: more than one run's worth from bob to alice
        engine.append([NewMessage("bob", "alice", f"{'needle ' if n % 3 == 0 else ''}m{n}", 1000.0)
                       for n in range(count)], {}, lambda _: None)
        assert redis_cli(shared_redis(), "XLEN", "{u:alice}:p:bob") == str(-(-count // RUN_MAX))

        def history(before: int | None) -> list[int]:
            answers: list[Any] = []
            engine.read_history("alice", p.HistoryRequest("h", "bob", limit=7, before=before), answers.append)
            frame = p.parse_server_frame(answers[0])
            assert isinstance(frame, p.History)
            return [m.id for m in frame.messages]

        pages, before = [], None  # paging back across the runs' edges loses and repeats nothing
        while page := history(before):
            pages.append(page)
            before = page[0]
        assert [msg_id for page in reversed(pages) for msg_id in page] == list(range(1, count + 1))
        assert all(len(page) == 7 for page in pages[:-1])  # full pages but the oldest
        found, more = search_texts(engine, "alice", "needle", limit=count)
        assert found == [f"needle m{n}" for n in reversed(range(0, count, 3))] and not more
    finally:
        engine.close()


def test_history_unread_counts_and_search_agree_with_sqlite_over_random_batches(tmp_path: Path) -> None:
    """Runs are cut by batch, pair and RUN_MAX: whatever the cut, the Redis engine answers as the SQLite one
    (which keeps one row per message) for every page, read position and search."""
    rng = random.Random(18)
    users = ["u0", "u1", "u2"]
    engines = [make_engine("redis", tmp_path), make_engine("sqlite", tmp_path)]
    try:
        per_pair = []  # how many messages each pair has in each batch: its runs there
        for number in range(30):
            batch = [NewMessage(*rng.sample(users, 2), f"batch{number} word{rng.randrange(5)}", 1000.0 + number)
                     for _ in range(rng.randint(1, 250))]
            per_pair += collections.Counter((m.sender, m.recipient) for m in batch).values()
            for engine in engines:
                engine.append(batch, {}, lambda _: None)
        assert min(per_pair) == 1 and max(per_pair) > RUN_MAX  # runs of one, and runs cut at RUN_MAX
        top = engines[1].highest_id()

        def both(read: str, *args: Any) -> list[Any]:
            """What ``read`` (an engine method taking ``done`` last) answers on each engine."""
            return [_answer_of(getattr(engine, read), *args) for engine in engines]

        for me, peer in itertools.permutations(users, 2):
            for before in [None, *rng.sample(range(1, top + 2), 8)]:
                limit = rng.choice([1, 7, 32, 50])
                redis_page, sqlite_page = both("read_history", me, p.HistoryRequest("h", peer, limit, before))
                assert redis_page == sqlite_page, (me, peer, before, limit)
            for position in rng.sample(range(top + 1), 6):
                for engine in engines:
                    engine.mark_read({(me, peer): (position, True)}, lambda _: None)
                redis_inbox, sqlite_inbox = both("read_inbox", me, 10)
                assert [(c.peer, c.unread, c.read) for c in redis_inbox.conversations] == [
                    (c.peer, c.unread, c.read) for c in sqlite_inbox.conversations], (me, peer, position)
            words = f"word{rng.randrange(5)} batch{rng.randrange(30)}"
            redis_found, sqlite_found = both("read_search", me, p.SearchRequest("s", words, peer=peer, limit=20))
            assert redis_found == sqlite_found, (me, peer, words)
    finally:
        for engine in engines:
            engine.close()


def _answer_of(read: Any, *args: Any) -> Any:
    got: list[Any] = []
    read(*args, got.append)
    assert len(got) == 1 and not isinstance(got[0], StorageError), got
    return got[0]


def test_a_read_that_fails_unexpectedly_is_answered_as_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a read must not leave its request unanswered: the relay would refuse that session's next
    inbox request for ever ("an inbox request is being answered")."""
    engine = make_engine("redis", tmp_path)
    try:
        monkeypatch.setattr("chatcli.server.engine.redis_engine.scan_streams", None)  # calling it raises TypeError
        answers: list[Any] = []
        with caplog.at_level("ERROR", "chatcli.server"):
            engine.read_search("alice", p.SearchRequest("s", "lunch"), answers.append)
        assert len(answers) == 1 and isinstance(answers[0], StorageError)
        assert "a read failed" in caplog.text
    finally:
        engine.close()
