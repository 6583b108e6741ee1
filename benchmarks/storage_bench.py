"""How much the SQLite message store costs per message.

    .venv/bin/python benchmarks/storage_bench.py [--seconds 0.5] [--dir DIR]

For each fsync mode, with and without client ids, and batch sizes 1, 10, 100
and 1000 (one ``append`` call = one transaction, as the relay does once per
event-loop tick), prints microseconds per message and messages per second.
Then the cost of the reads the relay makes: ``pending``, ``history``, ``first_id_since``
(``Chatcli-Since``: a binary search over ids, O(log n)), ``search`` (FTS5), a batch holding a
reply (checked row by row), ``prune``. ``PYTHONPATH=/path/to/other/tree`` measures another tree's
store with this script (the search rows are left out where it has none).

``--dir`` must be on the disk the server will use: on tmpfs an fsync is free
and the "full" figures mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from chatcli.server.engine.options import Fsync
from chatcli.server.storage import NewMessage, SQLiteStore

BATCH_SIZES = (1, 10, 100, 1000)
USERS = 200
TEXT = "a typical chat message of about sixty bytes, nothing special"
_serial = itertools.count()


def make_batch(size: int, with_client_ids: bool) -> list[NewMessage]:
    now = time.time()
    batch = []
    for _ in range(size):
        n = next(_serial)
        client_id = f"c-{n}" if with_client_ids else None
        batch.append(NewMessage(f"user{n % USERS}", f"user{(n * 7 + 3) % USERS}", TEXT, now, client_id))
    return batch


def time_appends(store: SQLiteStore, batch_size: int, with_client_ids: bool, seconds: float) -> tuple[float, float]:
    """(µs per message, slowest append in ms), appending batches for about ``seconds``."""
    batches = 0
    spent = slowest = 0.0
    while spent < seconds or batches < 3:
        batch = make_batch(batch_size, with_client_ids)  # built outside the timed part, like the relay
        start = time.perf_counter()
        store.append(batch)
        took = time.perf_counter() - start
        spent += took
        slowest = max(slowest, took)
        batches += 1
    return spent / (batches * batch_size) * 1e6, slowest * 1e3


def time_call(call: Callable[[], object], repeat: int = 200) -> float:
    """Microseconds per call."""
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - start) / repeat * 1e6


def bench_appends(workdir: Path, seconds: float) -> None:
    print(f"{'fsync':<7}{'client ids':<12}{'batch':>6}{'µs/msg':>10}{'msg/s':>12}{'slowest ms':>12}")
    modes = tuple(Fsync)
    for fsync, with_client_ids in itertools.product(modes, (False, True)):
        for batch_size in BATCH_SIZES:
            path = workdir / f"append-{fsync}-{with_client_ids}-{batch_size}.db"
            with SQLiteStore(path, fsync=fsync) as store:
                store.append(make_batch(1000, with_client_ids))  # not an empty table
                micros, slowest = time_appends(store, batch_size, with_client_ids, seconds)
            ids = "yes" if with_client_ids else "no"
            print(f"{fsync:<7}{ids:<12}{batch_size:>6}{micros:>10.2f}{1e6 / micros:>12,.0f}{slowest:>12.1f}")


def bench_indexing(workdir: Path, seconds: float) -> None:
    """The commit path with the inbox and search indexes kept up at every commit, against left for the
    quiet moment after the burst (the server's way), alternated; and what that later indexing costs."""
    if not hasattr(SQLiteStore, "index_some"):  # an older tree: indexing is part of every append
        return
    print("\ncommit path, batches of 1000, fsync normal: indexes kept up at each commit vs left for quiet time")
    for round_ in range(3):
        for label, lag in (("kept up", 0), ("deferred", None)):
            options = {} if lag is None else {"index_lag_max": lag}
            with SQLiteStore(workdir / f"index-{round_}-{label}.db", **options) as store:
                store.append(make_batch(1000, False))
                micros, slowest = time_appends(store, 1000, False, seconds)
                waiting = store.unindexed_rows()
                start = time.perf_counter()
                while store.index_some():  # what the server does once no commit has come for a moment
                    pass
                later = (time.perf_counter() - start) / max(waiting, 1) * 1e6
            print(f"  {label:<9}{micros:>7.2f} µs/msg  slowest {slowest:5.1f} ms", end="")
            print(f"  (+ {later:.2f} µs/msg indexed later, {waiting} rows)" if lag is None else "")


def bench_reads(workdir: Path, rows: int) -> None:
    with SQLiteStore(workdir / "reads.db") as store:
        for _ in range(rows // 1000):
            store.append(make_batch(1000, False))
        print(f"\nreads on {rows:,} messages, {USERS} users ({store.size_bytes() / 1e6:.1f} MB):")
        cursors = {f"user{i}": 10**6 for i in range(100)}
        online = {f"user{i}" for i in range(0, 20_000 * 7, 7)}  # a few of them contacts of user3
        fifty = set(sorted(online)[:50])
        store.append([NewMessage("hub", f"user{i}", TEXT, time.time()) for i in range(5000)])
        middle = store.first_id_since(0.0) or 0
        (middle_ts,) = [m.ts for m in store.iter_messages_to("user3", middle + rows // 2, limit=1)] or [0.0]
        figures = {
            "pending(user, after_id=0) -> 1000 msgs": time_call(lambda: store.pending("user3", 0)),
            "pending(user), nothing pending": time_call(lambda: store.pending("user3", 10**9)),
            "history(user, peer, limit=50)": time_call(lambda: store.history("user3", "user24")),
            "advance_cursors(100 users)": time_call(lambda: store.advance_cursors(cursors)),
            # --presence contacts: who / watch ask which online users are contacts.
            "contacts_among(user, 50 online)": time_call(lambda: store.contacts_among("user3", fifty)),
            "contacts_among(user, 20,000 online)": time_call(lambda: store.contacts_among("user3", online), 20),
            "contacts_among(hub of 5,000, 50 online)": time_call(lambda: store.contacts_among("hub", fifty)),
            "first_id_since(a time mid-log)": time_call(lambda: store.first_id_since(middle_ts)),
            "first_id_since(a future time)": time_call(lambda: store.first_id_since(time.time() + 3600)),
            "pending page after first_id_since(middle)": time_call(
                lambda: store.messages_to("user3", since_ts=middle_ts, limit=500), repeat=20),
        }
        if hasattr(store, "iter_search"):  # issue 13; absent from older trees, which this script also measures
            from chatcli.server.engine.pages import SearchScan

            def search(user: str, words: str) -> object:
                return list(store.iter_search(user, words, SearchScan(), limit=20))

            figures |= {
                "search(user, a word in every message)": time_call(lambda: search("user3", "typical"), 50),
                "search(user, a word in no message)": time_call(lambda: search("user3", "zebra"), 50),
                "search(another user's word: the cap)": time_call(lambda: search("nobody", "typical"), 10),
                "append 100 with 1 reply (checked path)": time_call(lambda: store.append(
                    [*make_batch(99, False), NewMessage("user3", "user24", TEXT, time.time(), None, 1)]), 50),
            }
        for name, micros in figures.items():
            print(f"  {name:<40}{micros:>10.0f} µs")
        start = time.perf_counter()
        deleted = store.prune(time.time() + 1)
        print(f"  {f'prune (deletes all {deleted:,})':<40}{(time.perf_counter() - start) * 1e3:>10.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent per figure (default 0.5)")
    parser.add_argument("--rows", type=int, default=200_000, help="messages in the table for the reads")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the database files")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatcli-bench-", dir=args.dir))
    try:
        bench_appends(workdir, args.seconds)
        bench_indexing(workdir, args.seconds)
        bench_reads(workdir, args.rows)
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
