"""A WebSocket client connection (RFC 6455) on a plain blocking socket, for one-shot commands.

``chatcli send alice bob hi`` exchanges four frames and exits (``chatcli history`` a few more).
Importing websockets costs it ~65 ms (~35 of them ``websockets.version`` importing
``importlib.metadata``) and asyncio ~35 ms more, against ~90 ms for all of ``wscat -x``
(docs/performance.md). This module is the client side of the protocol in the standard library
only: the opening handshake (with its ``Sec-WebSocket-Accept`` check), masked text frames out,
text, ping and close frames in, and the closing handshake. No extensions are offered, so frames
carry no compression. Long-lived sessions (``listen``, ``chat``, ``send --lines``) use
websockets' asyncio client (``session``).

Failures leave as the standard ``OSError`` family (``TimeoutError``, ``ssl.SSLError``,
``ConnectionResetError``) or as this module's ``HandshakeRefused``, ``InvalidResponse`` and
``Closed``; ``oneshot`` words them for the user.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import ssl

__all__ = ["Closed", "HandshakeRefused", "InvalidResponse", "WebSocket"]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CLOSE, _PING, _PONG, _CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
#: A response head or a message bigger than this is not a chatcli server's: the connection is dropped.
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
_READ_BYTES: Final = 64 * 1024
#: How long closing waits for the server's close frame: leaving must stay quick, even from a hung server.
CLOSE_TIMEOUT: Final = 1.0


class HandshakeRefused(Exception):
    """The server answered the opening handshake with another status than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.body = status, body


class InvalidResponse(Exception):
    """What came back is not a WebSocket server's answer, or breaks RFC 6455."""


class Closed(Exception):
    """The connection ended: with the server's close frame (``code``, ``reason``), or without (None)."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"closed ({code})")
        self.code, self.reason = code, reason


class WebSocket:
    """An open client connection. Every call takes a ``deadline`` (``time.monotonic()``) and raises
    ``TimeoutError`` past it."""

    def __init__(self, sock: socket.socket, subprotocol: str | None, pending: bytes) -> None:
        self._sock = sock
        self.subprotocol = subprotocol
        self._buffer = bytearray(pending)
        self._closing = False

    @classmethod
    def connect(cls, url: str, headers: dict[str, str], deadline: float,
                tls: ssl.SSLContext | None = None) -> WebSocket:
        """TCP (and TLS) to ``url``'s host, then the opening handshake sending ``headers``."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        sock = socket.create_connection((host, parts.port or (443 if tls else 80)), _left(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            key = base64.b64encode(os.urandom(16))
            request = _request_head(parts.netloc.rpartition("@")[2], parts.path or "/", key, headers)
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            status, response, rest = _read_head(sock, deadline)
            if status != 101:
                raise HandshakeRefused(status, _body(sock, response, rest, deadline))
            _check_upgrade(response, key)
            return cls(sock, response.get("sec-websocket-protocol"), rest)
        except BaseException:
            sock.close()
            raise

    def send_text(self, text: str, deadline: float) -> None:
        self._send_frame(_TEXT, text.encode(), deadline)

    def receive_text(self, deadline: float) -> str:
        """The next text message; pings are answered on the way. ``Closed`` when the server closes."""
        parts: list[bytes] = []
        size = 0
        while True:
            final, opcode, payload = self._read_frame(deadline)
            if opcode in (_PING, _PONG, _CLOSE):
                self._control(opcode, payload, deadline)
                continue
            if (opcode == _CONTINUATION) != bool(parts) or opcode == _BINARY:
                raise InvalidResponse("unexpected binary or continuation frame")
            size += len(payload)
            if size > MAX_MESSAGE_BYTES:
                raise InvalidResponse(f"a message over {MAX_MESSAGE_BYTES} bytes")
            parts.append(payload)
            if final:
                return b"".join(parts).decode()

    def close(self, code: int = 1000) -> None:
        """The closing handshake (best effort, at most ``CLOSE_TIMEOUT``), then the socket."""
        deadline = time.monotonic() + CLOSE_TIMEOUT
        try:
            if not self._closing:
                self._closing = True
                self._send_frame(_CLOSE, code.to_bytes(2, "big"), deadline)
            while True:
                self._read_frame(deadline)
        except (OSError, Closed, InvalidResponse, UnicodeError):
            pass
        finally:
            self._sock.close()

    def abort(self) -> None:
        """Drop the connection without a closing handshake (it was lost or broken)."""
        self._sock.close()

    def _control(self, opcode: int, payload: bytes, deadline: float) -> None:
        if opcode == _PING:
            self._send_frame(_PONG, payload, deadline)
        elif opcode == _CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if not self._closing:  # echo it: the server then closes the TCP connection first
                self._closing = True
                self._send_frame(_CLOSE, payload[:2], deadline)
            raise Closed(code, payload[2:].decode("utf-8", "replace"))

    def _send_frame(self, opcode: int, payload: bytes, deadline: float) -> None:
        """One final frame, masked as every client frame must be."""
        length = len(payload)
        if length < 126:
            head = bytes((0x80 | opcode, 0x80 | length))
        elif length < 1 << 16:
            head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
        mask = os.urandom(4)
        self._sock.settimeout(_left(deadline))
        self._sock.sendall(head + mask + _masked(payload, mask))

    def _read_frame(self, deadline: float) -> tuple[bool, int, bytes]:
        first, second = self._read_exact(2, deadline)
        if second & 0x80 or first & 0x70:
            raise InvalidResponse("a masked frame, or reserved bits set, from the server")
        length = second & 0x7F
        if length >= 126:
            length = int.from_bytes(self._read_exact(2 if length == 126 else 8, deadline), "big")
        if length > MAX_MESSAGE_BYTES:
            raise InvalidResponse(f"a frame of {length} bytes")
        return bool(first & 0x80), first & 0x0F, self._read_exact(length, deadline)

    def _read_exact(self, size: int, deadline: float) -> bytes:
        buffer = self._buffer
        while len(buffer) < size:
            self._sock.settimeout(_left(deadline))
            data = self._sock.recv(_READ_BYTES)
            if not data:
                raise Closed()
            buffer += data
        chunk = bytes(buffer[:size])
        del buffer[:size]
        return chunk


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _masked(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask``, as one big-integer operation."""
    length = len(payload)
    if not length:
        return payload
    repeated = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")


def _request_head(netloc: str, path: str, key: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {netloc}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_head(sock: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes]:
    """The response's status, its headers (lower-case names) and the bytes that came after them."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD_BYTES:
            raise InvalidResponse("a response head over 64 KiB")
        sock.settimeout(_left(deadline))
        chunk = sock.recv(_READ_BYTES)
        if not chunk:
            raise InvalidResponse("did not receive a valid HTTP response")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("iso-8859-1").split("\r\n")
    version, _, status = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not status[:3].isdigit():
        raise InvalidResponse("did not receive a valid HTTP response")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status[:3]), headers, rest


def _body(sock: socket.socket, headers: dict[str, str], rest: bytes, deadline: float) -> bytes:
    """A refusal's body (``Content-Length`` bytes, at most 64 KiB), for its explanation; best effort."""
    length = headers.get("content-length", "0")
    wanted = min(int(length), MAX_HEAD_BYTES) if length.isdigit() else 0
    try:
        while len(rest) < wanted:
            sock.settimeout(_left(deadline))
            chunk = sock.recv(_READ_BYTES)
            if not chunk:
                break
            rest += chunk
    except OSError:
        pass
    return rest[:wanted]


def _check_upgrade(headers: dict[str, str], key: bytes) -> None:
    try:  # CPython's own SHA-1 imports in ~0.3 ms; hashlib sets up OpenSSL first, ~3 ms
        from _sha1 import sha1  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - an interpreter built without it
        from hashlib import sha1

    expected = base64.b64encode(sha1(key + _GUID).digest()).decode()
    if headers.get("upgrade", "").lower() != "websocket" or headers.get("sec-websocket-accept") != expected:
        raise InvalidResponse("the server's answer is not a WebSocket upgrade")
