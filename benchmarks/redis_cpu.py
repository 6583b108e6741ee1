#!/usr/bin/env python3
"""Two nodes on Redis against the Node server, interleaved: throughput and CPU per message, per process.

``relay.py --redis`` gives one throughput per server, measured one after the other, and counts the CPU of
one process only. This starts the Node server and one or two clusters (a redis-server of its own with
``appendonly yes``, ``appendfsync always``, and two ``chatcli serve --redis URL --redis-durability strict``
nodes; every process pinned to CPU 0) and runs the relay benchmark's load (``../shared/bench/loadgen.js``
on CPU 1: 50 pairs, window 32, senders on node 1, receivers on node 2, so every message crosses nodes)
against each in turn, round after round, reversing the order every round. It prints per run and as
medians: delivered msg/s, the throughput ratio to the Node server within the round, and CPU (user + sys,
all threads) per delivered message of each process: Redis, node 1 (senders), node 2 (receivers).

    python benchmarks/redis_cpu.py --rounds 3
    git archive BASE chatcli | tar -x -C /tmp/base
    python benchmarks/redis_cpu.py --baseline /tmp/base --rounds 4

With ``--baseline``, a second cluster runs that tree's chatcli package: before and after, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from serverprocs import cpu_seconds, wait_port  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT.parent / "shared" / "bench" / "loadgen.js"
SEED = ROOT.parent / "shared" / "peers" / "seed-node" / "server.js"
NODE_DIR = Path(os.environ.get("BENCH_NODE_DIR", Path(tempfile.gettempdir()) / "chatcli-bench-node"))
PORT_BASE = 18900


@dataclass
class Target:
    """One server under test: its processes (named) and the ports senders and receivers use."""

    name: str
    port: int
    recv_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    runs: list[dict[str, float]] = field(default_factory=list)


def start(argv: list[str], scratch: str, tree: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, QUIET="1", NODE_PATH=str(NODE_DIR / "node_modules"))
    if tree is not None:
        env["PYTHONPATH"] = tree
    # Not from the checkout: `-m` puts the working folder first on sys.path, ahead of PYTHONPATH.
    return subprocess.Popen(["taskset", "-c", "0", *argv], env=env, cwd=scratch, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def seed_node(port: int, scratch: str) -> Target:
    target = Target("seed-node", port, port)
    proc = subprocess.Popen(["taskset", "-c", "0", "node", str(SEED)], cwd=scratch, start_new_session=True,
                            env=dict(os.environ, WS_PORT=str(port), HTTP_PORT=str(port + 1), QUIET="1",
                                     NODE_PATH=str(NODE_DIR / "node_modules")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target.procs["node"] = proc
    return target


def cluster(name: str, port: int, scratch: str, tree: str | None) -> Target:
    folder = Path(scratch) / name
    folder.mkdir()
    sock = folder / "redis.sock"
    target = Target(name, port, port + 2)
    target.procs["redis"] = start(["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(folder),
                                   "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                   "--logfile", str(folder / "redis.log")], scratch)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for label, ws in (("node1", port), ("node2", port + 2)):
        target.procs[label] = start([sys.executable, "-m", "chatcli", "serve", "--redis", f"unix://{sock}",
                                     "--redis-durability", "strict", "--ws-port", str(ws),
                                     "--http-port", str(ws + 1)], scratch, tree)
    return target


def load(target: Target, prefix: str, messages: int) -> dict[str, float]:
    recv = ["--recv-url", f"ws://127.0.0.1:{target.recv_port}"] if target.recv_port != target.port else []
    out = subprocess.run(["taskset", "-c", "1", "node", str(LOADGEN), "--url", f"ws://127.0.0.1:{target.port}",
                          *recv, "--pairs", "50", "--messages", str(messages), "--window", "32",
                          "--prefix", prefix],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NODE_PATH=str(NODE_DIR / "node_modules")))
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def one_run(target: Target, prefix: str, messages: int) -> dict[str, float]:
    before = {label: cpu_seconds(proc.pid) for label, proc in target.procs.items()}
    result = load(target, prefix, messages)
    delivered = max(result["delivered"], 1)
    run = {"msgs_per_s": result["msgs_per_s"], "delivered": result["delivered"]}
    for label, proc in target.procs.items():
        run[label] = (cpu_seconds(proc.pid) - before[label]) * 1e6 / delivered
    run["total"] = sum(run[label] for label in target.procs)
    return run


def describe(target: Target, run: dict[str, float], base: float) -> str:
    split = " + ".join(f"{label} {run[label]:4.1f}" for label in target.procs) if len(target.procs) > 1 else ""
    lost = "" if run["delivered"] == base else f"  ONLY {run['delivered']:.0f} DELIVERED"
    return (f"{target.name:>18}: {run['msgs_per_s']:>7.0f} msg/s  CPU {run['total']:5.1f} us/msg"
            + (f" ({split})" if split else "") + lost)


def measure(targets: list[Target], rounds: int, messages: int) -> None:
    expected = 50 * messages
    for round_ in range(rounds):
        order = targets if round_ % 2 == 0 else list(reversed(targets))
        for target in order:
            target.runs.append(one_run(target, f"r{round_}", messages))
            print(f"round {round_} " + describe(target, target.runs[-1], expected), flush=True)
        seed = targets[0].runs[-1]["msgs_per_s"]
        print(f"round {round_} ratios to seed-node: "
              + ", ".join(f"{t.name} {t.runs[-1]['msgs_per_s'] / seed:.2f}" for t in targets[1:]), flush=True)
    print(f"\nmedians of {rounds} (ratio: median of the per-round throughput ratios to seed-node; "
          "cpu ratio: seed-node's CPU per message / this one's)")
    seed_runs = targets[0].runs
    for target in targets:
        median = {key: statistics.median(run[key] for run in target.runs) for key in target.runs[0]}
        pairs = list(zip(target.runs, seed_runs, strict=True))
        ratio = statistics.median(run["msgs_per_s"] / seed["msgs_per_s"] for run, seed in pairs)
        cpu_ratio = statistics.median(seed["total"] / run["total"] for run, seed in pairs)
        alive = "" if all(proc.poll() is None for proc in target.procs.values()) else "  DIED"
        print(describe(target, median, median["delivered"]) + f"  ratio {ratio:4.2f}  cpu ratio {cpu_ratio:4.2f}"
              + alive)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a folder holding a baseline tree's chatcli package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000, help="messages per pair (50 pairs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatcli-redis-cpu-") as scratch:
        targets = [seed_node(PORT_BASE, scratch)]
        if args.baseline:
            targets.append(cluster("2nodes-baseline", PORT_BASE + 10, scratch, args.baseline))
        targets.append(cluster("2nodes-redis", PORT_BASE + 20, scratch, None))
        try:
            for target in targets:
                wait_port(target.port)
                wait_port(target.recv_port)
            time.sleep(0.5)
            measure(targets, args.rounds, args.messages)
        finally:
            for target in targets:
                for proc in reversed(target.procs.values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
