#!/usr/bin/env python3
"""`chatcli listen` draining a stored backlog into a pipe: messages per second and client CPU per message.

Starts `chatcli serve --rate 1000000 --burst 1000000` (SQLite, in a scratch folder) pinned to CPU 0, stores
MESSAGES messages for bob with `chatcli send --lines`, then runs `chatcli listen bob --count MESSAGES --since
all` pinned to CPU 1, its stdout a pipe this script reads and discards (as `| jq` would), from each tree in
turn (a folder holding a `chatcli` package, e.g. `git archive BASE chatcli | tar -x -C /tmp/base`; `.` is
this checkout). Prints per run and as medians: wall time, msg/s, the client's CPU (user + sys) per message,
and the server's CPU over the run.

    python benchmarks/listen_drain.py --runs 5 /tmp/base .
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from native_path import cpu_seconds, wait_port  # benchmarks/ is the script's directory


def drain(tree: str, url: str, count: int) -> tuple[float, float]:
    """One `listen` run: (wall seconds, client CPU seconds)."""
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    started = time.perf_counter()
    listen = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "chatcli", "listen", "bob", "--count",
                               str(count), "--since", "all", "--url", url],
                              env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert listen.stdout is not None
    lines = 0
    while chunk := listen.stdout.read1(1 << 16):
        lines += chunk.count(b"\n")
    _, status, usage = os.wait4(listen.pid, 0)
    wall = time.perf_counter() - started
    if status != 0 or lines != count:
        raise SystemExit(f"listen from {tree} exited {status} after {lines} lines")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="folders holding a chatcli package ('.' for this checkout)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--port", type=int, default=17400)
    args = parser.parse_args()
    url = f"ws://127.0.0.1:{args.port}"
    here = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with tempfile.TemporaryDirectory(prefix="chatcli-drain-") as scratch:
        server = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "chatcli", "serve", "--db", f"{scratch}/chatcli.db",
             "--ws-port", str(args.port), "--http-port", "0", "--rate", "1000000", "--burst", "1000000"],
            env=here, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(args.port)
            subprocess.run([sys.executable, "-m", "chatcli", "send", "--lines", "alice", "bob", "--url", url],
                           input="".join(f"message {i}\n" for i in range(args.messages)).encode(), env=here,
                           cwd=scratch, check=True)
            results: dict[str, list[tuple[float, float, float]]] = {tree: [] for tree in args.trees}
            for run in range(args.runs):
                for tree in args.trees:
                    before = cpu_seconds(server.pid)
                    wall, client = drain(tree, url, args.messages)
                    results[tree].append((wall, client, cpu_seconds(server.pid) - before))
                    print(f"run {run + 1} {tree}: {wall:.2f} s, {args.messages / wall:,.0f} msg/s, client "
                          f"{client / args.messages * 1e6:.1f} µs/msg, server {results[tree][-1][2]:.2f} s",
                          flush=True)
        finally:
            server.terminate()
            server.wait()
    print(f"\nmedians of {args.runs} ({args.messages:,} messages):")
    for tree, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        client = statistics.median(r[1] for r in runs)
        print(f"{tree}: {args.messages / wall:,.0f} msg/s, client {client / args.messages * 1e6:.1f} µs/msg "
              f"(all runs: {', '.join(f'{args.messages / r[0] / 1000:.1f}k' for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
