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
    python benchmarks/relay_ab.py --baseline /tmp/base --rounds 8 --config sqlite= --opening

Each ``--config NAME=ARGS`` is measured for both trees (default: ``sqlite=`` and ``ephemeral=--ephemeral``).

``--opening`` runs a copy of the load generator that also reports where the latency tail comes from
(docs/performance.md, "Where the p99 comes from"): how long its opening loop took (it sends every
pair's first window, 1,600 messages, before reading anything), how late the first delivery it read
was, and the share of the slowest 1 % that it sent during that loop.
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


#: Text replacements turning loadgen.js into a copy that also reports its opening (see --opening).
OPENING_PATCH = (
    ("lat.push(Number(process.hrtime.bigint() - BigInt(match[2])) / 1e6);",
     "{ const sent = BigInt(match[2]); const ms = Number(process.hrtime.bigint() - sent) / 1e6; lat.push(ms);"
     " sends.push([Number(sent - t0) / 1e6, ms]); }"),
    ("(done = r));\n  const t0 = process.hrtime.bigint();",
     "(done = r));\n  const t0 = process.hrtime.bigint(); const sends = [];"),
    ("  const timer = setTimeout(",
     "  const openingMs = Number(process.hrtime.bigint() - t0) / 1e6;\n  const timer = setTimeout("),
    ("  console.log(JSON.stringify({\n    url: URL,",
     "  { const p99 = lat.length ? lat[Math.min(lat.length - 1, Math.floor(0.99 * lat.length))] : 0;"
     " const slow = sends.filter(([, ms]) => ms >= p99); const early = sends.filter(([at]) => at <= openingMs);"
     " console.log(JSON.stringify({ opening_loop_ms: openingMs,"
     " first_delivery_ms: Math.min(...early.map(([at, ms]) => at + ms)),"
     " tail_sent_in_opening: slow.filter(([at]) => at <= openingMs).length / Math.max(slow.length, 1) })); }\n"
     "  console.log(JSON.stringify({\n    url: URL,"),
)


def opening_loadgen(scratch: str) -> Path:
    """A copy of loadgen.js patched by OPENING_PATCH; exits if loadgen.js no longer has the patched lines."""
    text = LOADGEN.read_text()
    for old, new in OPENING_PATCH:
        if text.count(old) != 1:
            raise SystemExit(f"--opening: {LOADGEN} changed; cannot find {old[:40]!r}")
        text = text.replace(old, new)
    copy = Path(scratch) / "loadgen-opening.js"
    copy.write_text(text)
    return copy


def load(port: int, prefix: str, loadgen: Path = LOADGEN) -> dict[str, float]:
    out = subprocess.run(["taskset", "-c", "1", "node", str(loadgen), "--url", f"ws://127.0.0.1:{port}",
                          "--pairs", "50", "--messages", "2000", "--window", "32", "--prefix", prefix],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NODE_PATH=str(NODE_DIR / "node_modules")))
    lines = out.stdout.strip().splitlines()
    result: dict[str, float] = json.loads(lines[-1])
    if loadgen != LOADGEN:
        result.update(json.loads(lines[-2]))
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
    parser.add_argument("--opening", action="store_true", help="also report the load generator's opening")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatcli-relay-ab-") as scratch:
        chosen = servers(args, scratch)
        procs = [start([a.replace("{port}", str(PORT_BASE + 10 * i)) for a in argv], PORT_BASE + 10 * i, scratch, tree)
                 for i, (_, argv, tree) in enumerate(chosen)]
        try:
            loadgen = opening_loadgen(scratch) if args.opening else LOADGEN
            return measure(args.rounds, [name for name, _, _ in chosen], procs, loadgen)
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()


def measure(rounds: int, names: list[str], procs: list[subprocess.Popen[bytes]], loadgen: Path) -> int:
    for i, name in enumerate(names):
        wait_port(PORT_BASE + 10 * i)
        time.sleep(0.5)
        if procs[i].poll() is not None:  # e.g. its port was taken: another process would be measured
            raise SystemExit(f"{name} did not start")
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
    for round_ in range(rounds):
        order = range(len(names)) if round_ % 2 == 0 else reversed(range(len(names)))
        for i in order:
            before = cpu_seconds(procs[i].pid)
            result = load(PORT_BASE + 10 * i, f"r{round_}", loadgen)
            delivered = result["delivered"]
            cpu_us = (cpu_seconds(procs[i].pid) - before) * 1e6 / max(delivered, 1)
            opening = tuple(result[key] for key in OPENING_KEYS if key in result)
            runs[names[i]].append((result["msgs_per_s"], result["p50_ms"], result["p99_ms"], cpu_us, *opening))
            lost = "" if delivered == 100_000 else f"  ONLY {delivered:.0f} DELIVERED"
            print(f"round {round_} {names[i]:>16}: {result['msgs_per_s']:>7.0f} msg/s  p50 {result['p50_ms']:6.1f}  "
                  f"p99 {result['p99_ms']:6.1f} ms  server CPU {cpu_us:5.1f} us/msg{describe(opening)}{lost}",
                  flush=True)
    base = statistics.median(run[0] for run in runs[names[0]])
    print(f"\nmedians of {rounds} (ratio: throughput against {names[0]})")
    for name in names:
        throughput, p50, p99, cpu, *opening = (statistics.median(run[k] for run in runs[name])
                                               for k in range(len(runs[name][0])))
        alive = "" if procs[names.index(name)].poll() is None else "  DIED"
        print(f"{name:>16}: {throughput:>7.0f} msg/s  ratio {throughput / base:4.2f}  p50 {p50:5.1f}  p99 {p99:5.1f} ms"
              f"  server CPU {cpu:5.1f} us/msg{describe(tuple(opening))}{alive}")
    return 0


OPENING_KEYS = ("opening_loop_ms", "first_delivery_ms", "tail_sent_in_opening")


def describe(opening: tuple[float, ...]) -> str:
    """The --opening figures of a run (or their medians), or nothing without --opening."""
    if not opening:
        return ""
    loop_ms, first_ms, tail_share = opening
    return (f"  | opening loop {loop_ms:5.1f} ms, first delivery read at {first_ms:5.1f} ms,"
            f" p99 tail sent in it {tail_share:4.0%}")


if __name__ == "__main__":
    sys.exit(main())
