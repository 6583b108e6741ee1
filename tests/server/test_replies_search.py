"""Issue 13 on the server side, in process: replies through the relay (the legacy codec unchanged, an engine
without replies), search requests (rate limit, ephemeral refusal), and the search index in the SQLite file
(migration of an existing file, pruning)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from chatcli import protocol as p
from chatcli.server.codecs import LEGACY
from chatcli.server.engine.base import Capability, Engine
from chatcli.server.engine.memory import MemoryEngine
from chatcli.server.engine.pages import SearchScan
from chatcli.server.storage import (
    MESSAGE_MIGRATIONS,
    MESSAGES_COMPONENT,
    NewMessage,
    SQLiteStore,
    migrate,
    open_database,
)
from tests.server.fakes import RecordingSession
from tests.server.test_relay import Ticks, relay_on
from tests.support.flutter_app import decode_legacy_message


def test_a_reply_reaches_native_sessions_with_reply_to_and_seed_apps_as_plain_text(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, bob, seed = RecordingSession("alice"), RecordingSession("bob"), RecordingSession("alice", codec=LEGACY)
    for session in (alice, bob, seed):
        relay.open_session(session)
    relay.on_native_text(alice, p.encode(p.Send("q1", "bob", "deploy?")))
    ticks.end()
    (question,) = alice.acks()
    assert question.msg_id is not None
    relay.on_native_text(bob, p.encode(p.Send("r1", "alice", "yes 'go'", reply_to=question.msg_id)))
    relay.on_native_text(bob, p.encode(p.Send("r2", "carol", "not yours", reply_to=question.msg_id)))
    ticks.end()
    if Capability.REPLIES not in engine.capabilities:  # the relay refuses every reply (no engine here, today)
        assert [(a.status, a.reason) for a in bob.acks()] == [(p.Status.REFUSED, p.Reason.BAD_REPLY)] * 2
        return
    answer = [f for f in alice.frames() if isinstance(f, p.Message)]
    assert [(m.text, m.reply_to) for m in answer] == [("yes 'go'", question.msg_id)]
    assert decode_legacy_message(seed.sent[-1]) == ("bob", "yes 'go'")
    assert [(a.status, a.reason) for a in bob.acks()] == [(p.Status.DELIVERED, None),
                                                          (p.Status.REFUSED, p.Reason.BAD_REPLY)]


class _NoReplies(MemoryEngine):
    """An engine without ``Capability.REPLIES`` (an older or a partial engine)."""

    capabilities = frozenset()


def test_an_engine_without_replies_refuses_a_reply_and_keeps_plain_messages() -> None:
    ticks = Ticks()
    relay = relay_on(_NoReplies(), ticks)
    alice, bob = RecordingSession("alice"), RecordingSession("bob")
    relay.open_session(alice)
    relay.open_session(bob)
    assert p.Feature.REPLIES not in relay.features
    relay.on_native_text(bob, p.encode(p.Send("r1", "alice", "yes", reply_to=1)))
    relay.on_native_text(bob, p.encode(p.Send("r2", "alice", "plain")))
    ticks.end()
    assert [(a.status, a.reason) for a in bob.acks()] == [(p.Status.REFUSED, p.Reason.BAD_REPLY),
                                                          (p.Status.DELIVERED, None)]
    assert alice.texts() == ["plain"]


def test_search_is_rate_limited_and_refused_where_nothing_is_kept(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks, rate=1.0, burst=2)
    alice = RecordingSession("alice")
    relay.open_session(alice)
    for n in range(3):
        relay.on_native_text(alice, p.encode(p.SearchRequest(f"s{n}", "lunch")))
    ticks.end()
    first, _, third = alice.frames()
    assert isinstance(third, p.Error) and third.code == p.ErrorCode.RATE_LIMITED and third.details == {"id": "s2"}
    if Capability.SEARCH not in engine.capabilities:
        assert isinstance(first, p.Error) and first.code == p.ErrorCode.UNAVAILABLE
        assert first.details == {"id": "s0"} and "no search" in first.message
    else:
        assert first == p.Search("s0", ())


def _old_file(path: Path) -> None:
    """A file as a server before issue 13 left it: messages v2, no search index, two messages."""
    conn = open_database(path)
    migrate(conn, MESSAGES_COMPONENT, MESSAGE_MIGRATIONS[:2])
    conn.executemany("INSERT INTO messages (sender, recipient, text, ts) VALUES (?, ?, ?, ?)",
                     [("alice", "bob", "old lunch", 1.0), ("bob", "alice", "old dinner", 2.0)])
    conn.close()


def test_an_existing_file_gains_replies_and_a_search_index_of_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_file(path)
    with SQLiteStore(path) as store:
        assert [m.text for m in store.iter_search("bob", "old", SearchScan())] == ["old dinner", "old lunch"]
        appended = store.append([NewMessage("alice", "bob", "re: dinner", 3.0, None, 2)])
        assert appended.bad_replies == frozenset() and store.history("alice", "bob")[-1].reply_to == 2


def test_pruned_messages_leave_the_index_and_can_no_longer_be_replied_to(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "chat.db") as store:
        store.append([NewMessage("alice", "bob", f"lunch {n}", float(n), None) for n in range(1, 5)])
        assert len(list(store.iter_search("bob", "lunch", SearchScan()))) == 4
        assert store.prune(2.5) == 2
        assert [m.text for m in store.iter_search("bob", "lunch", SearchScan())] == ["lunch 4", "lunch 3"]
        assert store.append([NewMessage("bob", "alice", "late", 9.0, None, 1)]).bad_replies == {0}
        conn = sqlite3.connect(tmp_path / "chat.db")
        assert conn.execute("INSERT INTO message_search (message_search) VALUES ('integrity-check')")
        conn.close()


def test_a_search_that_reads_too_much_stops_and_says_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("chatcli.server.storage.SEARCH_MAX_STEPS", 1000)  # stop at the first progress check
    with SQLiteStore(tmp_path / "chat.db") as store:
        store.append([NewMessage("alice", "bob", "word", 1.0, None) for _ in range(2000)])
        scan = SearchScan()
        assert len(list(store.iter_search("carol", "word", scan))) == 0 and scan.cut


def test_searches_have_a_bucket_of_their_own(tmp_path: Path) -> None:
    from chatcli.server.relay import SEARCH_BURST
    from tests.server.fakes import make_engine

    ticks = Ticks()
    relay = relay_on(make_engine("sqlite", tmp_path), ticks)
    alice = RecordingSession("alice")
    relay.open_session(alice)
    for n in range(SEARCH_BURST + 1):
        relay.on_native_text(alice, p.encode(p.SearchRequest(f"s{n}", "lunch")))
    relay.on_native_text(alice, p.encode(p.HistoryRequest("h", "bob")))  # other requests are not affected
    ticks.end()
    *answers, refused, history = alice.frames()
    assert all(isinstance(a, p.Search) for a in answers) and len(answers) == SEARCH_BURST
    assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.RATE_LIMITED
    assert refused.details == {"id": f"s{SEARCH_BURST}"} and "too many searches" in refused.message
    assert isinstance(history, p.History)


def test_searches_wait_in_the_history_queue_and_a_full_queue_names_the_search(tmp_path: Path) -> None:
    from chatcli.server.relay import HISTORY_QUEUE
    from tests.server.fakes import make_engine

    class Stalled(RecordingSession):
        """Never drains: the first answer stays unread, the others wait in the queue."""

        def when_drained(self, callback: object) -> None:
            return None

    ticks = Ticks()
    relay = relay_on(make_engine("sqlite", tmp_path), ticks)
    alice = Stalled("alice")
    relay.open_session(alice)
    relay.on_native_text(alice, p.encode(p.HistoryRequest("h", "bob")))
    for n in range(HISTORY_QUEUE + 1):
        relay.on_native_text(alice, p.encode(p.SearchRequest(f"s{n}", "lunch")))
    ticks.end()
    history, refused = alice.frames()
    assert isinstance(history, p.History)
    assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.UNAVAILABLE
    assert refused.details == {"id": f"s{HISTORY_QUEUE}"}
