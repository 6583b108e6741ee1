"""What the HTTP side port costs the server: descriptors held under a flood of idle connections, and
scrape speed with keep-alive against a new connection per request.

    .venv/bin/python benchmarks/http_port.py [--idle 2000] [--fd-limit 1024] [--requests 1000] [--rounds 5]
                                             [--python PYTHON]

``--python`` picks the interpreter whose ``chatcli`` is measured (e.g. another checkout's
``.venv/bin/python``) so two versions can be compared in one run; options it does not know are
left out. Prints, for the server under test:

- the descriptors the server holds once ``--idle`` connections sit on the HTTP port sending nothing,
  and whether a WebSocket session still opens, with the server's RLIMIT_NOFILE (soft and hard) set to
  ``--fd-limit`` (1,024: a desktop's usual soft limit);
- GET /metrics requests per second on one keep-alive connection and with one connection per request
  (median of ``--rounds`` rounds of ``--requests``, the two modes interleaved: the machine is noisy).

Run it from the checkout being measured: ``python -m chatcli`` imports the package in the current directory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

from settle import settled  # benchmarks/ is the script's directory
from websockets.sync.client import connect


def start_server(python: str, extra: list[str], fd_limit: int) -> tuple[subprocess.Popen[str], int, int]:
    cmd = [python, "-m", "chatcli", "serve", "--ephemeral", "--ws-port", "0", "--http-port", "0",
           "--log-format", "json", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit)))
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"listening"' in line:
            event = json.loads(line)
            return proc, event["ws_port"], event["http_port"]
    raise RuntimeError("the server did not start")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, seconds: float = 1.0) -> int:
    """The server's descriptor count once it has stopped changing for ``seconds`` (it accepts in batches)."""
    return int(settled(lambda: open_fds(pid), seconds))


def flood(pid: int, http_port: int, ws_port: int, idle: int) -> tuple[int, int, bool]:
    before = settled_fds(pid)
    socks = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(idle)]
    held = settled_fds(pid)
    try:
        with connect(f"ws://127.0.0.1:{ws_port}/bench", open_timeout=5) as ws:
            ws_ok = ws.recv(timeout=5) is not None
    except Exception:  # any failure to open is the figure being measured
        ws_ok = False
    for sock in socks:
        sock.close()
    return before, held, ws_ok


def scrapes_per_second(http_port: int, requests: int, keep_alive: bool) -> float:
    client = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    start = time.perf_counter()
    for _ in range(requests):
        client.request("GET", "/metrics", headers={} if keep_alive else {"Connection": "close"})
        response = client.getresponse()
        response.read()
        if not keep_alive or response.getheader("Connection") == "close":
            client.close()
    return requests / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--fd-limit", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    help_text = subprocess.run([args.python, "-m", "chatcli", "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    extra = ["--http-timeout", "60"] if "--http-timeout" in help_text else []  # idle ones must stay for the count
    proc, ws_port, http_port = start_server(args.python, extra, args.fd_limit)
    try:
        before, held, ws_ok = flood(proc.pid, http_port, ws_port, args.idle)
        print(f"server: {args.python} -m chatcli serve {' '.join(extra)}")
        print(f"fd limit {args.fd_limit}: descriptors before: {before}; with {args.idle} idle HTTP connections: "
              f"{held} (+{held - before}); a WebSocket session opens meanwhile: {ws_ok}")
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for keep_alive in (True, False):
                rates[keep_alive].append(scrapes_per_second(http_port, args.requests, keep_alive))
        for keep_alive, label in ((True, "one keep-alive connection"), (False, "a connection per request")):
            print(f"GET /metrics, {label}: {statistics.median(rates[keep_alive]):,.0f} requests/s "
                  f"(median of {args.rounds})")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
