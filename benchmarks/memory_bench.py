"""Peak server memory for requests that ask for a lot: history and replay of large messages (issue 8, item 2).

    .venv/bin/python benchmarks/memory_bench.py [--messages 1000] [--dir DIR]

Starts a real ``chatcli serve``, stores ``--messages`` messages of 65,536 raw "\\x01"
characters through the legacy path (text kept as sent; each is 393 KB as a native
frame, where it becomes \\u0001), then runs each case and prints the growth of the
server's peak RSS over its RSS before the case (VmHWM is reset per case through
/proc/PID/clear_refs):

  (a)  one ``history`` request for 1000 from a client that reads the answer
  (a2) the same client paging back through all of them (``before``), as ``chatcli history`` does
  (b)  three pipelined history requests from a client that never reads
  (c)  four ``Chatcli-After: 0`` sessions that never read

Goal: under 100 MB per case.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from settle import settled  # benchmarks/ is the script's directory
from websockets.sync.client import connect

from chatcli import protocol as p

# The Flutter app's send frame comes from the tests' emulation of the app: the checkout's root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.flutter_app import encode_legacy_send

TEXT = "\x01" * 65_536


def start_server(db: Path) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, "-m", "chatcli", "serve", "--db", str(db), "--ws-port", "0",
                             "--http-port", "0", "--log-format", "json"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line)
        if event.get("event") == "listening":
            return proc, event["ws_port"], event["http_port"]
    raise SystemExit("the server did not start")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def bytes_sent(http_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("chatcli_bytes_sent_total "):
                return float(line.split()[1])
    return 0.0


def wait_sending_stops(http_port: int, quiet_s: float = 1.0) -> None:
    """Until the server's byte counter has not moved for ``quiet_s``."""
    settled(lambda: bytes_sent(http_port), quiet_s, poll_s=0.1)


def store_messages(ws_port: int, count: int) -> None:
    with connect(f"ws://127.0.0.1:{ws_port}/alice", max_size=None) as ws:
        assert ws.recv() == p.LEGACY_CONNECTED
        for _ in range(count):
            ws.send(encode_legacy_send("bob", TEXT))
            assert ws.recv() == p.LEGACY_SEND_SUCCESS


def native_headers(extra: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}", **extra}


def history_once(ws_port: int) -> list[socket.socket]:
    with connect(f"ws://127.0.0.1:{ws_port}/bob", subprotocols=[p.SUBPROTOCOL],  # type: ignore[list-item]
                 additional_headers=native_headers({p.RECEIVE_HEADER: "none"}), max_size=None) as ws:
        ws.recv()  # hello
        ws.send(p.encode(p.HistoryRequest("h", "alice", limit=1000)))
        answer = p.parse_server_frame(ws.recv())
        assert isinstance(answer, p.History)
        print(f"     one answer: {len(answer.messages)} message(s), more={answer.more}")
    return []


def history_paging(ws_port: int) -> list[socket.socket]:
    got = 0
    before: int | None = None
    with connect(f"ws://127.0.0.1:{ws_port}/bob", subprotocols=[p.SUBPROTOCOL],  # type: ignore[list-item]
                 additional_headers=native_headers({p.RECEIVE_HEADER: "none"}), max_size=None) as ws:
        ws.recv()
        while got < 1000:
            ws.send(p.encode(p.HistoryRequest(f"h{got}", "alice", limit=1000 - got, before=before)))
            answer = p.parse_server_frame(ws.recv())
            assert isinstance(answer, p.History)
            got += len(answer.messages)
            if not answer.more or not answer.messages:
                break
            before = answer.messages[0].id
    print(f"     paged through {got} message(s)")
    return []


def masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def non_reading(ws_port: int, headers: dict[str, str]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", ws_port))
    key = base64.b64encode(os.urandom(16)).decode()
    lines = "".join(f"{k}: {v}\r\n" for k, v in native_headers(headers).items())
    sock.sendall((f"GET /bob HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Protocol: {p.SUBPROTOCOL}\r\n{lines}\r\n").encode())
    assert sock.recv(12).startswith(b"HTTP/1.1 101")
    return sock


def case(name: str, pid: int, http_port: int, run: Callable[[], list[socket.socket]]) -> None:
    before = status_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    started = time.perf_counter()
    sockets = run()
    wait_sending_stops(http_port)
    peak = status_kb(pid, "VmHWM")
    print(f"{name:<58} peak RSS +{(peak - before) / 1024:6.1f} MB  (before {before / 1024:.1f} MB, "
          f"{time.perf_counter() - started:.1f} s)", flush=True)
    for sock in sockets:
        sock.close()
    time.sleep(0.5)  # let the server drop them before the next case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        proc, ws_port, http_port = start_server(Path(workdir) / "memory.db")
        try:
            print(f"storing {args.messages} messages of 65,536 x '\\x01' (legacy path)...", flush=True)
            store_messages(ws_port, args.messages)
            print(f"server RSS after storing: {status_kb(proc.pid, 'VmRSS') / 1024:.1f} MB")
            case("(a) one history request for 1000, reading", proc.pid, http_port,
                 lambda: history_once(ws_port))
            case("(a2) paging back through all of them, reading", proc.pid, http_port,
                 lambda: history_paging(ws_port))

            def pipelined() -> list[socket.socket]:
                sock = non_reading(ws_port, {p.RECEIVE_HEADER: "none"})
                sock.sendall(b"".join(masked(p.encode(p.HistoryRequest(f"h{i}", "alice", limit=1000)).encode())
                                      for i in range(3)))
                return [sock]

            case("(b) three pipelined history requests, never reading", proc.pid, http_port, pipelined)
            case("(c) four Chatcli-After: 0 sessions, never reading", proc.pid, http_port,
                 lambda: [non_reading(ws_port, {p.RESUME_AFTER_HEADER: "0"}) for _ in range(4)])
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
