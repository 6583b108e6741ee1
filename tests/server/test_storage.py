"""The SQLite message store, on real database files."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcli.errors import StorageError
from chatcli.server.storage import (
    CONTACTS_COMPONENT,
    INSERT_ROWS_MAX,
    MESSAGE_MIGRATIONS,
    MESSAGES_COMPONENT,
    Appended,
    NewMessage,
    SQLiteStore,
    StoredMessage,
    migrate,
    open_component,
    open_database,
    schema_version,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(db_path) as opened:
        yield opened


def msg(sender: str, recipient: str, text: str, ts: float = 1000.0, client_id: str | None = None) -> NewMessage:
    return NewMessage(sender, recipient, text, ts, client_id)


def texts(messages: list[StoredMessage]) -> list[str]:
    return [m.text for m in messages]


# -- append ------------------------------------------------------------------


def test_append_returns_increasing_ids_and_the_stored_fields(store: SQLiteStore) -> None:
    first = store.append([msg("alice", "bob", "one", 1.5), msg("bob", "alice", "two", 2.5, "c-1")])
    second = store.append([msg("alice", "bob", "three")])

    ids = [*first.ids, *second.ids]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert not first.duplicates and not second.duplicates
    # The ids handed back are the ids in the file, with the fields stored.
    assert store.history("alice", "bob") == [
        StoredMessage(ids[0], "alice", "bob", "one", 1.5, None),
        StoredMessage(ids[1], "bob", "alice", "two", 2.5, "c-1"),
        StoredMessage(ids[2], "alice", "bob", "three", 1000.0, None),
    ]


@pytest.mark.parametrize("size", [1, 7, INSERT_ROWS_MAX - 1, INSERT_ROWS_MAX, INSERT_ROWS_MAX + 1,
                                  3 * INSERT_ROWS_MAX + 77])
def test_a_batch_of_any_size_is_stored_in_order_with_consecutive_ids(store: SQLiteStore, size: int) -> None:
    store.append([msg("alice", "bob", "before")])
    batch = [msg(f"u{i % 3}", "bob", f"m{i}", 1000.0 + i, None if i % 2 else f"c{i}") for i in range(size)]

    ids = list(store.append(batch).ids)

    assert ids == list(range(2, size + 2))
    assert store.messages_to("bob", after_id=1, limit=size) == [StoredMessage(i, *row) for i, row in zip(ids, batch,
                                                                                                          strict=True)]


def test_a_retry_far_into_a_large_batch_is_still_found(store: SQLiteStore) -> None:
    batch = [msg("alice", "bob", f"m{i}", client_id=f"k{i}") for i in range(2 * INSERT_ROWS_MAX)]
    batch.append(msg("alice", "bob", "again", client_id="k3"))  # a retry of row 3, in another statement

    appended = store.append(batch)

    assert appended.duplicates == {len(batch) - 1} and appended.ids[-1] == appended.ids[3]
    assert len(store.messages_to("bob", limit=1000)) == 2 * INSERT_ROWS_MAX


def test_empty_batch_stores_nothing(store: SQLiteStore) -> None:
    assert store.append([]) == Appended((), frozenset())
    assert store.messages_to("bob") == []


def test_a_batch_is_one_transaction_a_bad_row_stores_none_of_it(store: SQLiteStore) -> None:
    store.append([msg("alice", "bob", "before")])
    bad = NewMessage("alice", "bob", None, 1.0, None)  # type: ignore[arg-type]  # NOT NULL text

    with pytest.raises(StorageError):
        store.append([msg("alice", "bob", "lost 1"), bad, msg("alice", "bob", "lost 2")])

    assert texts(store.messages_to("bob")) == ["before"]
    # The store is still usable after the failed batch.
    store.append([msg("alice", "bob", "after")])
    assert texts(store.messages_to("bob")) == ["before", "after"]


def test_retry_with_the_same_client_id_returns_the_original(store: SQLiteStore) -> None:
    (original,) = store.append([msg("alice", "bob", "hi", 1.0, "k1")]).ids
    appended = store.append([msg("alice", "bob", "hi again", 2.0, "k1"), msg("alice", "bob", "new", 3.0, "k2")])

    retry, fresh = appended.ids
    assert appended.duplicates == {0} and retry == original
    assert fresh > original
    assert texts(store.messages_to("bob")) == ["hi", "new"]


def test_duplicates_within_one_batch_are_stored_once(store: SQLiteStore) -> None:
    results = store.append(
        [
            msg("alice", "bob", "a", client_id="k1"),
            msg("alice", "bob", "b"),
            msg("alice", "bob", "a (retry)", client_id="k1"),
            msg("alice", "bob", "c"),
        ]
    )

    assert results.duplicates == {2}
    assert results.ids[2] == results.ids[0]
    assert texts(store.messages_to("bob")) == ["a", "b", "c"]
    ids = [results.ids[i] for i in (0, 1, 3)]
    assert ids == sorted(ids)


def test_a_batch_mixing_messages_with_and_without_client_ids_keeps_each_ones_id(store: SQLiteStore) -> None:
    """Batches without client ids leave the column out of the INSERT; a mixed batch must still store each."""
    first = store.append([msg("alice", "bob", "legacy 1"), msg("alice", "bob", "native", client_id="k1"),
                          msg("alice", "bob", "legacy 2")])
    plain = store.append([msg("alice", "bob", "legacy 3"), msg("alice", "bob", "legacy 3")])  # no id: two messages
    retry = store.append([msg("alice", "bob", "native (retry)", client_id="k1")])

    assert retry.ids == [first.ids[1]] and retry.duplicates == {0}
    assert len(set(plain.ids)) == 2 and not plain.duplicates
    assert texts(store.messages_to("bob")) == ["legacy 1", "native", "legacy 2", "legacy 3", "legacy 3"]


def test_client_ids_are_per_sender(store: SQLiteStore) -> None:
    results = store.append(
        [msg("alice", "carol", "from alice", client_id="k"), msg("bob", "carol", "from bob", client_id="k")]
    )
    assert not results.duplicates
    assert texts(store.messages_to("carol")) == ["from alice", "from bob"]


# -- cursors and reading ---------------------------------------------------------


def test_cursor_starts_at_zero_and_never_moves_back(store: SQLiteStore) -> None:
    assert store.cursor("bob") == 0
    store.advance_cursor("bob", 7)
    store.advance_cursor("bob", 3)
    assert store.cursor("bob") == 7

    store.advance_cursors({"bob": 5, "carol": 2, "dave": 9})
    assert (store.cursor("bob"), store.cursor("carol"), store.cursor("dave")) == (7, 2, 9)
    store.advance_cursors({"bob": 8})
    assert store.cursor("bob") == 8


def test_pending_is_what_follows_the_cursor_in_order(store: SQLiteStore) -> None:
    ids = store.append([msg("alice", "bob", f"m{i}") for i in range(5)] + [msg("bob", "alice", "reply")]).ids

    assert texts(store.pending("bob")) == ["m0", "m1", "m2", "m3", "m4"]
    store.advance_cursor("bob", ids[1])
    assert texts(store.pending("bob")) == ["m2", "m3", "m4"]
    assert texts(store.pending("bob", limit=2)) == ["m2", "m3"]
    assert texts(store.pending("bob", after_id=ids[3])) == ["m4"]
    assert texts(store.pending("alice")) == ["reply"]


def test_messages_to_filters_by_id_and_time(store: SQLiteStore) -> None:
    ids = store.append([msg("alice", "bob", f"t{ts}", ts=float(ts)) for ts in (10, 20, 30, 40)]).ids

    assert texts(store.messages_to("bob")) == ["t10", "t20", "t30", "t40"]
    assert texts(store.messages_to("bob", since_ts=20.0)) == ["t20", "t30", "t40"]
    assert texts(store.messages_to("bob", after_id=ids[2])) == ["t40"]
    assert texts(store.messages_to("bob", after_id=ids[0], since_ts=30.0, limit=1)) == ["t30"]
    assert store.messages_to("nobody") == []


def test_history_is_the_last_messages_of_a_conversation_oldest_first(store: SQLiteStore) -> None:
    batch = []
    for i in range(6):
        batch.append(msg("alice", "bob", f"a{i}") if i % 2 == 0 else msg("bob", "alice", f"b{i}"))
        batch.append(msg("alice", "carol", f"other{i}"))
        batch.append(msg("carol", "bob", f"other{i}"))
    ids = store.append(batch).ids
    conversation = [i for i, m in zip(ids, batch, strict=True) if {m.sender, m.recipient} == {"alice", "bob"}]

    assert texts(store.history("alice", "bob")) == ["a0", "b1", "a2", "b3", "a4", "b5"]
    assert store.history("bob", "alice") == store.history("alice", "bob")
    assert texts(store.history("alice", "bob", limit=3)) == ["b3", "a4", "b5"]
    assert texts(store.history("alice", "bob", limit=2, before_id=conversation[3])) == ["b1", "a2"]
    assert store.history("alice", "nobody") == []


def test_history_with_oneself_lists_each_message_once(store: SQLiteStore) -> None:
    store.append([msg("alice", "alice", "note 1"), msg("alice", "alice", "note 2")])
    assert texts(store.history("alice", "alice")) == ["note 1", "note 2"]


def test_negative_limit_is_refused(store: SQLiteStore) -> None:
    with pytest.raises(ValueError):
        store.history("alice", "bob", limit=-1)


def test_reads_see_every_message_however_much_is_indexed_yet(db_path: Path) -> None:
    total = 5000  # past the lag allowed, so commits index part of the tail and leave the rest
    with SQLiteStore(db_path, index_lag_max=1000) as writer, SQLiteStore(db_path) as reader:
        for start in range(0, total, 700):
            writer.append([msg("alice", "bob", f"m{i}") for i in range(start, min(start + 700, total))])
            # Another connection (another process, say) sees what was just committed.
            assert reader.messages_to("bob", limit=total)[-1].text == f"m{min(start + 700, total) - 1}"
            assert writer.unindexed_rows() <= 1000 + 700
        writer.append([msg("bob", "alice", "reply")])
        assert writer.unindexed_rows() > 0  # the backlog below reads both the index and the tail

        got = writer.messages_to("bob", limit=total + 1)
        assert texts(got) == [f"m{i}" for i in range(total)]
        assert texts(writer.messages_to("bob", after_id=got[100].id, limit=3)) == ["m101", "m102", "m103"]
        assert texts(writer.messages_to("bob", after_id=got[-3].id)) == [f"m{total - 2}", f"m{total - 1}"]
        assert texts(writer.history("alice", "bob", limit=2)) == [f"m{total - 1}", "reply"]
        while writer.index_some():  # what the server does when quiet
            pass
        assert writer.unindexed_rows() == 0
        assert texts(reader.messages_to("bob", limit=total + 1)) == texts(got)
        assert writer.prune(older_than_ts=1e12) == total + 1
        assert reader.messages_to("bob") == [] and writer.history("alice", "bob") == []


# -- contacts (for --presence contacts) ------------------------------------------


def test_contacts_are_whoever_exchanged_a_message_either_way(store: SQLiteStore) -> None:
    store.append([msg("alice", "bob", "hi"), msg("carol", "alice", "psst")])
    store.append([msg("alice", "bob", "again")])  # a known pair: nothing new
    everyone = {"alice", "bob", "carol", "dave"}

    assert store.contacts_among("alice", everyone) == {"bob", "carol"}
    assert store.contacts_among("bob", everyone) == {"alice"}
    assert store.contacts_among("dave", everyone) == set()
    assert store.contacts_among("alice", {"bob"}) == {"bob"}  # fewer candidates than contacts
    assert store.contacts_among("alice", set()) == set()


def test_a_pair_from_a_rolled_back_batch_is_recorded_by_the_next(store: SQLiteStore) -> None:
    with pytest.raises(StorageError):  # fails after the contacts were written: all of it rolls back
        store.append([msg("alice", "bob", "lost")], cursors={"alice": None})  # type: ignore[dict-item]
    assert store.contacts_among("alice", {"bob"}) == set()

    store.append([msg("alice", "bob", "stored")])
    assert store.contacts_among("alice", {"bob"}) == {"bob"}
    assert store.contacts_among("bob", {"alice"}) == {"alice"}


def test_contacts_survive_a_restart_and_retried_batches(db_path: Path) -> None:
    with SQLiteStore(db_path) as store:
        store.append([msg("alice", "bob", "one", client_id="c1")])
    with SQLiteStore(db_path) as store:
        store.append([msg("alice", "bob", "one", client_id="c1"), msg("bob", "erin", "two", client_id="c1")])
        assert store.contacts_among("bob", {"alice", "erin"}) == {"alice", "erin"}


def test_an_older_file_gets_its_contacts_from_the_stored_messages(db_path: Path) -> None:
    conn = open_component(db_path, "normal", MESSAGES_COMPONENT, MESSAGE_MIGRATIONS)  # as before contacts
    conn.executemany("INSERT INTO messages (sender, recipient, text, ts) VALUES (?, ?, ?, 1.0)",
                     [("alice", "bob", "old"), ("carol", "alice", "older"), ("alice", "bob", "again")])
    conn.close()

    with SQLiteStore(db_path) as store:
        assert store.contacts_among("alice", {"bob", "carol", "dave"}) == {"bob", "carol"}
        assert store.contacts_among("bob", {"alice", "carol"}) == {"alice"}
    conn = open_database(db_path)
    try:
        assert schema_version(conn, CONTACTS_COMPONENT) == 1
    finally:
        conn.close()


# -- maintenance ---------------------------------------------------------------


def test_prune_deletes_old_messages_and_ids_are_not_reused(store: SQLiteStore) -> None:
    ids = store.append([msg("alice", "bob", f"t{ts}", ts=float(ts)) for ts in (10, 20, 30)]).ids
    assert store.prune(older_than_ts=25.0, limit=1) == 1  # the oldest first, in steps
    assert texts(store.messages_to("bob")) == ["t20", "t30"]
    assert store.prune(older_than_ts=25.0, limit=1) == 1
    assert store.prune(older_than_ts=25.0, limit=1) == 0
    assert texts(store.messages_to("bob")) == ["t30"]

    assert store.prune(older_than_ts=1e12) == 1
    (later,) = store.append([msg("alice", "bob", "later")]).ids
    # A cursor pointing at a pruned id must still see newer messages.
    assert later > ids[-1]


def test_size_grows_with_messages(store: SQLiteStore) -> None:
    before = store.size_bytes()
    store.append([msg("alice", "bob", "x" * 1000) for _ in range(200)])
    assert store.size_bytes() > before + 200 * 1000


# -- the file --------------------------------------------------------------------


def test_reopening_keeps_messages_and_cursors(db_path: Path) -> None:
    with SQLiteStore(db_path, fsync="full") as store:
        store.append([msg("alice", "bob", "kept", client_id="k1")])
        store.advance_cursor("bob", 1)
    with SQLiteStore(db_path) as store:
        assert texts(store.messages_to("bob")) == ["kept"]
        assert store.cursor("bob") == 1
        retry = store.append([msg("alice", "bob", "kept", client_id="k1")])
        assert retry.duplicates == {0} and texts(store.messages_to("bob")) == ["kept"]


def test_a_killed_process_keeps_what_append_returned(db_path: Path) -> None:
    child = textwrap.dedent(
        """
        import os, sys
        from chatcli.server.storage import NewMessage, SQLiteStore
        store = SQLiteStore(sys.argv[1])
        store.append([NewMessage("alice", "bob", f"m{i}", 1.0, None) for i in range(100)])
        store.append([NewMessage("alice", "bob", "last", 2.0, "k")])
        print("done", flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child, str(db_path)], capture_output=True, text=True, timeout=30)

    assert proc.stdout == "done\n", proc.stderr
    assert proc.returncode == -9
    with SQLiteStore(db_path) as store:
        stored = store.messages_to("bob")
    assert len(stored) == 101 and stored[-1].text == "last"


def test_schema_version_is_recorded_and_not_redone(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    conn = open_database(db_path)
    try:
        assert schema_version(conn, MESSAGES_COMPONENT) == len(MESSAGE_MIGRATIONS) == 3
        assert migrate(conn, MESSAGES_COMPONENT, MESSAGE_MIGRATIONS) == []
    finally:
        conn.close()


def test_a_new_migration_upgrades_an_existing_file_once(db_path: Path) -> None:
    with SQLiteStore(db_path) as store:
        store.append([msg("alice", "bob", "from v1")])
    newer = (*MESSAGE_MIGRATIONS, ("ALTER TABLE messages ADD COLUMN edited_ts REAL",))
    conn = open_database(db_path)
    try:
        assert migrate(conn, MESSAGES_COMPONENT, newer) == [len(newer)]
        assert migrate(conn, MESSAGES_COMPONENT, newer) == []
        assert conn.execute("SELECT text, edited_ts FROM messages").fetchall() == [("from v1", None)]
    finally:
        conn.close()


# -- the store's identity (epoch) -------------------------------------------------------


def test_every_store_has_its_own_epoch_kept_across_reopening(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "one.db") as one, SQLiteStore(tmp_path / "two.db") as two:
        first = one.epoch
        assert re.fullmatch(r"[0-9a-f]{32}", first) and two.epoch != first  # 128 random bits each
    with SQLiteStore(tmp_path / "one.db") as reopened:
        assert reopened.epoch == first
    (tmp_path / "one.db").unlink()  # wiped: the file made in its place is another store
    with SQLiteStore(tmp_path / "one.db") as replaced:
        assert replaced.epoch != first


def test_a_file_from_before_epochs_gets_one_on_first_open_and_keeps_its_messages(db_path: Path) -> None:
    conn = open_database(db_path)
    try:  # the file as chatcli wrote it before v2: no store_identity table
        migrate(conn, MESSAGES_COMPONENT, MESSAGE_MIGRATIONS[:1])
        conn.execute("INSERT INTO messages (sender, recipient, text, ts) VALUES ('alice', 'bob', 'old', 1.0)")
    finally:
        conn.close()
    with SQLiteStore(db_path) as store:
        epoch = store.epoch
        assert texts(store.messages_to("bob")) == ["old"] and store.highest_id() == 1
    with SQLiteStore(db_path) as store:
        assert store.epoch == epoch  # made once, by the migration, not at every open


def test_highest_id_counts_ids_given_out_even_when_pruned(store: SQLiteStore) -> None:
    assert store.highest_id() == 0
    ids = store.append([msg("alice", "bob", "a"), msg("alice", "bob", "b")]).ids
    assert store.highest_id() == ids[-1]
    store.prune(older_than_ts=1e12)
    assert store.messages_to("bob") == [] and store.highest_id() == ids[-1]


def test_a_file_from_a_newer_chatcli_is_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_versions SET version = 99 WHERE component = 'messages'")
    conn.close()

    with pytest.raises(StorageError, match="newer"):
        SQLiteStore(db_path)


def test_a_file_that_is_not_a_database_is_a_clear_error(db_path: Path) -> None:
    db_path.write_bytes(b"this is a text file, not SQLite\n" * 100)
    with pytest.raises(StorageError, match=r"chat\.db"):
        SQLiteStore(db_path)


# -- failures: every sqlite3 error is a StorageError; acks match what is stored -------------------


def test_first_id_since_is_the_first_message_at_or_after_the_time(store: SQLiteStore) -> None:
    assert store.first_id_since(0.0) is None  # an empty store
    ids = store.append([msg("alice", "bob", f"t{ts}", ts=float(ts)) for ts in (10, 20, 20, 30, 40, 50)]).ids
    store.prune(older_than_ts=15.0)  # a gap at the start
    assert store.first_id_since(0.0) == ids[1]
    assert store.first_id_since(20.0) == ids[1]
    assert store.first_id_since(20.5) == ids[3]
    assert store.first_id_since(50.0) == ids[5]
    assert store.first_id_since(50.1) is None  # the future: nothing to replay
    assert texts(store.messages_to("bob", since_ts=25.0)) == ["t30", "t40", "t50"]


def test_reads_stop_reading_where_the_caller_stops(store: SQLiteStore) -> None:
    store.append([msg("alice", "bob", f"m{i}") for i in range(10)])
    newest_first = store.iter_history("bob", "alice", limit=10)
    assert next(newest_first).text == "m9"
    oldest_first = store.iter_messages_to("bob", limit=10)
    assert [next(oldest_first).text for _ in range(2)] == ["m0", "m1"]
    oldest_first.close()  # abandoned midway: the store stays usable
    store.append([msg("alice", "bob", "after")])
    assert texts(store.messages_to("bob", limit=100))[-1] == "after"


def test_a_failed_index_after_commit_keeps_the_batch_stored(db_path: Path) -> None:
    with SQLiteStore(db_path, index_lag_max=100) as store:
        with sqlite3.connect(db_path) as other:  # indexing fails as with a full disk
            other.execute("CREATE TRIGGER full BEFORE INSERT ON inbox BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
        appended = store.append([msg("alice", "bob", f"m{i}") for i in range(500)])  # past the lag: indexes
        assert len(appended.ids) == 500  # no StorageError: the messages are committed
        assert len(store.messages_to("bob", limit=1000)) == 500  # the backlog reads the unindexed tail
        with pytest.raises(StorageError, match="disk is full"):
            store.history("alice", "bob")  # history needs the index: a clear error, no sqlite3 exception
        with sqlite3.connect(db_path) as other:
            other.execute("DROP TRIGGER full")
        assert len(store.history("alice", "bob", limit=1000)) == 500


def test_a_deleted_file_fails_every_later_append(db_path: Path, store: SQLiteStore) -> None:
    store.append([msg("alice", "bob", "kept")])
    assert store.verify_file() is None
    db_path.unlink()
    with pytest.raises(StorageError, match="deleted or replaced"):
        store.append([msg("alice", "bob", "would vanish")])
    SQLiteStore(db_path).close()  # a new file at the same path is not ours
    with pytest.raises(StorageError, match="deleted or replaced"):
        store.append([msg("alice", "bob", "still refused")])
    assert store.verify_file() is not None


def test_reads_of_a_damaged_file_raise_storage_error(db_path: Path, store: SQLiteStore) -> None:
    store.append([msg("alice", "bob", "hi")])
    with sqlite3.connect(db_path) as other:
        other.execute("DROP TABLE cursors")
        other.execute("DROP TABLE messages")
    for read in (lambda: store.cursor("bob"), lambda: store.pending("bob"), lambda: store.first_id_since(0.0),
                 lambda: store.history("alice", "bob"), lambda: store.messages_to("bob", after_id=0)):
        with pytest.raises(StorageError, match="cannot "):
            read()
