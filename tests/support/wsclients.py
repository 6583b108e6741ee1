"""Test clients: a native chatcli.v1 client, a stand-in for the seed Flutter app, and a raw socket.

What the Flutter app writes and reads is in ``tests/support/flutter_app.py``; here are only its connections.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import time
import uuid
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from chatcli import protocol as p

__all__ = ["CHAT_EVENTS", "RawClient", "client_frame", "is_open", "legacy", "native", "recv_frame", "request_head",
           "send_native", "server_close"]


def native(url: str, user: str, key: str = p.DEFAULT_AUTH_KEY, headers: dict[str, str] | None = None,
           **kwargs: Any) -> tuple[ClientConnection, p.Hello]:
    """Open a native session and return it with the server's hello."""
    ws = connect(f"{url}/{user}", subprotocols=[p.SUBPROTOCOL],  # type: ignore[list-item]
                 additional_headers={"Authorization": f"Bearer {key}", **(headers or {})}, open_timeout=5,
                 legacy=True, **kwargs)
    hello = p.parse_server_frame(ws.recv(timeout=5))
    assert isinstance(hello, p.Hello)
    return ws, hello


def legacy(url: str, user: str) -> ClientConnection:
    """Open a session as the seed Flutter app does: no subprotocol, no headers; expect ``connected``."""
    ws = connect(f"{url}/{user}", open_timeout=5, legacy=True)
    assert ws.recv(timeout=5) == p.LEGACY_CONNECTED
    return ws


#: Frames a peer's chat sends on its own (issue 12): skipped by ``recv_frame`` unless asked for.
CHAT_EVENTS = (p.PeerTyping, p.Receipt, p.ReadPosition)


def recv_frame(ws: ClientConnection, timeout: float = 5, *, events: bool = False) -> p.ServerFrame:
    """The next frame; typing, receipts and read positions only with ``events`` (a chat sends them unasked)."""
    while True:
        frame = p.parse_server_frame(ws.recv(timeout=timeout))
        if events or not isinstance(frame, CHAT_EVENTS):
            return frame


def server_close(ws: ClientConnection, timeout: float = 5) -> tuple[int | None, str | None]:
    """Read (and drop) what ``ws`` receives until the server closes it: the close code and reason.
    Raises TimeoutError if it is still open after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        while True:
            ws.recv(timeout=max(0.0, deadline - time.monotonic()))
    return ws.close_code, ws.close_reason


def is_open(ws: ClientConnection, timeout: float = 5) -> bool:
    """Whether the server still answers ``ws``'s ping."""
    try:
        return ws.ping().wait(timeout)
    except ConnectionClosed:
        return False


def send_native(ws: ClientConnection, to: str, text: str, client_id: str | None = None) -> p.Ack:
    """Send and return the ack. Client ids are unique per sender for good (a repeat is a retry): default to a UUID."""
    ws.send(p.encode(p.Send(client_id or uuid.uuid4().hex, to, text)))
    ack = recv_frame(ws)
    assert isinstance(ack, p.Ack), ack
    return ack


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """The bytes of one masked client frame, as any WebSocket client sends it."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def request_head(path: str, headers: dict[str, str] | None = None) -> bytes:
    """A WebSocket upgrade request for ``path`` with extra ``headers``."""
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


class RawClient:
    """A WebSocket client on a bare socket, to send what well-behaved libraries refuse to."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None, pipelined: bytes = b"") -> None:
        """Open a connection and send the request, with ``pipelined`` bytes in the same write."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(request_head(path, headers) + pipelined)
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.response_head = head.decode("latin-1")

    def response_body(self) -> str:
        data = self.buffer
        while chunk := self.sock.recv(4096):
            data += chunk
        return data.decode()

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.sock.sendall(client_frame(opcode, payload, fin))

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def recv_frame(self) -> tuple[int, bytes]:
        first, second = self._read(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return first & 0x0F, self._read(n)

    def recv_close_code(self) -> int:
        """Read frames until the server's close frame; return its code."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005

    def close(self) -> None:
        self.sock.close()


def next_of(ws: Any, kind: type, timeout: float = 5) -> Any:
    """The next frame of ``kind``, skipping the others (presence, messages, events it is not about)."""
    while True:
        frame = recv_frame(ws, timeout, events=True)
        if isinstance(frame, kind):
            return frame
