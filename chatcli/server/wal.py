"""WAL checkpoints off the commit path: a thread with its own connection copies committed pages into the file.

Why: SQLite's automatic checkpoint runs inside the commit that takes the WAL past
``wal_autocheckpoint`` pages (1,000 by default, about 4 MB): that commit copies the
WAL into the database file and fsyncs it. Measured under the relay benchmark's load,
such a commit took 20-100 ms every ~37,000 messages, and no batch was acknowledged
meanwhile, so every message in flight waited (issue 11 §5). A passive checkpoint on
another connection takes no write lock: commits go on while it copies and syncs.

Bounds: the writer keeps an automatic checkpoint, at ``WAL_LIMIT_PAGES``, for when this
thread cannot keep up (under sustained writes a passive checkpoint never catches up with
the writer, so the WAL restarts only after the writer's own); ``journal_size_limit``
truncates the file after it. Durability is unchanged: the checkpointing connection uses
the store's ``synchronous`` level, and SQLite reuses the WAL only once it is synced.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Final

__all__ = ["CHECKPOINT_INTERVAL_S", "WAL_LIMIT_PAGES", "Checkpointer"]

log = logging.getLogger("chatcli.server")

#: The writer's own automatic checkpoint, the safety net (pages of 4 KiB: 64 MiB).
WAL_LIMIT_PAGES: Final = 16384
#: At most one background checkpoint per this many seconds: each copies what the commits meanwhile wrote.
CHECKPOINT_INTERVAL_S: Final = 0.2


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on ``conn`` (its own connection to the store's file) in a
    thread, after commits; ``writer`` (the committing connection) keeps only the safety-net checkpoint."""

    def __init__(self, conn: sqlite3.Connection, writer: sqlite3.Connection) -> None:
        writer.execute(f"PRAGMA wal_autocheckpoint = {WAL_LIMIT_PAGES}")
        self._conn = conn
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failed = False  # logged once until a checkpoint succeeds again
        self._thread = threading.Thread(target=self._run, name="chatcli-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A commit added pages to the WAL (cheap: sets an event)."""
        self._wake.set()

    def close(self) -> None:
        """Stop the thread and close its connection (the store's own close then checkpoints the rest)."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            self._checkpoint()
            if self._stop.wait(CHECKPOINT_INTERVAL_S):
                return

    def _checkpoint(self) -> None:
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the writer's own checkpoint still bounds the WAL
            if not self._failed:
                log.warning("background WAL checkpoint failed: %s", exc, extra={"event": "checkpoint-failed"})
            self._failed = True
        else:
            self._failed = False
