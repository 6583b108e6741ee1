"""The SQLite engine (the default): messages, cursors, contacts and accounts in one file.

The file's format is ``chatcli.server.storage`` (messages, cursors, contacts) and
``chatcli.server.accounts`` (tokens); this module makes them an ``Engine``. Every
message read and write runs on the storage thread (``StorageRunner``), in the
order the relay started them, never on the event loop: while one batch is being
committed, the next ticks' messages gather into the next batch.

Indexing waits for quiet: once no commit has come for ``QUIET_SECONDS``, the storage thread indexes the
log's tail a chunk at a time (``SQLiteStore.index_some``), stopping as soon as commits come again; during a
burst only a tail past ``INDEX_LAG_MAX`` rows is indexed by the commits themselves.

Health: a failed storage call is reported by /healthz until a later one succeeds;
a damaged file (SQLite finds it malformed) until a restart; a file deleted or
replaced under the server, for good (``SQLiteStore.verify_file``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, Final, TypeVar

from chatcli import protocol as p
from chatcli.errors import StorageError
from chatcli.server.accounts import AccountStore
from chatcli.server.engine.base import (
    Appended,
    BacklogPage,
    Capability,
    Encoder,
    EngineListener,
    InboxPage,
    NewMessage,
    ReadMarks,
)
from chatcli.server.engine.options import Fsync
from chatcli.server.engine.pages import read_backlog_page, read_history_answer, read_search_answer
from chatcli.server.engine.presence import LocalPresence
from chatcli.server.storage import SQLiteStore
from chatcli.server.storage_thread import StorageRunner

__all__ = ["DAMAGED_FILE_ERRORS", "SQLiteEngine"]

log = logging.getLogger("chatcli.server")

T = TypeVar("T")

#: SQLite's names for a damaged file: unlike a full disk or a held lock, a later success does not undo them.
DAMAGED_FILE_ERRORS: Final = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
#: No commit for this long, and the storage thread indexes the log's tail. Short enough that a search or an
#: inbox after a burst rarely waits for indexing; long enough that a burst's short lulls are not taken for it.
QUIET_SECONDS: Final = 0.05


class SQLiteEngine:
    """``Engine`` on one SQLite file, its calls run by ``runner`` (the storage thread)."""

    name = "sqlite"
    capabilities: frozenset[Capability] = frozenset(Capability)

    def __init__(self, store: SQLiteStore, accounts: AccountStore | None, runner: StorageRunner) -> None:
        self.store = store
        self.accounts = accounts
        self._runner = runner
        self.epoch = store.epoch  # read at open: a file that cannot tell it was refused there
        self.newest_ts = store.newest_ts
        self.presence = LocalPresence()
        # Read once here and then kept by our own commits (this process is the only writer of
        # messages): a handshake must not wait for the storage thread.
        self._highest_id = self._read_highest_id()
        self._listener: EngineListener | None = None  # one process: nothing is committed elsewhere
        #: The last storage failure, until a later storage call succeeds.
        self._error: str | None = None
        #: The file is damaged: reported until a restart, whatever succeeds later.
        self._damaged: str | None = None
        self._last_commit = 0.0  # time.monotonic() of the last commit: indexing waits for quiet
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._indexing = False  # an index_some job is queued or running
        self._closed = False
        if store.unindexed_rows() > 0:  # left by the last run: index it once quiet
            self._wait_for_quiet(QUIET_SECONDS)

    @classmethod
    def open(cls, path: str | os.PathLike[str], fsync: Fsync, runner: StorageRunner) -> SQLiteEngine:
        """Open (creating if missing) the file's messages and accounts; raises StorageError or OSError."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(path, fsync, background_checkpoints=True)  # no commit pays a WAL checkpoint
        try:
            return cls(store, AccountStore(path), runner)
        except BaseException:
            store.close()
            raise

    def attach(self, listener: EngineListener) -> None:
        self._listener = listener

    def _read_highest_id(self) -> int:
        try:
            return self.store.highest_id()
        except StorageError as exc:  # cannot tell: trust the client's id, as before epochs existed
            log.error("could not read the highest message id: %s", exc, extra={"event": "storage-error"})
            return p.MAX_INT

    def highest_id(self) -> int:
        return self._highest_id

    # -- work on the storage thread ------------------------------------------------------

    def _submit(self, job: Callable[[], T], done: Callable[[T | StorageError], None]) -> None:
        """Run ``job`` on the storage thread; its outcome updates health, then goes to ``done``."""
        def finished(result: T | StorageError) -> None:
            self._note(result)
            done(result)

        self._runner.submit(job, finished)

    def _note(self, result: object) -> None:
        if isinstance(result, StorageError):
            self._error = str(result)
            if getattr(result.__cause__, "sqlite_errorname", None) in DAMAGED_FILE_ERRORS:
                self._damaged = self._damaged or str(result)
        else:
            self._error = None

    def append(self, batch: Sequence[NewMessage], cursors: Mapping[str, int],
               done: Callable[[Appended | StorageError], None]) -> None:
        store = self.store

        def committed(appended: Appended | StorageError) -> None:
            if not isinstance(appended, StorageError) and appended.ids:
                self._highest_id = max(self._highest_id, max(appended.ids))
                self._last_commit = time.monotonic()
                if self._quiet_timer is None and not self._indexing:
                    self._wait_for_quiet(QUIET_SECONDS)
            done(appended)

        self._submit(lambda: store.append(batch, cursors), committed)

    # -- indexing in quiet moments ---------------------------------------------------------

    def _wait_for_quiet(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tools, in-process tests): commits past INDEX_LAG_MAX index
            return
        if not self._closed:
            self._quiet_timer = loop.call_later(delay, self._index_if_quiet)

    def _index_if_quiet(self) -> None:
        """Index a chunk if no commit came for QUIET_SECONDS; else wait until that much after the last one."""
        self._quiet_timer = None
        if self._closed or self.store.unindexed_rows() <= 0:
            return
        still = self._last_commit + QUIET_SECONDS - time.monotonic()
        if still > 0:
            self._wait_for_quiet(still)
            return
        self._indexing = True
        self._runner.submit(self.store.index_some, self._indexed_some)  # not _submit: health is about requests

    def _indexed_some(self, more: bool | StorageError) -> None:
        self._indexing = False
        if more is True:  # False: done, or failed (logged; the next commit tries again)
            self._index_if_quiet()

    def read_backlog(self, user: str, after: int | None, since_ts: float | None, encode: Encoder,
                     done: Callable[[BacklogPage | StorageError], None]) -> None:
        store = self.store
        self._submit(lambda: read_backlog_page(store, user, encode, after, since_ts), done)

    def read_history(self, user: str, request: p.HistoryRequest, done: Callable[[str | StorageError], None]) -> None:
        store = self.store
        self._submit(lambda: read_history_answer(store, user, request), done)

    def read_search(self, user: str, request: p.SearchRequest, done: Callable[[str | StorageError], None]) -> None:
        store = self.store
        self._submit(lambda: read_search_answer(store, user, request), done)

    def contacts_among(self, user: str, candidates: Set[str]) -> set[str]:
        return self.store.contacts_among(user, candidates)

    def mark_read(self, marks: ReadMarks, done: Callable[[dict[tuple[str, str], int] | StorageError], None]) -> None:
        store = self.store
        self._submit(lambda: store.mark_read_many(marks), done)

    def read_inbox(self, user: str, limit: int, done: Callable[[InboxPage | StorageError], None]) -> None:
        store = self.store
        self._submit(lambda: InboxPage(*store.conversations(user, limit)), done)

    def pass_on(self, user: str, frame: str) -> None:
        return None  # one process: the relay told every session there is

    async def prune(self, older_than_ts: float, limit: int) -> int:
        deleted = await self._runner.call(functools.partial(self.store.prune, older_than_ts, limit=limit))
        self._note(deleted)
        if isinstance(deleted, StorageError):
            raise deleted
        return deleted

    async def settle(self) -> None:
        await self._runner.call(lambda: None)  # after every job submitted so far; their done calls are queued first

    # -- health and closing -------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        error = self.store.verify_file() or self._damaged or self._error
        health: dict[str, Any] = {"mode": self.name, "ok": error is None, "db_bytes": self.store.size_bytes()}
        if error is not None:
            health["error"] = error
        return health

    def close(self) -> None:
        self._closed = True
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
        self.store.close()
        if self.accounts is not None:
            self.accounts.close()

    def prometheus_lines(self) -> list[str]:
        return []
