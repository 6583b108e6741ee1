#!/usr/bin/env python3
"""Start-up of the short commands, with hyperfine, in one run: `send`, `history`, `listen`, `--help`, and wscat.

Starts one `chatcli serve` (SQLite, in a scratch folder) and a `chatcli listen bob` on it, so every send is
delivered, stores a short conversation for `history`, then hands hyperfine, for each tree (a folder holding
a `chatcli` package, e.g. `git archive BASE chatcli | tar -x -C /tmp/base`; `.` is this checkout), run as
`python -m chatcli` from `/` so that only PYTHONPATH chooses the tree:

* `send alice bob hi` (the plain form: no option parser), and with `--timeout 5` (through Typer);
* `history alice bob`; `listen bob --since all --count 1` (prints the oldest stored message, exits);
* `listen --help`;

then each `--command` as given (e.g. an installed `chatcli`, by its absolute path: hyperfine runs from
`/`), `wscat -c …/alice -x '<seed send frame>'` (`--wscat PATH`) and `python -c pass`. Bytecode is
compiled first; run it with PYTHONDONTWRITEBYTECODE unset. Prints a table from hyperfine's results:
wall time (mean ± σ, median, min) and CPU (user + sys, mean), the steadier figure on a shared machine.

    python benchmarks/startup.py --wscat /tmp/wscat/node_modules/.bin/wscat /tmp/base .
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from native_path import wait_port  # benchmarks/ is the script's directory

SEED_FRAME = "{'auth':'addauthkeyifrequired','cmd':'send','userid':'bob', 'msgtext':'hi'}"


def commands(tree: str, url: str) -> list[tuple[str, str]]:
    run = f"env PYTHONPATH={Path(tree).resolve()} {sys.executable} -m chatcli"
    return [(f"{tree}: {args}", f"{run} {args}") for args in (
        f"send alice bob hi --url {url}", f"send alice bob hi --timeout 5 --url {url}",
        f"history alice bob --url {url}", f"listen bob --since all --count 1 --url {url}", "listen --help")]


def print_table(results: list[dict[str, Any]]) -> None:
    print("| command | wall ms, mean ± σ | median | min | CPU ms (user + sys) |")
    print("|:---|---:|---:|---:|---:|")
    for result in results:
        print(f"| `{result['command']}` | {result['mean'] * 1e3:.1f} ± {result['stddev'] * 1e3:.1f} | "
              f"{result['median'] * 1e3:.1f} | {result['min'] * 1e3:.1f} | "
              f"{(result['user'] + result['system']) * 1e3:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="folders holding a chatcli package ('.' for this checkout)")
    parser.add_argument("--wscat", help="the wscat executable (npm install --prefix /tmp/wscat wscat)")
    parser.add_argument("--command", action="append", default=[], help="another command line to time ({url})")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--port", type=int, default=17500)
    args = parser.parse_args()
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        raise SystemExit("unset PYTHONDONTWRITEBYTECODE: users' installs have compiled bytecode")
    url = f"ws://127.0.0.1:{args.port}"
    here = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for tree in args.trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(tree).resolve() / "chatcli")], check=True)
    with tempfile.TemporaryDirectory(prefix="chatcli-startup-") as scratch:
        chatcli = [sys.executable, "-m", "chatcli"]
        server = subprocess.Popen([*chatcli, "serve", "--db", f"{scratch}/chatcli.db", "--ws-port", str(args.port),
                                   "--http-port", "0"], env=here, cwd=scratch, stderr=subprocess.DEVNULL)
        listener: subprocess.Popen[bytes] | None = None
        try:
            wait_port(args.port)
            for text in ("first", "second", "third"):
                subprocess.run([*chatcli, "send", "alice", "bob", text, "--url", url], env=here, check=True)
            listener = subprocess.Popen([*chatcli, "listen", "bob", "--url", url], env=here,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            timed = [pair for tree in args.trees for pair in commands(tree, url)]
            timed += [(line.replace("{url}", url), line.replace("{url}", url)) for line in args.command]
            if args.wscat:
                timed.append(("wscat -x", f"{args.wscat} -c {url}/alice -x \"{SEED_FRAME}\""))
            timed.append(("python -c pass", f"{sys.executable} -c pass"))
            hyperfine = ["hyperfine", "-N", "--warmup", "3", "--runs", str(args.runs), "--style", "basic",
                         "--export-json", f"{scratch}/results.json"]
            for name, line in timed:
                hyperfine += ["-n", name, line]
            subprocess.run(hyperfine, cwd="/", check=True, stdout=subprocess.DEVNULL)
            print_table(json.loads(Path(f"{scratch}/results.json").read_text())["results"])
        finally:
            for process in (listener, server):
                if process is not None:
                    process.terminate()
                    process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
