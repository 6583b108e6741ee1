#!/usr/bin/env python3
"""What the inbox, unread counts and search cost on a cluster's Redis as a user's history grows.

    .venv/bin/python benchmarks/redis_inbox_bench.py [--sizes 10000,100000,400000]

For each history size, starts a redis-server of its own (unix socket, no persistence: the figures are
reads) and fills it through the Redis engine's commit with that many messages to one user from 20
peers (and as many between other users), as benchmarks/inbox_bench.py does for SQLite. Then, with the
user's read positions (a) leaving the last 5 of each peer unread and (b) in the middle of each
conversation (more than ``UNREAD_COUNT_MAX`` on both sides: the bounded case), it prints the inbox's
time (20 conversations, best of 20, wall clock through the engine) and Redis's main-thread CPU per
inbox, and the time of a search for a word no message holds (the whole bounded scan). Flat columns as
the history grows are the point: nothing reads the history.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatcli import protocol as p  # noqa: E402
from chatcli.server.engine.base import NewMessage  # noqa: E402
from chatcli.server.engine.redis_engine import RedisEngine  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

PEERS = 20
TEXT = "a typical chat message of about sixty bytes, nothing special"


def call(start: Callable[[Callable[[Any], None]], None]) -> Awaitable[Any]:
    """An engine call with a ``done`` callback, as an awaitable of its result."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    start(future.set_result)
    return future


async def fill(engine: RedisEngine, size: int) -> None:
    now = time.time()
    for start in range(0, size, 500):
        batch = []
        for n in range(start, min(size, start + 500)):
            batch.append(NewMessage(f"peer{n % PEERS}", "me", TEXT, now))
            batch.append(NewMessage(f"other{n % 97}", f"other{(n + 1) % 97}", TEXT, now))
        await call(lambda done, batch=batch: engine.append(batch, {}, done))  # type: ignore[misc]


async def timed(work: Callable[[], Awaitable[Any]], engine: RedisEngine, repeat: int = 20) -> tuple[float, float]:
    """(best wall ms, mean Redis main-thread CPU ms) per call."""
    best, cpu_before = float("inf"), await redis_cpu(engine)
    for _ in range(repeat):
        began = time.perf_counter()
        await work()
        best = min(best, time.perf_counter() - began)
    return best * 1e3, (await redis_cpu(engine) - cpu_before) * 1e3 / repeat


async def redis_cpu(engine: RedisEngine) -> float:
    info = await engine._redis.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


async def measure(size: int) -> str:
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder), extra=["--appendonly", "no"]).start()
        engine = await RedisEngine.open(server.url, strict=False)
        try:
            await fill(engine, size)
            top = int(await engine._redis.get("chatcli:ids"))
            figures = []
            for position in (top - 2 * PEERS * 5, top // 2):  # the last 5 of each peer unread; half of each
                marks = {("me", f"peer{n}"): (position, True) for n in range(PEERS)}
                await call(lambda done, marks=marks: engine.mark_read(marks, done))  # type: ignore[misc]
                page = await call(lambda done: engine.read_inbox("me", 50, done))
                assert len(page.conversations) == PEERS, page
                figures += await timed(lambda: call(lambda done: engine.read_inbox("me", 50, done)), engine)
            search = p.SearchRequest("s", "absent")
            figures += await timed(lambda: call(lambda done: engine.read_search("me", search, done)), engine, 3)
        finally:
            await engine.aclose()
            server.stop()
    return f"{size:>9} " + " ".join(f"{figure:>11.2f}" for figure in figures)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,400000")
    args = parser.parse_args()
    print(f"{'history':>9} {'inbox ms':>11} {'Redis ms':>11} {'bounded ms':>11} {'Redis ms':>11} "
          f"{'search ms':>11} {'Redis ms':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        print(await measure(size), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
