#!/usr/bin/env python3
"""Redis's CPU per message for the commit script (``redis_lua.COMMIT``): a baseline tree's against this one's.

The script is the cluster's hot path inside Redis. This starts a redis-server of its own (unix socket,
``appendonly yes`` with ``appendfsync no``: the AOF is written as in production, but the disk's fsync
times, which are not the script's and vary with the machine's other load, stay out; pinned to CPU 0),
loads both trees' COMMIT, and runs the same
batches through each in turn, round after round (order reversed every round): 300 messages per call from
50 senders to 50 recipients, each with a client id, as a loaded node sends them. It prints, per tree, the
redis-server main thread's CPU time (user + sys, from INFO cpu) per committed message: median and per round,
and the median of the rounds' ratios (each round runs both trees back to back: the steadier figure).

    git archive BASE chatcli | tar -x -C /tmp/base
    python benchmarks/redis_commit_ab.py --baseline /tmp/base --rounds 6
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from tests.support.redis_server import RedisServer  # noqa: E402

BATCH = 300
PAIRS = 50


def commit_script(tree: Path) -> tuple[str, bool]:
    """A tree's COMMIT, and whether it takes the batch's reply ids (issue 13) before the messages."""
    spec = importlib.util.spec_from_file_location(f"lua_{abs(hash(tree))}", tree / "chatcli/server/engine/redis_lua.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script: str = module.COMMIT
    return script, "ARGV[3], " in script


def cpu_seconds(client: Any) -> float:
    """The CPU time of Redis's main thread (where scripts run; not the AOF's background threads), to the µs."""
    info = client.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def run(client: Any, sha: str, replies: bool, messages: int) -> float:
    """Redis CPU µs per message for ``messages`` messages through one script, from an empty store (the
    keyspace's growth, rehashing included, is then the same for both trees)."""
    client.flushall()
    client.set("chatcli:epoch", "epoch")
    before = cpu_seconds(client)
    for start in range(0, messages, BATCH):
        args: list[Any] = ["epoch", 3600, ""] if replies else ["epoch", 3600]
        for n in range(start, start + BATCH):
            pair = n % PAIRS
            args += [f"s{pair}", f"r{pair}", f"message {n} from a sender", "1000.5", uuid.uuid4().hex]
        client.evalsha(sha, 4, "chatcli:epoch", "chatcli:ids", "chatcli:users", "chatcli:newest_ts", *args)
    return (cpu_seconds(client) - before) * 1e6 / messages


@contextlib.contextmanager
def redis_on_cpu0() -> Iterator[redis.Redis]:
    """A redis-server of its own (no fsync: the scripts' CPU is measured, not the disk) pinned to CPU 0, and
    a client to it; this process moves to CPU 1."""
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder), extra=["--appendfsync", "no"]).start()
        try:
            assert server.proc is not None
            os.sched_setaffinity(server.proc.pid, {0})
            os.sched_setaffinity(0, {1})
            yield redis.Redis(unix_socket_path=str(server.socket_path))
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a tree with chatcli/ (git archive)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the tree to compare (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--messages", type=int, default=30_000, help="per tree and round")
    options = parser.parse_args()
    trees = {"baseline": options.baseline, "this tree": options.tree}
    with redis_on_cpu0() as client:
        loaded = {name: (client.script_load(script), replies)
                  for name, (script, replies) in ((n, commit_script(t)) for n, t in trees.items())}
        figures: dict[str, list[float]] = {name: [] for name in trees}
        for round_ in range(options.rounds):
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for name in order:
                sha, replies = loaded[name]
                figures[name].append(run(client, sha, replies, options.messages))
        for name, values in figures.items():
            print(f"{name:10} {statistics.median(values):6.2f} µs/msg  rounds: "
                  + " ".join(f"{v:.2f}" for v in values))
        ratios = [new / old for old, new in zip(figures["baseline"], figures["this tree"], strict=True)]
        print(f"this tree / baseline, median of the rounds' ratios: {statistics.median(ratios):.3f}")

if __name__ == "__main__":
    main()
