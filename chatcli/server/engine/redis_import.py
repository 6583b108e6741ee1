"""Move a single server's SQLite database into an empty Redis (``chatcli migrate-to-redis``).

Everything a node needs comes across: accounts (their salted token hashes, so every
token keeps working), every stored message (undelivered ones and history alike), and
each user's cursor. Message ids and the store's epoch are kept as they are, so
clients resume where they were (``listen`` and ``chat`` keep their cursors; nothing is
replayed or skipped). The layout written is the one ``redis_lua.COMMIT`` writes.

Contacts (``--presence contacts``), read positions with their receipt flags (the chat's inbox) and
replies' ``reply_to`` come across too. Not moved: client ids
(idempotency keys expire after a week anyway: a client resending across the move
gets a new message instead of "duplicate").

The database is read, never written; the server should be stopped first. Redis must
hold no chatcli store yet: merging two stores' ids would break every cursor.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import redis

from chatcli.errors import StorageError
from chatcli.server.engine.redis_lua import (
    ACCOUNTS_KEY,
    EPOCH_KEY,
    IDS_KEY,
    NEWEST_KEY,
    USERS_KEY,
    contacts_key,
    inbox_key,
    meta_key,
    peer_key,
    reads_key,
)

__all__ = ["MigrationReport", "migrate_to_redis"]

#: Messages written per pipeline.
CHUNK: Final = 2000
#: Progress lines at most this often.
PROGRESS_EVERY_S: Final = 1.0


class MigrationReport(NamedTuple):
    messages: int
    users: int
    accounts: int
    epoch: str


def migrate_to_redis(db: Path, url: str, progress: Callable[[int, int], None]) -> MigrationReport:
    """Copy ``db`` into the Redis at ``url``; ``progress(done, total)`` is called about once a second.
    Raises StorageError (nothing written) when the file cannot be read or Redis already has a store."""
    if not db.is_file():
        raise StorageError(f"no database at {db}")
    source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    target: Any = redis.Redis.from_url(url, socket_timeout=30)
    try:
        epoch, total = _read_identity(source)
        if target.exists(EPOCH_KEY):
            raise StorageError("Redis already holds a chatcli store (chatcli:epoch exists): move into an empty one")
        moved, seqs, newest, top = _copy_messages(source, target, total, progress)
        users = _write_metas(source, target, epoch, seqs)
        accounts = _copy_accounts(source, target)
        _copy_contacts(source, target)
        _copy_read_positions(source, target)
        target.set(NEWEST_KEY, repr(newest))
        target.set(IDS_KEY, top)
        target.set(EPOCH_KEY, epoch)  # last: a node refuses nothing until the store is whole
        return MigrationReport(moved, users, accounts, epoch)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {db}: {exc}") from exc
    except redis.RedisError as exc:
        raise StorageError(f"cannot write to Redis: {exc}") from exc
    finally:
        source.close()
        target.close()


def _read_identity(source: sqlite3.Connection) -> tuple[str, int]:
    try:
        (epoch,) = source.execute("SELECT epoch FROM store_identity").fetchone()
    except sqlite3.OperationalError as exc:
        raise StorageError("this is not a chatcli database (or one older than epochs: open it once with "
                           f"`chatcli serve --db` first): {exc}") from exc
    (total,) = source.execute("SELECT count(*) FROM messages").fetchone()
    return str(epoch), int(total)


def _rows(source: sqlite3.Connection) -> Iterator[tuple[int, str, str, str, float, int | None]]:
    columns = {row[1] for row in source.execute("PRAGMA table_info(messages)")}
    reply_to = "reply_to" if "reply_to" in columns else "NULL"  # a file from before replies has none
    yield from source.execute(f"SELECT id, sender, recipient, text, ts, {reply_to} FROM messages ORDER BY id")


def _copy_messages(source: sqlite3.Connection, target: Any, total: int,
                   progress: Callable[[int, int], None]) -> tuple[int, dict[str, tuple[int, int]], float, int]:
    """Every message into its recipient's inbox and (its id) conversation stream; per user (sequence, last id)."""
    seqs: dict[str, tuple[int, int]] = {}
    moved, newest, top, shown = 0, 0.0, 0, time.monotonic()
    pipe = target.pipeline(transaction=False)
    for msg_id, sender, recipient, text, ts, reply_to in _rows(source):
        seq = seqs.get(recipient, (0, 0))[0] + 1
        seqs[recipient] = (seq, msg_id)
        entry = f"{msg_id}-0"
        fields: dict[str, Any] = {"f": sender, "t": text, "ts": repr(ts)}
        if reply_to is not None:
            fields["r"] = reply_to
        pipe.xadd(inbox_key(recipient), {"s": seq, **fields}, id=entry)
        pipe.xadd(peer_key(recipient, sender), {"f": sender}, id=entry)  # ids only: the text is in the inbox
        moved, newest, top = moved + 1, max(newest, ts), msg_id
        if moved % CHUNK == 0:
            pipe.execute()
            if time.monotonic() - shown >= PROGRESS_EVERY_S:
                progress(moved, total)
                shown = time.monotonic()
    pipe.execute()
    progress(moved, total)
    return moved, seqs, newest, top


def _write_metas(source: sqlite3.Connection, target: Any, epoch: str, seqs: dict[str, tuple[int, int]]) -> int:
    cursors = dict(source.execute("SELECT user, last_id FROM cursors"))
    pipe = target.pipeline(transaction=False)
    for user in seqs.keys() | cursors.keys():
        seq, _ = seqs.get(user, (0, 0))
        fields: dict[str, Any] = {"c": cursors.get(user, 0)}
        if seq:
            fields.update(e=epoch, s=seq)
            pipe.sadd(USERS_KEY, user)
        pipe.hset(meta_key(user), mapping=fields)
    pipe.execute()
    return len(seqs)


def _copy_contacts(source: sqlite3.Connection, target: Any) -> None:
    """Who exchanged a message with whom (``--presence contacts``), as the commit script keeps it."""
    try:
        rows = source.execute("SELECT user, peer FROM contacts")
    except sqlite3.OperationalError:  # a database from before contacts: the messages say the same
        rows = source.execute("SELECT sender, recipient FROM messages UNION SELECT recipient, sender FROM messages")
    pipe = target.pipeline(transaction=False)
    for count, (user, peer) in enumerate(rows, 1):
        pipe.sadd(contacts_key(user), peer)
        if count % CHUNK == 0:
            pipe.execute()
    pipe.execute()


def _copy_read_positions(source: sqlite3.Connection, target: Any) -> None:
    """Each user's read position per conversation and its receipt flag, as ``MARK_READ`` keeps them."""
    try:
        rows = source.execute("SELECT user, peer, last_id, receipts FROM read_positions")
    except sqlite3.OperationalError:  # a database from before read positions
        return
    pipe = target.pipeline(transaction=False)
    for count, (user, peer, last_id, receipts) in enumerate(rows, 1):
        pipe.hset(reads_key(user), peer, f"{int(last_id)}:{int(bool(receipts))}")
        if count % CHUNK == 0:
            pipe.execute()
    pipe.execute()


def _copy_accounts(source: sqlite3.Connection, target: Any) -> int:
    try:
        rows = source.execute("SELECT name, salt, token_hash, created_ts FROM accounts").fetchall()
    except sqlite3.OperationalError:  # a database that never had an account has no table
        return 0
    for name, salt, token_hash, created_ts in rows:
        target.hset(ACCOUNTS_KEY, name, f"{bytes(salt).hex()}:{bytes(token_hash).hex()}:{float(created_ts)!r}")
    return len(rows)
