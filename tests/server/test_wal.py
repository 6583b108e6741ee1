"""WAL checkpoints in the background (``chatcli.server.wal``), on real database files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chatcli.server.storage import NewMessage, SQLiteStore
from chatcli.server.wal import WAL_LIMIT_PAGES
from tests.support.processes import wait_until

BATCH = [NewMessage("alice", "bob", "x" * 200, 1.0, None)] * 500  # about 150 KB of pages per commit


def file_pages(path: Path) -> int:
    """Pages in the database file itself: what checkpoints copied out of the WAL."""
    return path.stat().st_size // 4096


def test_committed_pages_reach_the_database_file_without_the_writer_checkpointing(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    with SQLiteStore(path, background_checkpoints=True) as store:
        start = file_pages(path)
        for _ in range(10):  # ~1.5 MB: the writer's own checkpoint starts only past WAL_LIMIT_PAGES (64 MB)
            store.append(BATCH)
        wait_until(lambda: file_pages(path) > start + 200, what="a background checkpoint")
        assert store.append(BATCH).ids[-1] == 5500  # commits go on as before


def test_the_writer_keeps_its_own_checkpoint_as_a_safety_net(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    with SQLiteStore(path, background_checkpoints=True) as store:
        (limit,) = store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    assert limit == WAL_LIMIT_PAGES


def test_a_closed_store_leaves_one_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    with SQLiteStore(path, background_checkpoints=True) as store:
        store.append(BATCH)
    assert not path.with_name("chat.db-wal").exists()  # the last connection checkpointed and removed it
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (500,)
