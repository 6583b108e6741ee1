#!/usr/bin/env python3
"""The relay benchmark's load, servers interleaved: a baseline tree against this checkout, and the Node server.

``relay.py`` measures one server after the other, so a change in the machine's load between them moves
their ratio. This starts every server once (each pinned to CPU 0) and then runs the same Node load
generator (``../shared/bench/loadgen.js``, pinned to CPU 1: 50 pairs, 2,000 messages each, window 32)
against each in turn, round after round, reversing the order every round. Per server it prints each
run and the medians: delivered msg/s, p50 and p99 latency, and the server's CPU (user + sys, all
threads) per delivered message, the figure the machine's load moves least.

    git archive BASE chatcli | tar -x -C /tmp/base
    python benchmarks/relay_ab.py --baseline /tmp/base --rounds 8
    python benchmarks/relay_ab.py --baseline /tmp/base --rounds 8 --config ephemeral=--ephemeral

Each ``--config NAME=ARGS`` is measured for both trees (default: ``sqlite=`` and ``ephemeral=--ephemeral``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serverprocs import cpu_seconds, wait_port  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT.parent / "shared" / "bench" / "loadgen.js"
SEED = ROOT.parent / "shared" / "peers" / "seed-node" / "server.js"
#: Each server listens on PORT_BASE + 10 * its position (its HTTP port on the next one).
PORT_BASE = 18700
NODE_DIR = Path(os.environ.get("BENCH_NODE_DIR", Path(tempfile.gettempdir()) / "chatcli-bench-node"))


def start(argv: list[str], port: int, scratch: str, tree: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, WS_PORT=str(port), HTTP_PORT=str(port + 1), QUIET="1",
               NODE_PATH=str(NODE_DIR / "node_modules"))
    if tree is not None:
        env["PYTHONPATH"] = tree
    # Not from the checkout: `-m` puts the working folder first on sys.path, ahead of PYTHONPATH.
    return subprocess.Popen(["taskset", "-c", "0", *argv], env=env, cwd=scratch, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load(port: int, prefix: str) -> dict[str, float]:
    out = subprocess.run(["taskset", "-c", "1", "node", str(LOADGEN), "--url", f"ws://127.0.0.1:{port}",
                          "--pairs", "50", "--messages", "2000", "--window", "32", "--prefix", prefix],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NODE_PATH=str(NODE_DIR / "node_modules")))
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def servers(args: argparse.Namespace, scratch: str) -> list[tuple[str, list[str], str | None]]:
    """(name, argv, PYTHONPATH) of every server, the Node server first."""
    chosen: list[tuple[str, list[str], str | None]] = [("seed-node", ["node", str(SEED)], None)]
    for config in args.config or ["sqlite=", "ephemeral=--ephemeral"]:
        name, _, extra = config.partition("=")
        for label, tree in (("before", args.baseline), ("after", None)):
            db = ["--db", f"{scratch}/{name}-{label}.db"] if "--ephemeral" not in extra else []
            chosen.append((f"{name}-{label}", [sys.executable, "-m", "chatcli", "serve", "--ws-port", "{port}",
                                               "--http-port", "0", *db, *shlex.split(extra)], tree))
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a folder holding the baseline's chatcli package")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--config", action="append", metavar="NAME=ARGS", help="chatcli serve arguments to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatcli-relay-ab-") as scratch:
        chosen = servers(args, scratch)
        procs = [start([a.replace("{port}", str(PORT_BASE + 10 * i)) for a in argv], PORT_BASE + 10 * i, scratch, tree)
                 for i, (_, argv, tree) in enumerate(chosen)]
        try:
            return measure(args.rounds, [name for name, _, _ in chosen], procs)
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()


def measure(rounds: int, names: list[str], procs: list[subprocess.Popen[bytes]]) -> int:
    for i, name in enumerate(names):
        wait_port(PORT_BASE + 10 * i)
        time.sleep(0.5)
        if procs[i].poll() is not None:  # e.g. its port was taken: another process would be measured
            raise SystemExit(f"{name} did not start")
    runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in names}
    for round_ in range(rounds):
        order = range(len(names)) if round_ % 2 == 0 else reversed(range(len(names)))
        for i in order:
            before = cpu_seconds(procs[i].pid)
            result = load(PORT_BASE + 10 * i, f"r{round_}")
            delivered = result["delivered"]
            cpu_us = (cpu_seconds(procs[i].pid) - before) * 1e6 / max(delivered, 1)
            runs[names[i]].append((result["msgs_per_s"], result["p50_ms"], result["p99_ms"], cpu_us))
            lost = "" if delivered == 100_000 else f"  ONLY {delivered:.0f} DELIVERED"
            print(f"round {round_} {names[i]:>16}: {result['msgs_per_s']:>7.0f} msg/s  p50 {result['p50_ms']:6.1f}  "
                  f"p99 {result['p99_ms']:6.1f} ms  server CPU {cpu_us:5.1f} us/msg{lost}", flush=True)
    base = statistics.median(run[0] for run in runs[names[0]])
    print(f"\nmedians of {rounds} (ratio: throughput against {names[0]})")
    for name in names:
        throughput, p50, p99, cpu = (statistics.median(run[k] for run in runs[name]) for k in range(4))
        alive = "" if procs[names.index(name)].poll() is None else "  DIED"
        print(f"{name:>16}: {throughput:>7.0f} msg/s  ratio {throughput / base:4.2f}  p50 {p50:5.1f}  p99 {p99:5.1f} ms"
              f"  server CPU {cpu:5.1f} us/msg{alive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
