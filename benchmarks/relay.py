#!/usr/bin/env python3
"""Relay throughput: the seed's Node server and `chatcli serve`, measured in one run.

Runs ../shared/bench/relaybench.py (each server pinned to CPU 0, the Node load
generator on CPU 1) and prints its JSON lines and table. Compare the ratios,
never absolute figures: machines here are noisy and shared.

    python benchmarks/relay.py                 # baseline + chatcli serve with its defaults
    python benchmarks/relay.py --runs 5 -- --idle 5000
    python benchmarks/relay.py --variant 'chatcli-ephemeral=--ephemeral'
    python benchmarks/relay.py --redis         # + two nodes on Redis, every message crossing them

Every extra ``--variant NAME=ARGS`` adds one more `chatcli serve ARGS` to the same run. ``--redis`` adds
"chatcli-2nodes-redis": a redis-server of its own (unix socket, appendonly yes, appendfsync always: every
message fsynced before its ack) and two nodes on it, all three on the same CPU as the single servers;
senders connect to the first node and receivers to the second.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT.parent / "shared" / "bench" / "relaybench.py"
SEED = ROOT.parent / "shared" / "peers" / "seed-node" / "server.js"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="an extra chatcli serve configuration to measure in the same run")
    parser.add_argument("--redis", action="store_true", help="add two chatcli nodes on a Redis of their own")
    parser.add_argument("rest", nargs="*", help="options passed on to relaybench.py (after --)")
    args = parser.parse_args()
    if not BENCH.exists():
        print(f"benchmark kit not found at {BENCH}", file=sys.stderr)
        return 2
    chatcli = shutil.which("chatcli") or f"{sys.executable} -m chatcli"
    with tempfile.TemporaryDirectory(prefix="chatcli-bench-") as scratch:
        serve = f"{chatcli} serve --ws-port {{port}} --http-port {{http}}"
        servers = [f"seed-node=node {SEED}", f"chatcli={serve} --db {shlex.quote(scratch)}/default.db"]
        for variant in args.variant:
            name, _, extra = variant.partition("=")
            servers.append(f"{name}={serve} {extra.replace('{tmp}', scratch)}")
        if args.redis:
            servers.append(f"chatcli-2nodes-redis={redis_cluster(chatcli, scratch)}")
        cmd = [sys.executable, str(BENCH), "--runs", str(args.runs), *args.rest, *servers]
        return subprocess.run(cmd, env=os.environ).returncode


def redis_cluster(chatcli: str, scratch: str) -> str:
    """One shell command starting Redis and two nodes on it (relaybench kills its process group)."""
    folder = Path(scratch) / "redis"
    folder.mkdir()
    sock = folder / "redis.sock"
    redis = (f"redis-server --port 0 --unixsocket {sock} --dir {folder} --save '' --appendonly yes "
             f"--appendfsync always --logfile {folder}/redis.log")
    node = f"{chatcli} serve --redis unix://{sock} --redis-durability strict"
    script = (f"{redis} & until redis-cli -s {sock} ping >/dev/null 2>&1; do sleep 0.05; done; "
              f"{node} --ws-port {{port}} --http-port {{http}} & "
              f"exec {node} --ws-port {{port2}} --http-port {{http2}}")
    return f"sh -c {shlex.quote(script)}"


if __name__ == "__main__":
    sys.exit(main())
