#!/usr/bin/env python3
"""Where an idle connection's memory goes: the server's Python heap per idle seed connection, by allocation site.

Runs `chatcli serve` in this process (``--ephemeral``, or SQLite with ``--db``), opens CONNECTIONS idle
seed-protocol connections to it from a thread (after 200 to warm it up), and prints tracemalloc's difference
per connection: the total, then the largest allocation sites (the last frames of each traceback). The RSS
figure relaybench.py reports (``kb_per_idle_conn``) also holds what uvloop and the kernel keep outside the
Python heap; this one says which Python objects to look at.

    python benchmarks/idle_memory.py --connections 2000
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import socket
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from chatcli.server import main as server_main
from chatcli.server.config import ServerConfig


def open_idle(port: int, user: str) -> socket.socket:
    """A seed-protocol connection, once its ``connected`` greeting came."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /{user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    seen = b""
    while b"connected" not in seen:
        seen += sock.recv(4096)
    return sock


def measure(port: int, count: int, sites: int) -> None:
    time.sleep(1.5)  # the server starts on the main thread
    warm = [open_idle(port, f"warm{i}") for i in range(200)]
    gc.collect()
    tracemalloc.start(6)
    before = tracemalloc.take_snapshot()
    idle = [open_idle(port, f"idle{i}") for i in range(count)]
    time.sleep(1.0)
    gc.collect()
    stats = tracemalloc.take_snapshot().compare_to(before, "traceback")
    print(f"Python heap per idle connection: {sum(s.size_diff for s in stats) / count:,.0f} bytes "
          f"({count:,} connections, {len(warm) + len(idle):,} open)")
    for stat in stats[:sites]:
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback[-4:]))
        print(f"{stat.size_diff / count:8,.0f} B {stat.count_diff / count:5.1f} objects  {where}")
    sys.stdout.flush()
    os._exit(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--sites", type=int, default=15, help="allocation sites to print")
    parser.add_argument("--db", type=Path, help="SQLite file (default: --ephemeral)")
    parser.add_argument("--port", type=int, default=17720)
    args = parser.parse_args()
    config = ServerConfig(ws_port=args.port, http_port=args.port + 1, db_path=args.db, presence="all")
    threading.Thread(target=measure, args=(args.port, args.connections, args.sites), daemon=True).start()
    uvloop.run(server_main.serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
