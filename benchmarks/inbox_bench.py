"""What the inbox and unread counts cost as a user's history grows (issue 12): they must not scan it.

    .venv/bin/python benchmarks/inbox_bench.py [--sizes 10000,100000,400000] [--dir DIR]

For each history size, fills a store with that many messages to one user from 20 peers (and as
many between other users), leaves the last 5 from each peer unread, then prints the time of
``conversations`` (the inbox answer: 20 conversations with unread counts and the newest message),
``unread_count`` for one peer, and ``mark_read``. With the ``reads`` component's index on
``inbox (recipient, sender, id)`` these stay flat as the history grows; the last column, a count
of the user's messages from one peer read through the recipient index alone (what counting without
the index would cost), grows with it. The first columns are the cost per message of appending (bulk
indexing of the log's tail every 8192 messages included, which is where the extra index is paid),
with the index and without it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from chatcli.server.engine.base import NewMessage
from chatcli.server.storage import SQLiteStore

PEERS = 20
UNREAD_PER_PEER = 5
TEXT = "a typical chat message of about sixty bytes, nothing special"


def fill(store: SQLiteStore, size: int) -> float:
    """``size`` messages to "me" from PEERS peers, interleaved with as many between others, in batches of
    1000 as a busy relay commits them; µs per message, the bulk indexing of the tail included."""
    now = time.time()
    spent = 0.0
    for start in range(0, size, 500):
        batch = []
        for n in range(start, min(size, start + 500)):
            batch.append(NewMessage(f"peer{n % PEERS}", "me", TEXT, now))
            batch.append(NewMessage(f"other{n % 97}", f"other{(n + 1) % 97}", TEXT, now))
        began = time.perf_counter()
        store.append(batch)
        spent += time.perf_counter() - began
    return spent / (2 * size) * 1e6


def timed(call: Callable[[], object], repeat: int = 20) -> float:
    """Milliseconds per call (best of ``repeat``)."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - began)
    return best * 1e3


#: +sender: the planner may not use the sender index, so it reads the recipient's whole inbox.
SCAN = "SELECT count(*) FROM inbox WHERE recipient = ? AND +sender = ? AND id > ?"


def measure(directory: Path, size: int) -> str:
    """One line of figures for a history of ``size`` messages to "me"."""
    bare = SQLiteStore(directory / "bare.db")
    bare._conn.execute("DROP INDEX inbox_by_sender")  # the store as it was before the reads component
    without = fill(bare, size)
    bare.close()
    store = SQLiteStore(directory / "inbox.db")
    with_index = fill(store, size)
    newest = store.highest_id()
    for peer in range(PEERS):  # everything read but the last UNREAD_PER_PEER of each peer
        store.mark_read("me", f"peer{peer}", newest - 2 * PEERS * UNREAD_PER_PEER)
    summaries, _ = store.conversations("me", 50)
    assert len(summaries) == PEERS and all(s.unread == UNREAD_PER_PEER for s in summaries), summaries
    figures = (timed(lambda: store.conversations("me", 50)), timed(lambda: store.unread_count("me", "peer0")),
               timed(lambda: store.mark_read("me", "peer0", newest)),
               timed(lambda: store._conn.execute(SCAN, ("me", "peer0", 0)).fetchone(), 3))
    store.close()
    return (f"{size:>9} {with_index:>13.2f} {without:>9.2f} {figures[0]:>9.3f} {figures[1]:>10.3f} "
            f"{figures[2]:>13.3f} {figures[3]:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,400000")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    print(f"{'history':>9} {'append µs/msg':>13} {'no index':>9} {'inbox ms':>9} {'unread ms':>10} "
          f"{'mark_read ms':>13} {'scan ms':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        directory = Path(tempfile.mkdtemp(dir=args.dir))
        try:
            print(measure(directory, size), flush=True)
        finally:
            shutil.rmtree(directory)


if __name__ == "__main__":
    main()
