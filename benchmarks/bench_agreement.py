"""Does `chatcli bench` agree with the shared Node load generator? Side by side on one server.

    python benchmarks/bench_agreement.py --runs 5 \
        'chatcli-ephemeral=chatcli serve --ephemeral --ws-port {port} --http-port {http}'
    python benchmarks/bench_agreement.py --runs 5 'seed-node=node ../shared/peers/seed-node/server.js'

For each server (pinned to CPU 0, started once): alternately runs ``loadgen.js`` and ``chatcli bench``
(both pinned to CPU 1 unless --procs > 1, same pairs, messages and window), ``--runs`` times each, and prints
the median throughput of each, their ratio, and the client CPU each spent per delivered message (user + sys
of the load generator's processes). The Node packages are found as ../shared/bench/relaybench.py installs
them ($BENCH_NODE_DIR, default chatcli-bench-node in the temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serverprocs import wait_port  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT.parent / "shared" / "bench" / "loadgen.js"
NODE_DIR = Path(os.environ.get("BENCH_NODE_DIR", Path(tempfile.gettempdir()) / "chatcli-bench-node"))


def timed(argv: list[str]) -> tuple[dict[str, Any], float]:
    """Run a load generator; its last stdout line as JSON, and the CPU seconds it and its children used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = out.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {"error": out.stderr[-500:]}), cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("servers", nargs="+", help="NAME=COMMAND; {port} and {http} expand (WS_PORT/HTTP_PORT set too)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--procs", type=int, default=1, help="chatcli bench --procs (unpinned when more than 1)")
    ap.add_argument("--protocol", default="legacy", help="chatcli bench --protocol (loadgen.js speaks legacy)")
    ap.add_argument("--port", type=int, default=17400)
    args = ap.parse_args()
    os.environ["NODE_PATH"] = str(NODE_DIR / "node_modules")
    chatcli = str(Path(sys.executable).parent / "chatcli")
    for index, spec in enumerate(args.servers):
        name, cmd = spec.split("=", 1)
        port = args.port + 10 * index
        env = dict(os.environ, WS_PORT=str(port), HTTP_PORT=str(port + 1), QUIET="1")
        srv = subprocess.Popen(["taskset", "-c", "0", *shlex.split(cmd.format(port=port, http=port + 1))], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_port(port)
            time.sleep(0.5)
            common = ["--pairs", str(args.pairs), "--messages", str(args.messages), "--window", str(args.window)]
            pin = ["taskset", "-c", "1"] if args.procs == 1 else []
            node_rate, bench_rate, node_cpu, bench_cpu, bench_p99, node_p99 = [], [], [], [], [], []
            for run in range(args.runs):
                node, cpu = timed([*pin, "node", str(LOADGEN), "--url", f"ws://127.0.0.1:{port}", *common,
                                   "--prefix", f"lg{run}"])
                node_rate.append(node.get("msgs_per_s", 0))
                node_p99.append(node.get("p99_ms") or 0)
                node_cpu.append(cpu / max(node.get("delivered", 1), 1) * 1e6)
                mine, cpu = timed([*pin, chatcli, "bench", "--url", f"ws://127.0.0.1:{port}", "--json", *common,
                                   "--protocol", args.protocol, "--procs", str(args.procs)])
                bench_rate.append(mine.get("msgs_per_s", 0))
                bench_p99.append((mine.get("latency_ms") or {}).get("p99") or 0)
                bench_cpu.append(cpu / max(mine.get("delivered", 1), 1) * 1e6)
                if not mine.get("ok"):
                    print(f"  chatcli bench run {run} not ok: {mine}", file=sys.stderr)
            summary = {
                "server": name, "runs": args.runs, "protocol": args.protocol, "procs": args.procs,
                "loadgen_msgs_per_s": statistics.median(node_rate), "bench_msgs_per_s": statistics.median(bench_rate),
                "ratio_bench_over_loadgen": round(
                    statistics.median(bench_rate) / max(statistics.median(node_rate), 1), 2),
                "loadgen_p99_ms": statistics.median(node_p99), "bench_p99_ms": statistics.median(bench_p99),
                "loadgen_cpu_us_per_msg": round(statistics.median(node_cpu), 1),
                "bench_cpu_us_per_msg": round(statistics.median(bench_cpu), 1),
                "all_loadgen": node_rate, "all_bench": bench_rate,
            }
            print(json.dumps(summary), flush=True)
        finally:
            os.killpg(srv.pid, signal.SIGTERM)
            srv.wait(timeout=10)


if __name__ == "__main__":
    main()
