"""The HTTP side port: ``GET /`` (is it running), ``GET /healthz`` (JSON status).

A few read-only GET endpoints need no framework: this parses one request line
and its headers, answers, and closes the connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

MAX_REQUEST_BYTES = 8192

Handler = Callable[[], tuple[int, str, bytes]]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def text_response(body: str, status: int = 200) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", body.encode()


def json_response(value: object, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", (json.dumps(value) + "\n").encode()


class HttpConnection(asyncio.Protocol):
    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer or b"\n\n" in self.buffer:
            self._answer(*self._route(self.buffer))
        elif len(self.buffer) > MAX_REQUEST_BYTES:
            self._answer(*text_response("request too large\n", 431), head=False)

    def _route(self, request: bytes) -> tuple[int, str, bytes, bool]:
        line = request.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return (*text_response("bad request\n", 400), False)
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return (*text_response("only GET is supported\n", 405), False)
        handler = self.routes.get(target)
        if handler is None:
            return (*text_response(f"no such path: {target[:100]}\n", 404), method == "HEAD")
        return (*handler(), method == "HEAD")

    def _answer(self, status: int, content_type: str, body: bytes, head: bool) -> None:
        assert self.transport is not None
        header = (f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n")
        self.transport.write(header.encode() + (b"" if head else body))
        self.transport.close()
        self.buffer = b""
