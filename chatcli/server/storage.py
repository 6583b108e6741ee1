"""Durable messages in one SQLite file: the format under the SQLite engine (``engine/sqlite.py``).

Synchronous and I/O-contained: no event loop, no sockets. The engine calls
``append`` (on the storage thread) once per event-loop tick with every message it accepted in that tick
(group commit), so one transaction (and with ``fsync="full"`` one fsync) is paid
per batch, not per message.

Durability: WAL mode always. ``fsync="normal"`` (``synchronous=NORMAL``) keeps
every committed batch across a crash of the process (kill -9); ``fsync="full"``
(``synchronous=FULL``) also across a power loss, at the price of an fsync per
commit. The server's store copies the WAL into the file from a thread of its own
(``chatcli.server.wal``), so that no commit pays for a checkpoint.

Why appends are cheap: ``messages`` is an append-only log with no index on
the recipient. An index updated at every commit would dirty one B-tree page per
distinct recipient per batch and cost 2-3 times the insert itself. Instead the
``inbox`` table (recipient, id) and the search index are filled in bulk, sorted, from the not yet
indexed tail of the log, when the server is quiet (``index_some``, called by the engine once no
commit has come for a moment), or by a commit itself once the tail is ``INDEX_LAG_MAX`` rows long.
Reads see every committed message all the same: a backlog read scans the unindexed tail, and the
other reads (history, unread counts, search) index it first.

The file's schema is versioned per component in the ``schema_versions`` table;
``open_database`` and ``migrate`` are shared with ``chatcli.server.accounts``,
which keeps its own tables in the same file.

Message ids are ``INTEGER PRIMARY KEY AUTOINCREMENT``: increasing and never
reused, even after ``prune`` deleted the newest rows, so they are safe delivery
cursors, within one store. Ids of another store (a new machine, a wiped file)
start again at 1, so every store has an ``epoch``: a random 128-bit token made
with the file (or added on the first open of an older file), which clients keep
beside their cursor. A client's id from another epoch, or above the highest id
this store ever gave out (a restored backup), is not a position in this store.
The relay gives accept times that never decrease with ids, so the first
message since a time is found by binary search over ids (``first_id_since``).

Errors: every ``sqlite3.Error`` becomes ``StorageError`` with what was being
done. A file deleted or replaced under a running store is noticed at the next
append (one ``stat`` per batch): from then on every append fails, because
what it wrote would vanish at the next start.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import operator
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Final, TypeAlias

from chatcli.errors import StorageError
from chatcli.protocol import MAX_INT
from chatcli.server.engine.base import Appended, ConversationSummary, NewMessage, StoredMessage
from chatcli.server.engine.options import Fsync
from chatcli.server.engine.pages import SearchScan
from chatcli.server.wal import Checkpointer

# The records are the engine seam's (chatcli.server.engine.base); named here too, where the store writes them.
__all__ = [
    "INBOX_CHUNK_ROWS",
    "INDEX_LAG_MAX",
    "INSERT_ROWS_MAX",
    "SEARCH_CHUNK_ROWS",
    "Appended",
    "Migration",
    "NewMessage",
    "SQLiteStore",
    "SearchScan",
    "StoredMessage",
    "migrate",
    "open_component",
    "open_database",
    "schema_version",
    "search_query",
    "sqlite_errors",
    "write_transaction",
]

log = logging.getLogger("chatcli.server")

#: One schema version: the SQL statements that take the previous version to it.
Migration: TypeAlias = Sequence[str]

#: How long a write waits for another connection's write lock (e.g. ``chatcli user add``
#: while the server runs) before failing.
BUSY_TIMEOUT_MS: Final = 5000
#: Keep the WAL file from staying large after a burst (bytes).
JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
#: Rows of the log's tail that may wait unindexed, per index. Indexing (the inbox and the search index)
#: costs about 4 µs per message, twice what storing it does, so a burst's commits leave it to the quiet
#: moment after the burst; past this many rows a commit indexes a chunk itself, so sustained load keeps the
#: lag bounded. It also bounds the catch-up of a history, inbox or search read (~2 µs per row each).
INDEX_LAG_MAX: Final = 65_536
#: Inbox rows per indexing step, in a transaction of its own. The cost per row falls with the step's size
#: (each step rewrites the last page of every recipient's range: 3.7 µs per row in steps of 2,048 rows,
#: 2.1 in steps of 8,192, measured with 50 recipients); the step is the longest a commit waits (~16 ms).
INBOX_CHUNK_ROWS: Final = 8192
#: Texts per search-indexing step: FTS5 builds each step's segment in memory, so small steps cost about
#: the same per row, and a commit never waits long (~2.5 ms).
SEARCH_CHUNK_ROWS: Final = 1024


@contextlib.contextmanager
def sqlite_errors(doing: str) -> Iterator[None]:
    """Turn any sqlite3 error (I/O, a corrupted file, a lock held too long) into StorageError."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"cannot {doing}: {exc}") from exc


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection, doing: str) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error; sqlite3 errors become StorageError."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StorageError(f"cannot {doing}: {exc}") from exc


# ---------------------------------------------------------------------------
# The database file: connection settings and versioned migrations
# ---------------------------------------------------------------------------


def open_database(path: str | os.PathLike[str], fsync: Fsync = Fsync.normal) -> sqlite3.Connection:
    """Open (creating if missing) a chatcli database file in WAL mode, in autocommit mode.

    Transactions are explicit (``BEGIN IMMEDIATE`` … ``COMMIT``), so the sqlite3
    module never opens one behind our back.
    """
    if fsync not in tuple(Fsync):
        raise ValueError(f"fsync must be one of {', '.join(Fsync)}, not {fsync!r}")
    try:
        # check_same_thread=False: the owner may hand the store to a worker thread; calls
        # must still be serialised (one at a time), which the owner guarantees.
        conn = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {os.fspath(path)!r}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StorageError(f"database {os.fspath(path)!r} cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {fsync.upper()}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"cannot use database {os.fspath(path)!r}: {exc}") from exc
    except StorageError:
        conn.close()
        raise
    return conn


def schema_version(conn: sqlite3.Connection, component: str) -> int:
    """The schema version of ``component`` recorded in the file (0 when absent)."""
    try:
        row = conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
    except sqlite3.OperationalError:  # no schema_versions table yet: a new file
        return 0
    return int(row[0]) if row else 0


def open_component(path: str | os.PathLike[str], fsync: Fsync, component: str,
                   migrations: Sequence[Migration]) -> sqlite3.Connection:
    """Open the database with ``component``'s tables migrated; the file is closed again if that fails."""
    conn = open_database(path, fsync)
    try:
        migrate(conn, component, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, component: str, migrations: Sequence[Migration]) -> list[int]:
    """Bring ``component``'s tables to version ``len(migrations)``; the versions applied.

    ``migrations[0]`` creates version 1, ``migrations[1]`` takes 1 to 2, and so on:
    add a new entry for a change, never edit a released one. Runs in one write
    transaction, re-checked under the lock, so two processes opening a new file at
    once migrate it exactly once. An up-to-date file costs one read, no lock.
    """
    if schema_version(conn, component) == len(migrations):
        return []
    with write_transaction(conn, f"migrate the {component} schema"):
        return _apply_migrations(conn, component, migrations)


def _apply_migrations(conn: sqlite3.Connection, component: str, migrations: Sequence[Migration]) -> list[int]:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    current = schema_version(conn, component)
    if current > len(migrations):
        raise StorageError(
            f"the database's {component} schema is v{current}, newer than this chatcli knows "
            f"(v{len(migrations)}): upgrade chatcli"
        )
    for version in range(current + 1, len(migrations) + 1):
        for statement in migrations[version - 1]:
            conn.execute(statement)
    conn.execute(
        "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
        "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
        (component, len(migrations)),
    )
    return list(range(current + 1, len(migrations) + 1))


# ---------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------

MESSAGES_COMPONENT: Final = "messages"
MESSAGE_MIGRATIONS: Final[tuple[Migration, ...]] = (
    # v1
    (
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            sender TEXT NOT NULL,
            recipient TEXT NOT NULL,
            text TEXT NOT NULL,
            ts REAL NOT NULL,
            client_id TEXT
        )""",
        # Idempotent retries; partial, so messages without a client id cost nothing here.
        "CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, client_id) WHERE client_id IS NOT NULL",
        # The recipient index, filled in bulk (see the module docstring). `sender` rides
        # along so that history() filters a conversation without reading every message.
        """CREATE TABLE inbox (
            recipient TEXT NOT NULL,
            id INTEGER NOT NULL,
            sender TEXT NOT NULL,
            PRIMARY KEY (recipient, id)
        ) WITHOUT ROWID""",
        "CREATE TABLE inbox_progress (indexed_upto INTEGER NOT NULL)",
        "INSERT INTO inbox_progress (indexed_upto) VALUES (0)",
        "CREATE TABLE cursors (user TEXT PRIMARY KEY, last_id INTEGER NOT NULL) WITHOUT ROWID",
    ),
    # v2: the store's identity, 128 random bits as 32 hex digits; an older file gets one on its first open.
    (
        "CREATE TABLE store_identity (epoch TEXT NOT NULL)",
        "INSERT INTO store_identity (epoch) VALUES (lower(hex(randomblob(16))))",
    ),
    # v3: replies (issue 13): the id of the message this one answers, checked when it was stored.
    ("ALTER TABLE messages ADD COLUMN reply_to INTEGER",),
    # v4 goes here, e.g. ("ALTER TABLE messages ADD COLUMN edited_ts REAL",).
)

# Who has exchanged a message with whom (either direction), for ``--presence contacts``. Its own
# component, so that its versions never collide with the messages schema's.
CONTACTS_COMPONENT: Final = "contacts"
CONTACT_MIGRATIONS: Final[tuple[Migration, ...]] = (
    # v1: both directions of every pair, so one user's contacts are one primary-key range;
    # backfilled from the messages already stored.
    (
        "CREATE TABLE contacts (user TEXT NOT NULL, peer TEXT NOT NULL, PRIMARY KEY (user, peer)) WITHOUT ROWID",
        "INSERT INTO contacts (user, peer) SELECT sender, recipient FROM messages "
        "UNION SELECT recipient, sender FROM messages",
    ),
)
# Read positions (issue 12): per user and conversation, how far the user has read; apart from the delivery
# cursor. Its own component. The index on the inbox by (recipient, sender, id) makes counting one
# conversation's unread messages a range over those messages alone, and finding its newest one a lookup;
# the inbox is filled in bulk (see the module docstring), so the index costs nothing per commit.
READS_COMPONENT: Final = "reads"
READ_MIGRATIONS: Final[tuple[Migration, ...]] = (
    # v1
    (
        # receipts: whether the user's last read allowed a receipt (then the peer may learn the position).
        "CREATE TABLE read_positions (user TEXT NOT NULL, peer TEXT NOT NULL, last_id INTEGER NOT NULL, "
        "receipts INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (user, peer)) WITHOUT ROWID",
        "CREATE INDEX inbox_by_sender ON inbox (recipient, sender, id)",
    ),
)
#: Kept only for a conversation that exists (the peer is one of the user's contacts): the table is bounded by
#: the contacts, not by the peer names a client makes up (a position for anyone else stays 0), as on Redis.
_MARK_READ: Final = (
    "INSERT INTO read_positions (user, peer, last_id, receipts) "
    "SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM contacts WHERE user = ?1 AND peer = ?2) "
    "ON CONFLICT (user, peer) DO UPDATE SET last_id = max(last_id, excluded.last_id), receipts = excluded.receipts"
)
#: Contacts the inbox looks at, at most: each costs two index lookups.
INBOX_CONTACTS_MAX: Final = 10_000
_ADD_CONTACT: Final = "INSERT INTO contacts (user, peer) VALUES (?, ?) ON CONFLICT DO NOTHING"

# Search (issue 13): an FTS5 index of the texts, its own component. External content: the index keeps
# no copy of the texts (it reads them from ``messages``). Like the inbox it is filled in bulk from the
# log's tail (see ``INDEX_LAG_MAX``), and before a search, so a commit does not pay for tokenising; the
# migration indexes the messages a file already holds, once.
SEARCH_COMPONENT: Final = "search"
SEARCH_MIGRATIONS: Final[tuple[Migration, ...]] = (
    (
        # columnsize=0: no per-row size record (only ranking by bm25 needs it, and answers are newest first);
        # a third less work per indexed text.
        "CREATE VIRTUAL TABLE message_search USING fts5(text, content='messages', content_rowid='id', "
        "tokenize='unicode61 remove_diacritics 2', columnsize=0)",
        "CREATE TABLE search_progress (indexed_upto INTEGER NOT NULL)",
        "INSERT INTO message_search (rowid, text) SELECT id, text FROM messages",
        "INSERT INTO search_progress (indexed_upto) SELECT ifnull(max(id), 0) FROM messages",
    ),
)
#: SQLite virtual-machine steps one search may take (checked every 1000): bounds the storage thread's time
#: on a common word in a large file; the answer then says ``more``.
SEARCH_MAX_STEPS: Final = 200_000  # 10-20 ms of the storage thread (benchmarks/storage_bench.py)
#: (sender, recipient) pairs remembered as stored in ``contacts``; past this many the memory is
#: dropped and refilled (rows already there are skipped by the insert), so it stays bounded.
KNOWN_CONTACTS_MAX: Final = 100_000

_COLUMNS: Final = "m.id, m.sender, m.recipient, m.text, m.ts, m.client_id, m.reply_to"
# DO NOTHING turns a retried (sender, client_id) into a skipped row, which ``rowcount`` reveals.
_INSERT: Final = (
    "INSERT INTO messages (sender, recipient, text, ts, client_id, reply_to) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
#: Rows per multi-row INSERT: one statement of many rows costs ~1.0 µs per row where ``executemany`` of
#: ``_INSERT`` cost ~2.4 (AUTOINCREMENT's bookkeeping and a statement's setup are paid per statement;
#: measured appending 300-700-row batches). 128 rows of at most 5 columns are 640 parameters: under 999, the oldest
#: SQLite limit.
INSERT_ROWS_MAX: Final = 128


#: The columns the fast path binds: a batch there holds no reply, and a batch without client ids leaves
#: that column out too. Binding None costs the sqlite3 module a failed adapter lookup, an AttributeError
#: made and dropped (0.25 µs per value, measured): twice per row of the load generator's messages.
_FIELDS: Final = {4: operator.itemgetter(0, 1, 2, 3), 5: operator.itemgetter(0, 1, 2, 3, 4)}
_CLIENT_ID: Final = operator.itemgetter(4)  # NewMessage.client_id
_SENDER_RECIPIENT: Final = operator.itemgetter(0, 1)


@functools.cache
def _insert_rows(count: int, columns: int) -> str:
    """The fast path's INSERT of ``count`` rows of the first ``columns`` columns, in one statement."""
    names = "sender, recipient, text, ts" + (", client_id" if columns == 5 else "")
    row = "(" + ", ".join("?" * columns) + ")"
    return f"INSERT INTO messages ({names}) VALUES {', '.join((row,) * count)} ON CONFLICT DO NOTHING"


def _row_runs(count: int) -> Iterator[tuple[int, int]]:
    """(start, length) runs covering ``count`` rows: INSERT_ROWS_MAX at a time, then the remainder's binary
    digits, so that the statement cache holds at most 8 distinct statements, never one per batch size."""
    start, size = 0, INSERT_ROWS_MAX
    while start < count:
        if count - start >= size:
            yield start, size
            start += size
        else:
            size //= 2


_INDEX_TAIL: Final = (
    "INSERT INTO inbox (recipient, id, sender) "
    "SELECT recipient, id, sender FROM messages WHERE id > ? AND id <= ? ORDER BY recipient, id"
)
_ADVANCE: Final = (
    "INSERT INTO cursors (user, last_id) VALUES (?, ?) "
    "ON CONFLICT (user) DO UPDATE SET last_id = excluded.last_id WHERE excluded.last_id > cursors.last_id"
)

_MESSAGE_BY_ID: Final = "SELECT id, sender, recipient, text, ts, client_id, reply_to FROM messages WHERE id = ?"
_REPLY_TO: Final = operator.itemgetter(5)  # NewMessage.reply_to, read in C: most batches hold no reply
# One direction of a conversation, newest first: ids only (the inbox holds no text), so a long
# history costs a few KB until the texts are read one by one.
_CONVERSATION_IDS: Final = "SELECT id FROM inbox WHERE recipient = ? AND sender = ? AND id < ? ORDER BY id DESC LIMIT ?"


_WORD: Final = re.compile(r"\w+")


def search_query(text: str) -> str | None:
    """FTS5 query text for the words of ``text``: each quoted, all required. Quoting makes anything a user
    types plain words (no FTS5 syntax); None when ``text`` holds no word. Whole words, not prefixes: a
    prefix query merges the lists of every word it matches before the first row, work the step limit
    cannot interrupt (7 ms instead of 0.6 on 200,000 messages)."""
    words = _WORD.findall(text)
    return " ".join(f'"{word}"' for word in words) if words else None


class _RetryInBatch(Exception):
    """A batch holds a (sender, client_id) already stored: take the deduplicating path."""


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")


class SQLiteStore:
    """Messages, cursors and contacts in a SQLite file. Not thread-safe: one call at a time."""

    def __init__(self, path: str | os.PathLike[str], fsync: Fsync = Fsync.normal,
                 background_checkpoints: bool = False, index_lag_max: int = INDEX_LAG_MAX) -> None:
        """``background_checkpoints``: a thread copies the WAL into the file, not the commits (``wal``).
        ``index_lag_max``: unindexed rows past which a commit indexes (``INDEX_LAG_MAX``)."""
        self.path = Path(path)
        self.fsync = fsync
        self.index_lag_max = index_lag_max
        self._conn = open_component(path, fsync, MESSAGES_COMPONENT, MESSAGE_MIGRATIONS)
        self._known_contacts: set[tuple[str, str]] = set()
        try:
            migrate(self._conn, CONTACTS_COMPONENT, CONTACT_MIGRATIONS)
            migrate(self._conn, READS_COMPONENT, READ_MIGRATIONS)
            migrate(self._conn, SEARCH_COMPONENT, SEARCH_MIGRATIONS)
            self._search_upto = self._search_state()
            # Hints only, to decide when to index the tail; the file has the truth.
            self._indexed_upto, self._last_id = self._inbox_state()
            with sqlite_errors("read the newest accept time"):
                row = self._conn.execute("SELECT ts FROM messages ORDER BY id DESC LIMIT 1").fetchone()
            #: The newest message's accept time at open: a writer continues from it, so that times
            #: keep growing with ids even if the clock went back between two runs.
            self.newest_ts = float(row[0]) if row else 0.0
            _ = self.epoch  # read now: a file that cannot tell its epoch is refused at open
        except BaseException:
            self._conn.close()
            raise
        self._checkpointer: Checkpointer | None = None
        if background_checkpoints:
            try:
                self._checkpointer = Checkpointer(open_database(path, fsync), self._conn)
            except BaseException:
                self._conn.close()
                raise
        # Which file we opened, to notice it being deleted or replaced (see ``_check_file``).
        self._identity = self._file_identity()
        #: Why this store refuses every write from now on (its file is gone), or None.
        self.lost: str | None = None

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------

    def append(self, batch: Sequence[NewMessage], cursors: Mapping[str, int] | None = None) -> Appended:
        """Store a batch in ONE transaction; the ids in batch order.

        A (sender, client_id) already stored, earlier in the file or earlier in the
        batch, stores nothing: its id is the original's and its position is a duplicate.
        ``cursors`` are advanced in the same transaction (one commit per tick, not two).
        On error nothing of the batch is stored and ``StorageError`` is raised.
        """
        if self.lost is not None:
            raise StorageError(self.lost)
        if not batch:
            if cursors:
                self.advance_cursors(cursors)
            return Appended((), frozenset())
        doing = f"store {len(batch)} message(s)"
        try:
            with write_transaction(self._conn, doing):
                if any(map(operator.is_not, map(_REPLY_TO, batch), itertools.repeat(None))):
                    raise _RetryInBatch  # a reply is checked row by row, on the careful path
                results = self._insert_all(batch)
                new_contacts = self._add_contacts(batch)
                if cursors:
                    self._conn.executemany(_ADVANCE, cursors.items())
        except _RetryInBatch:  # rolled back: now the careful way
            with write_transaction(self._conn, doing):
                results = self._insert_deduplicating(batch)
                new_contacts = self._add_contacts(batch)
                if cursors:
                    self._conn.executemany(_ADVANCE, cursors.items())
        self._remember_contacts(new_contacts)  # only once committed: a rolled-back pair is not known
        if self._checkpointer is not None:
            self._checkpointer.committed()
        self._check_file()
        if self._last_id - self._indexed_upto > self.index_lag_max:
            self._inbox_step()
        if self._last_id - self._search_upto > self.index_lag_max:
            self._search_step()
        return results

    def unindexed_rows(self) -> int:
        """How many of the newest messages wait for the inbox or the search index (a hint: safe from any thread)."""
        return self._last_id - min(self._indexed_upto, self._search_upto)

    def index_some(self) -> bool:
        """One step of indexing the log's tail (the inbox first: backlog reads use it); whether more waits."""
        done = self._inbox_step() if self._last_id > self._indexed_upto else self._search_step()
        return done and self.unindexed_rows() > 0

    def _inbox_step(self) -> bool:
        return self._index_logged("index new messages", self._index_tail, INBOX_CHUNK_ROWS)

    def _search_step(self) -> bool:
        return self._index_logged("index new texts for search", self._index_search_tail, SEARCH_CHUNK_ROWS)

    def _index_logged(self, doing: str, index_tail: Callable[[int], None], rows: int) -> bool:
        """``index_tail(rows)`` in a transaction of its own; False if it failed. A failure (e.g. disk full) is
        logged, not raised: the messages ARE stored, and after a commit a refusal would make senders retry
        them. History, unread counts and search index before reading, and say why they cannot."""
        try:
            with write_transaction(self._conn, doing):
                index_tail(rows)
        except StorageError as exc:
            log.warning("%s; the messages are stored, indexing is retried later", exc,
                        extra={"event": "storage-index-failed"})
            return False
        return True

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def _check_file(self) -> None:
        """Fail for good if our file was deleted or replaced: what we write now would vanish at the next start.

        One stat per batch. SQLite keeps writing to the open, unlinked file without an error.
        """
        lost = self.verify_file()
        if lost is not None:
            raise StorageError(lost)

    def verify_file(self) -> str | None:
        """Why the store can no longer keep messages (its file was deleted or replaced), or None.

        Once lost, lost for good (logged once): a file put back is not the one we have open.
        Safe from any thread: a stat, and one attribute set once.
        """
        if self.lost is None and self._file_identity() != self._identity:
            self.lost = (f"the database file {self.path} was deleted or replaced while the server ran: "
                         "messages can no longer be stored; restart the server")
            log.critical("%s", self.lost, extra={"event": "storage-lost", "db": str(self.path)})
        return self.lost

    def _insert_all(self, batch: Sequence[NewMessage]) -> Appended:
        """A few multi-row INSERTs (``_row_runs``); raises ``_RetryInBatch`` if any row was a retry.

        Under the write lock AUTOINCREMENT hands out consecutive ids, so when every
        row went in, they are the last one and the ``len(batch) - 1`` before it:
        no RETURNING and no per-row SELECT.
        """
        conn = self._conn
        inserted = 0
        columns = 5 if any(map(operator.is_not, map(_CLIENT_ID, batch), itertools.repeat(None))) else 4
        fields = _FIELDS[columns]
        for start, size in _row_runs(len(batch)):
            values = list(itertools.chain.from_iterable(map(fields, batch[start:start + size])))
            inserted += conn.execute(_insert_rows(size, columns), values).rowcount
        if inserted != len(batch):
            raise _RetryInBatch
        last_id: int = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        self._last_id = last_id
        return Appended(range(last_id - len(batch) + 1, last_id + 1), frozenset())

    def _insert_deduplicating(self, batch: Sequence[NewMessage]) -> Appended:
        """The rare path for batches holding retries or replies: look each client id and each replied-to
        message up, insert row by row."""
        seen: dict[tuple[str, str], int] = {}
        ids: list[int] = []
        duplicates: set[int] = set()
        bad_replies: set[int] = set()
        for position, message in enumerate(batch):
            key = None if message.client_id is None else (message.sender, message.client_id)
            original = None if key is None else seen.get(key) or self._id_by_client_id(*key)
            if original is not None:
                ids.append(original)
                duplicates.add(position)
                continue
            if message.reply_to is not None and not self._in_conversation(message):
                ids.append(0)
                bad_replies.add(position)
                continue
            msg_id = int(self._conn.execute(_INSERT, message).lastrowid or 0)
            self._last_id = msg_id
            if key is not None:
                seen[key] = msg_id
            ids.append(msg_id)
        return Appended(ids, frozenset(duplicates), bad_replies=frozenset(bad_replies))

    def _in_conversation(self, message: NewMessage) -> bool:
        """Whether ``message.reply_to`` is a stored message between the same two users, either way."""
        row = self._conn.execute("SELECT sender, recipient FROM messages WHERE id = ?",
                                 (message.reply_to,)).fetchone()
        return row is not None and {row[0], row[1]} == {message.sender, message.recipient}

    def _add_contacts(self, batch: Sequence[NewMessage]) -> set[tuple[str, str]]:
        """Record each new (sender, recipient) pair both ways; call inside the batch's transaction.

        Pairs remembered from earlier commits are skipped, so a steady conversation costs a set
        lookup per message and no SQL.
        """
        new = set(map(_SENDER_RECIPIENT, batch)).difference(self._known_contacts)  # in C: no Python per message
        if new:
            self._conn.executemany(_ADD_CONTACT, [*new, *((peer, user) for user, peer in new)])
        return new

    def _remember_contacts(self, pairs: set[tuple[str, str]]) -> None:
        if len(self._known_contacts) + len(pairs) > KNOWN_CONTACTS_MAX:
            self._known_contacts.clear()
        self._known_contacts |= pairs

    def _id_by_client_id(self, sender: str, client_id: str) -> int | None:
        row = self._conn.execute("SELECT id FROM messages WHERE sender = ? AND client_id = ?",
                                 (sender, client_id)).fetchone()
        return None if row is None else int(row[0])

    # -- the inbox index ---------------------------------------------------

    def _inbox_state(self) -> tuple[int, int]:
        """(highest id indexed into the inbox, highest id in the log)."""
        with sqlite_errors("read the inbox index state"):
            upto, last = self._conn.execute(
                "SELECT indexed_upto, (SELECT ifnull(max(id), 0) FROM messages) FROM inbox_progress"
            ).fetchone()
        return int(upto), int(last)

    def _index_tail(self, rows: int = MAX_INT) -> None:
        """Index the log's tail into the inbox, at most ``rows`` of its ids; call inside a write transaction."""
        upto, last = self._inbox_state()
        self._last_id = max(self._last_id, last)
        if last > upto:
            end = min(last, upto + rows)
            self._conn.execute(_INDEX_TAIL, (upto, end))
            self._conn.execute("UPDATE inbox_progress SET indexed_upto = ?", (end,))
            upto = end
        self._indexed_upto = upto

    def _catch_up(self) -> None:
        """Make the inbox complete before a read (a no-op read when it is)."""
        upto, last = self._inbox_state()
        if last > upto:
            with write_transaction(self._conn, "index new messages"):
                self._index_tail()

    # -- delivery cursors --------------------------------------------------

    def cursor(self, user: str) -> int:
        """The highest message id ``user`` acknowledged (0 if none)."""
        with sqlite_errors(f"read the delivery cursor of {user}"):
            row = self._conn.execute("SELECT last_id FROM cursors WHERE user = ?", (user,)).fetchone()
        return int(row[0]) if row else 0

    def advance_cursor(self, user: str, msg_id: int) -> None:
        """Move ``user``'s cursor to ``msg_id``; a lower id than the current one changes nothing."""
        self.advance_cursors({user: msg_id})

    def advance_cursors(self, cursors: Mapping[str, int]) -> None:
        """``advance_cursor`` for many users in one transaction."""
        if cursors:
            with write_transaction(self._conn, "advance delivery cursors"):
                self._conn.executemany(_ADVANCE, cursors.items())

    # -- reading -----------------------------------------------------------

    def pending(self, user: str, after_id: int | None = None, limit: int = 1000) -> list[StoredMessage]:
        """Messages to ``user`` after ``after_id`` (default: the user's cursor), oldest first."""
        start = self.cursor(user) if after_id is None else after_id
        return self.messages_to(user, after_id=start, limit=limit)

    def messages_to(
        self, user: str, after_id: int | None = None, since_ts: float | None = None, limit: int = 1000
    ) -> list[StoredMessage]:
        """Messages to ``user`` with id > ``after_id`` and ts >= ``since_ts`` (if given), oldest first."""
        start = after_id or 0
        if since_ts is not None:
            first = self.first_id_since(since_ts)
            if first is None:
                return []
            start = max(start, first - 1)
        return list(self.iter_messages_to(user, start, limit))

    def iter_messages_to(self, user: str, after_id: int = 0, limit: int = 1000) -> Iterator[StoredMessage]:
        """``messages_to`` one row at a time: a reader with a byte budget stops early, and the rows
        after that are never read (a page of large messages is never held whole).

        The indexed part comes from the inbox, the rest from a scan of the unindexed tail, if it is short
        (``INBOX_CHUNK_ROWS``: about a millisecond); a longer one is indexed first, once for every reader
        after it (a hundred clients connecting at once would otherwise scan it a hundred times).
        """
        _check_limit(limit)
        if self._last_id - self._indexed_upto > INBOX_CHUNK_ROWS:
            self._catch_up()
        doing = f"read the messages to {user}"
        with sqlite_errors(doing):
            indexed = int(self._conn.execute("SELECT indexed_upto FROM inbox_progress").fetchone()[0])
        sent = 0
        for message in self._rows(doing, f"SELECT {_COLUMNS} FROM inbox AS i JOIN messages AS m ON m.id = i.id "
                                  "WHERE i.recipient = ? AND i.id > ? AND i.id <= ? ORDER BY i.id LIMIT ?",
                                  (user, after_id, indexed, limit)):
            sent += 1
            yield message
        if sent < limit:
            yield from self._rows(doing, f"SELECT {_COLUMNS} FROM messages AS m "
                                  "WHERE m.id > ? AND m.recipient = ? ORDER BY m.id LIMIT ?",
                                  (max(after_id, indexed), user, limit - sent))

    def _rows(self, doing: str, sql: str, params: tuple[object, ...]) -> Iterator[StoredMessage]:
        with sqlite_errors(doing):
            rows = self._conn.execute(sql, params)
            try:
                for row in rows:
                    yield StoredMessage(*row)
            finally:
                rows.close()

    def first_id_since(self, since_ts: float) -> int | None:
        """The id of the first message accepted at or after ``since_ts``; None if there is none.

        O(log n): a binary search over ids, each probe a primary-key lookup. Valid because
        accept times never decrease as ids grow (the relay stamps each batch with a clock that
        never goes back). A time after the last message answers None after two lookups.
        """
        with sqlite_errors("find the messages since a time"):
            # Two subqueries: min() and max() in one SELECT would scan the table instead of two lookups.
            lo, hi = self._conn.execute(
                "SELECT (SELECT min(id) FROM messages), (SELECT max(id) FROM messages)").fetchone()
            if lo is None or self._ts_at_or_after(hi)[1] < since_ts:
                return None
            while lo < hi:  # the answer is the message at or after some id in [lo, hi]
                mid = (lo + hi) // 2
                if self._ts_at_or_after(mid)[1] >= since_ts:
                    hi = mid
                else:
                    lo = mid + 1
            return self._ts_at_or_after(lo)[0]

    def _ts_at_or_after(self, msg_id: int) -> tuple[int, float]:
        """(id, ts) of the first message with an id >= ``msg_id``; the caller knows there is one."""
        row = self._conn.execute("SELECT id, ts FROM messages WHERE id >= ? ORDER BY id LIMIT 1",
                                 (msg_id,)).fetchone()
        return int(row[0]), float(row[1])

    def history(self, user: str, peer: str, limit: int = 50, before_id: int | None = None) -> list[StoredMessage]:
        """The last ``limit`` messages between ``user`` and ``peer`` (both ways), oldest first.

        ``before_id`` pages back: only messages with a smaller id count.
        """
        return list(reversed(list(self.iter_history(user, peer, limit, before_id))))

    def iter_history(self, user: str, peer: str, limit: int = 50,
                     before_id: int | None = None) -> Iterator[StoredMessage]:
        """``history`` newest first, one message read at a time (a reader with a byte budget stops early)."""
        _check_limit(limit)
        self._catch_up()
        before = before_id if before_id is not None else MAX_INT
        with sqlite_errors(f"read the history of {user} and {peer}"):
            ids = [row[0] for row in self._conn.execute(_CONVERSATION_IDS, (peer, user, before, limit))]
            if user != peer:
                ids += [row[0] for row in self._conn.execute(_CONVERSATION_IDS, (user, peer, before, limit))]
                ids.sort(reverse=True)
        for msg_id in ids[:limit]:
            with sqlite_errors(f"read message {msg_id}"):
                row = self._conn.execute(_MESSAGE_BY_ID, (msg_id,)).fetchone()
            if row is not None:  # pruned meanwhile
                yield StoredMessage(*row)

    # -- search (issue 13) ---------------------------------------------------

    def _search_state(self) -> int:
        with sqlite_errors("read the search index state"):
            return int(self._conn.execute("SELECT indexed_upto FROM search_progress").fetchone()[0])

    def _index_search_tail(self, rows: int = MAX_INT) -> None:
        """Index the texts of the log's tail, at most ``rows`` of its ids; call inside a write transaction."""
        upto = self._search_state()
        last = int(self._conn.execute("SELECT ifnull(max(id), 0) FROM messages").fetchone()[0])
        if last > upto:
            end = min(last, upto + rows)
            self._conn.execute("INSERT INTO message_search (rowid, text) SELECT id, text FROM messages "
                               "WHERE id > ? AND id <= ? ORDER BY id", (upto, end))
            self._conn.execute("UPDATE search_progress SET indexed_upto = ?", (end,))
            upto = end
        self._search_upto = upto

    def _unindex_upto(self, last_id: int, older_than_ts: float) -> None:
        """Drop the index entries of the messages ``prune`` deletes: those up to ``last_id`` older than the
        cut (one statement: a 'delete' per row through executemany cost 14 times as much)."""
        self._conn.execute("INSERT INTO message_search (message_search, rowid, text) "
                           "SELECT 'delete', id, text FROM messages WHERE id <= ? AND ts < ?", (last_id, older_than_ts))

    def iter_search(self, user: str, text: str, scan: SearchScan, peer: str | None = None,
                    since_ts: float | None = None, before_id: int | None = None,
                    limit: int = 20) -> Iterator[StoredMessage]:
        """Messages sent or received by ``user`` (with ``peer`` only, if given) whose text holds every word
        of ``text``, newest first. Reading stops after ``SEARCH_MAX_STEPS``
        steps of SQLite's machine, and ``scan.cut`` says so."""
        _check_limit(limit)
        query = search_query(text)
        if query is None:
            return
        first = 0
        if since_ts is not None:
            found = self.first_id_since(since_ts)
            if found is None:
                return
            first = found
        upto = self._search_state()
        last = int(self._conn.execute("SELECT ifnull(max(id), 0) FROM messages").fetchone()[0])
        if last > upto:
            with write_transaction(self._conn, "index new texts for search"):
                self._index_search_tail()
        mine = ("AND ((m.sender = :me AND m.recipient = :peer) OR (m.sender = :peer AND m.recipient = :me))"
                if peer is not None else "AND (m.sender = :me OR m.recipient = :me)")
        sql = (f"SELECT {_COLUMNS} FROM message_search AS s JOIN messages AS m ON m.id = s.rowid "
               f"WHERE message_search MATCH :query AND s.rowid >= :first AND s.rowid < :before {mine} "
               "ORDER BY s.rowid DESC LIMIT :limit")
        params = {"query": query, "first": first, "before": MAX_INT if before_id is None else before_id,
                  "me": user, "peer": peer, "limit": limit}
        steps = itertools.count()
        self._conn.set_progress_handler(lambda: next(steps) >= SEARCH_MAX_STEPS // 1000, 1000)
        try:
            rows = self._conn.execute(sql, params)
            try:
                for row in rows:
                    yield StoredMessage(*row)
            finally:
                rows.close()
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):
                raise StorageError(f"cannot search the messages of {user}: {exc}") from exc
            scan.cut = True
        except sqlite3.Error as exc:
            raise StorageError(f"cannot search the messages of {user}: {exc}") from exc
        finally:
            self._conn.set_progress_handler(None, 0)

    def contacts_among(self, user: str, candidates: Set[str]) -> set[str]:
        """Those of ``candidates`` who have exchanged a message with ``user``, either way.

        Costs at most about twice ``len(candidates)`` rows however many contacts ``user`` has:
        their contacts are read up to that many; past it, each candidate is looked up instead.
        """
        if not candidates:
            return set()
        try:
            rows = self._conn.execute("SELECT peer FROM contacts WHERE user = ? LIMIT ?",
                                      (user, len(candidates) + 1)).fetchall()
            if len(rows) <= len(candidates):
                return {row[0] for row in rows if row[0] in candidates}
            rows = self._conn.execute("SELECT peer FROM contacts WHERE user = ? AND peer IN "
                                      "(SELECT value FROM json_each(?))",
                                      (user, json.dumps(list(candidates)))).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the contacts of {user}: {exc}") from exc
        return {row[0] for row in rows}

    # -- read positions and the inbox (issue 12) ----------------------------

    def mark_read(self, user: str, peer: str, msg_id: int, receipt: bool = True) -> int:
        """Move ``user``'s read position with ``peer`` up to ``msg_id`` (never down); the position now kept (0,
        and nothing kept, for a peer ``user`` never exchanged a message with). ``receipt``: whether ``peer`` may
        learn it (the inbox's ``peer_read``)."""
        return self.mark_read_many({(user, peer): (msg_id, receipt)})[(user, peer)]

    def mark_read_many(self, marks: Mapping[tuple[str, str], tuple[int, bool]]) -> dict[tuple[str, str], int]:
        """``mark_read`` for many (user, peer) in one transaction; the positions now kept."""
        rows = [(user, peer, msg_id, int(receipt)) for (user, peer), (msg_id, receipt) in marks.items()]
        with write_transaction(self._conn, f"keep {len(rows)} read position(s)"):
            self._conn.executemany(_MARK_READ, rows)
        return {key: self.read_position(*key) for key in marks}

    def receipted_position(self, user: str, peer: str) -> int | None:
        """How far ``peer`` has read the conversation with ``user``, if their last read allowed a receipt."""
        with sqlite_errors(f"read the read position of {peer} with {user}"):
            row = self._conn.execute("SELECT last_id FROM read_positions WHERE user = ? AND peer = ? AND receipts",
                                     (peer, user)).fetchone()
        return int(row[0]) if row else None

    def read_position(self, user: str, peer: str) -> int:
        """The highest message id of the conversation with ``peer`` that ``user`` has read (0 if none)."""
        with sqlite_errors(f"read the read position of {user} with {peer}"):
            row = self._conn.execute("SELECT last_id FROM read_positions WHERE user = ? AND peer = ?",
                                     (user, peer)).fetchone()
        return int(row[0]) if row else 0

    def unread_count(self, user: str, peer: str) -> int:
        """Messages from ``peer`` to ``user`` above ``user``'s read position: a range of the index, no more."""
        self._catch_up()
        with sqlite_errors(f"count the unread messages of {user} from {peer}"):
            return int(self._conn.execute(
                "SELECT count(*) FROM inbox WHERE recipient = ? AND sender = ? AND id > ?",
                (user, peer, self.read_position(user, peer))).fetchone()[0])

    def conversations(self, user: str, limit: int) -> tuple[list[ConversationSummary], bool]:
        """``user``'s conversations, the newest message first, at most ``limit``; and whether there are more.

        Two index lookups per contact (the newest message each way), then, for the ``limit`` kept, the
        read position, the unread count and the newest message: never a scan of the history.
        """
        _check_limit(limit)
        self._catch_up()
        newest = "SELECT max(id) FROM inbox WHERE recipient = ? AND sender = ?"
        with sqlite_errors(f"read the conversations of {user}"):
            peers = [row[0] for row in self._conn.execute("SELECT peer FROM contacts WHERE user = ? LIMIT ?",
                                                          (user, INBOX_CONTACTS_MAX))]
            latest: list[tuple[int, str]] = []
            for peer in peers:
                ids = [self._conn.execute(newest, (user, peer)).fetchone()[0],
                       self._conn.execute(newest, (peer, user)).fetchone()[0]]
                last = max((msg_id for msg_id in ids if msg_id is not None), default=None)
                if last is not None:  # None: every message between them was pruned
                    latest.append((int(last), peer))
            latest.sort(reverse=True)
            summaries = []
            for last_id, peer in latest[:limit]:
                row = self._conn.execute(_MESSAGE_BY_ID, (last_id,)).fetchone()
                summaries.append(ConversationSummary(peer, self.unread_count(user, peer),
                                                     self.read_position(user, peer), StoredMessage(*row),
                                                     self.receipted_position(user, peer)))
        return summaries, len(latest) > limit

    # -- maintenance -------------------------------------------------------

    def prune(self, older_than_ts: float, limit: int | None = None) -> int:
        """Delete messages with ts < ``older_than_ts``, at most ``limit`` of the oldest; how many.

        With a limit, each call is one short transaction, so a server can prune a large file in
        steps between other work (call again while it returns ``limit``).
        """
        with write_transaction(self._conn, "prune messages"):
            self._index_tail()  # so that the inbox rows of the pruned messages go too
            rows = self._conn.execute(
                "SELECT recipient, id FROM messages WHERE ts < ? ORDER BY id LIMIT ?",
                (older_than_ts, -1 if limit is None else limit),
            ).fetchall()
            self._conn.executemany("DELETE FROM inbox WHERE recipient = ? AND id = ?", rows)
            if rows:  # the search index reads texts from `messages`: its entries go first, given their texts
                self._unindex_upto(min(rows[-1][1], self._search_state()), older_than_ts)
            self._conn.executemany("DELETE FROM messages WHERE id = ?", [(msg_id,) for _, msg_id in rows])
        return len(rows)

    # -- identity ----------------------------------------------------------

    @functools.cached_property
    def epoch(self) -> str:
        """This store's identity (see the module docstring); read once, it never changes."""
        try:
            return str(self._conn.execute("SELECT epoch FROM store_identity").fetchone()[0])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the store's epoch: {exc}") from exc

    def highest_id(self) -> int:
        """The highest message id ever given out: AUTOINCREMENT's high-water mark, which pruning keeps."""
        try:
            row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the highest message id: {exc}") from exc
        return int(row[0]) if row else 0

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its write-ahead log."""
        total = 0
        for file in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size
        return total

    def close(self) -> None:
        """Close the file; further calls fail. Closing twice is harmless."""
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:  # first: the last connection to close checkpoints and removes the WAL
            checkpointer.close()
        # Already closed, or the file went away: closing is all that is left to do.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA optimize")
        self._conn.close()
