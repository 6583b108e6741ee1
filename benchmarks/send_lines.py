#!/usr/bin/env python3
"""`seq N | chatcli send --lines alice bob`: lines per second, beside the Node load generator's single pair.

Starts `chatcli serve` from this checkout (SQLite in a scratch folder, pinned to CPU 0) with its rate limit
raised (`--rate 1000000 --burst 1000000`, so the client is measured, not the limit), then, round after
round, pipes N lines into `chatcli send --lines` from each tree (a folder holding a `chatcli` package,
e.g. `git archive BASE chatcli | tar -x -C /tmp/base`; `.` is this checkout; `TREE:N` sends N lines from
that tree, for a slow one) and runs `../shared/bench/loadgen.js --pairs 1 --window 32` for N messages
against the same server, each pinned to CPU 1. Issue 11 §1's goal: `send --lines` at least 0.5× the
load generator's pair. Prints per run and medians: lines/s, the client's CPU per line, the ratio.

With ``--default-rate`` it also pipes N lines from each tree into a second server left at its default
``--rate`` (5,000 a second after a burst of 10,000) and prints the exit status and lines/s: what a user
gets without tuning the server.

    python benchmarks/send_lines.py --runs 3 /tmp/base:20000 .
    python benchmarks/send_lines.py --runs 1 --default-rate .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serverprocs import wait_port  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT.parent / "shared" / "bench" / "loadgen.js"
NODE_DIR = Path(os.environ.get("BENCH_NODE_DIR", Path(tempfile.gettempdir()) / "chatcli-bench-node"))


def send_lines(tree: str, url: str, lines: int, sender: str) -> tuple[int, float, float]:
    """One `send --lines` run of ``lines`` lines: (exit status, wall seconds, client CPU seconds)."""
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    text = "".join(f"line {i} of a log that a script pipes in\n" for i in range(lines)).encode()
    started = time.perf_counter()
    proc = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "chatcli", "send", "--lines", sender, "bob",
                             "--url", url], env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(text)
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def loadgen_pair(url: str, messages: int, prefix: str) -> float:
    """The Node load generator's single pipelined pair (window 32): delivered messages per second."""
    out = subprocess.run(["taskset", "-c", "1", "node", str(LOADGEN), "--url", url, "--pairs", "1", "--messages",
                          str(messages), "--window", "32", "--prefix", prefix],
                         env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")},
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["msgs_per_s"])


def start_server(scratch: str, port: int, *limits: str) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "chatcli", "serve", "--db", f"{scratch}/{port}.db",
         "--ws-port", str(port), "--http-port", "0", *limits],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="TREE or TREE:LINES ('.' for this checkout)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--default-rate", action="store_true", help="also send into a server at its default --rate")
    parser.add_argument("--port", type=int, default=17450)
    args = parser.parse_args()
    trees = [(spec.rpartition(":")[0], int(spec.rpartition(":")[2])) if ":" in spec else (spec, args.lines)
             for spec in args.trees]
    url = f"ws://127.0.0.1:{args.port}"
    mine: dict[str, list[tuple[float, float]]] = {tree: [] for tree, _ in trees}
    pair: list[float] = []
    with tempfile.TemporaryDirectory(prefix="chatcli-lines-") as scratch:
        server = start_server(scratch, args.port, "--rate", "1000000", "--burst", "1000000")
        try:
            for run in range(args.runs):
                for index, (tree, lines) in enumerate(trees):
                    status, wall, cpu = send_lines(tree, url, lines, f"s{run}t{index}")
                    if status != 0:
                        raise SystemExit(f"send --lines from {tree} exited {status}")
                    mine[tree].append((lines / wall, cpu / lines * 1e6))
                    print(f"run {run + 1} {tree}: {lines:,} lines in {wall:.2f} s, {lines / wall:,.0f} lines/s, "
                          f"client {cpu / lines * 1e6:.1f} µs/line", flush=True)
                pair.append(loadgen_pair(url, args.lines, f"lg{run}"))
                print(f"run {run + 1} loadgen.js --pairs 1 --window 32: {pair[-1]:,.0f} msg/s", flush=True)
        finally:
            server.terminate()
            server.wait()
        if args.default_rate:
            server = start_server(scratch, args.port + 1)
            try:
                for index, (tree, lines) in enumerate(trees):
                    status, wall, _ = send_lines(tree, f"ws://127.0.0.1:{args.port + 1}", lines, f"d{index}")
                    print(f"default --rate, {tree}: {lines:,} lines, exit {status}, {wall:.2f} s "
                          f"({lines / wall:,.0f} lines/s)", flush=True)
            finally:
                server.terminate()
                server.wait()
    node = statistics.median(pair)
    print(f"\nmedians of {args.runs}: loadgen.js pair {node:,.0f} msg/s")
    for tree, runs in mine.items():
        rate = statistics.median(r[0] for r in runs)
        print(f"{tree}: {rate:,.0f} lines/s, {rate / node:.2f}× the pair, client "
              f"{statistics.median(r[1] for r in runs):.1f} µs/line")
    return 0


if __name__ == "__main__":
    sys.exit(main())
