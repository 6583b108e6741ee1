#!/usr/bin/env python3
"""The server's native path: CPU per message under `chatcli bench --protocol native`, two trees alternated.

Starts `chatcli serve --rate 1000000 --burst 1000000 ARGS` pinned to CPU 0 from a baseline tree (a folder
holding a `chatcli` package, e.g. `git archive BASE chatcli | tar -x -C /tmp/base`) and from this checkout,
alternately, drives each with `chatcli bench --protocol native` pinned to CPU 1, and prints per run and as
medians: delivered msg/s, p99, and the server's CPU (user + sys, all threads) per delivered message.

    python benchmarks/native_path.py --baseline /tmp/base --runs 5 -- --ephemeral
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from serverprocs import cpu_seconds, wait_port  # benchmarks/ is the script's directory


def one_run(tree: str | None, port: int, serve_args: list[str]) -> tuple[float, float, float]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree
    with tempfile.TemporaryDirectory(prefix="chatcli-native-") as scratch:
        args = [arg.replace("{tmp}", scratch) for arg in serve_args]
        server = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "chatcli", "serve", "--ws-port", str(port),
             "--http-port", str(port + 1), "--rate", "1000000", "--burst", "1000000", *args],
            # Not from the checkout: `-m` puts the working folder first on sys.path, ahead of PYTHONPATH.
            env=env, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            before = cpu_seconds(server.pid)
            bench = subprocess.run(["taskset", "-c", "1", sys.executable, "-m", "chatcli", "bench", "--url",
                                    f"ws://127.0.0.1:{port}", "--protocol", "native", "--json"],
                                   capture_output=True, text=True, check=True)
            used = cpu_seconds(server.pid) - before
        finally:
            server.terminate()
            server.wait()
    result = json.loads(bench.stdout.strip().splitlines()[-1])
    return result["msgs_per_s"], result["latency_ms"]["p99"], used / result["delivered"] * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a folder holding the baseline's chatcli package")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=17300)
    parser.add_argument("serve_args", nargs="*", help="options for chatcli serve ({tmp}: a scratch folder)")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {"baseline": [], "this tree": []}
    for run in range(args.runs):
        for name, tree in (("baseline", args.baseline), ("this tree", None)):
            port = args.port + 10 * run + (5 if tree is None else 0)
            results[name].append(one_run(tree, port, args.serve_args))
            rate, p99, cpu = results[name][-1]
            print(f"run {run + 1} {name:>9}: {rate:8.0f} msg/s  p99 {p99:7.1f} ms  server {cpu:5.1f} µs/msg",
                  flush=True)
    for name, rows in results.items():
        print(f"median {name:>9}: {statistics.median(r[0] for r in rows):8.0f} msg/s  "
              f"p99 {statistics.median(r[1] for r in rows):7.1f} ms  "
              f"server {statistics.median(r[2] for r in rows):5.1f} µs/msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
