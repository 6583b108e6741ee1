"""The HTTP side port: ``GET /`` (is it running), ``GET /healthz`` (JSON status), ``GET /metrics``.

A few read-only GET endpoints need no framework. What they do need is limits, because this port shares
the process's file descriptors with the WebSocket listener: a connection must deliver its request head
within ``http_timeout`` seconds, an idle keep-alive connection is closed after ``http_idle_timeout``, and
beyond ``max_http_connections`` a new connection is answered 503 and closed at once.

Keep-alive follows HTTP/1.1 (Prometheus and curl reuse connections): a connection serves up to
``MAX_REQUESTS_PER_CONNECTION`` requests; ``Connection: close``, HTTP/1.0, a request with a body, and
every error answer close it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from chatcli.server.config import ServerConfig
from chatcli.server.limitlog import LimitLog

__all__ = ["MAX_REQUESTS_PER_CONNECTION", "MAX_REQUEST_BYTES", "BadRequest", "Handler", "HttpConnection", "HttpServer",
           "Request", "Response", "encode_response", "json_response", "parse_request_head", "text_response"]

log = logging.getLogger("chatcli.server")

#: The longest request head (request line and headers) read; longer ones get 431.
MAX_REQUEST_BYTES = 8192
#: Requests one keep-alive connection may make before the server closes it (bounds what one peer holds).
MAX_REQUESTS_PER_CONNECTION = 100

#: A route: the answer's status, content type and body.
Response = tuple[HTTPStatus, str, bytes]
Handler = Callable[[], Response]

#: The blank line that ends a request head (bare LF tolerated, as RFC 9112 allows).
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_HTTP_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


def text_response(body: str, status: HTTPStatus = HTTPStatus.OK) -> Response:
    return status, "text/plain; charset=utf-8", body.encode()


def json_response(value: object, status: HTTPStatus = HTTPStatus.OK) -> Response:
    return status, "application/json", (json.dumps(value) + "\n").encode()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    #: The connection may serve another request after this one.
    keep_alive: bool


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_request_head(head: bytes) -> Request:
    """The request line and the headers that decide keep-alive; raises BadRequest."""
    request_line, *header_lines = head.decode("latin-1").split("\n")
    parts = request_line.strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad request line")
    method, target, version = parts
    if version not in _HTTP_VERSIONS:
        raise BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.1 and HTTP/1.0 are supported")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad header line")
        headers[name.lower()] = value.strip().lower()
    # No request here has a body; one that announces one is answered, then the connection closed
    # rather than the body skipped, so its bytes are never taken for a next request.
    has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
    wants_close = "close" in (token.strip() for token in headers.get("connection", "").split(","))
    keep_alive = version == "HTTP/1.1" and not wants_close and not has_body
    return Request(method, target.split("?", 1)[0], keep_alive)


class HttpServer:
    """The HTTP port's shared state: routes, limits, and the connections it serves."""

    def __init__(self, config: ServerConfig, routes: dict[str, Handler], loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.routes = routes
        self.loop = loop
        self.connections: set[HttpConnection] = set()
        self.limit_log = LimitLog("http-limit")

    def protocol_factory(self) -> HttpConnection:
        return HttpConnection(self)

    def route(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return text_response("only GET is supported\n", HTTPStatus.METHOD_NOT_ALLOWED)
        handler = self.routes.get(request.path)
        if handler is None:
            return text_response(f"no such path: {request.path[:100]}\n", HTTPStatus.NOT_FOUND)
        try:
            return handler()
        except Exception:  # a failing status page must not take the connection's answer with it
            log.exception("GET %s failed", request.path, extra={"event": "http-error"})
            return text_response("internal error\n", HTTPStatus.INTERNAL_SERVER_ERROR)

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.close()


def encode_response(status: HTTPStatus, content_type: str, body: bytes, *, head_only: bool,
                    keep_alive: bool) -> bytes:
    extra = "" if keep_alive else "Connection: close\r\n"
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        extra += "Allow: GET, HEAD\r\n"
    header = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}\r\n")
    return header.encode() + (b"" if head_only else body)


class HttpConnection(asyncio.Protocol):
    """One HTTP connection: read a head, answer, and either wait for the next request or close."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.served = 0
        self.write_paused = False
        self.closing = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= server.config.max_http_connections:
            self._refuse_over_cap()
            return
        server.connections.add(self)
        self._arm(server.config.http_timeout, self._request_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.buffer and self.served:  # the first byte of a keep-alive connection's next request
            self._arm(self.server.config.http_timeout, self._request_timed_out)
        self.buffer += data  # a partial head keeps the deadline armed by its first byte: no trickling past it
        self._serve_buffered()

    def eof_received(self) -> bool | None:
        self.close()  # the peer sends no more requests; one half-sent is abandoned
        return None

    def pause_writing(self) -> None:
        # A peer that pipelines requests without reading the answers: stop reading its requests and
        # give it http_timeout to take what is queued, so it cannot make the server hold unbounded output.
        self.write_paused = True
        assert self.transport is not None
        self.transport.pause_reading()
        self._arm(self.server.config.http_timeout, self._abort)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.closing:  # keep the deadline close() set: the rest must still be read in time
            return
        assert self.transport is not None
        self.transport.resume_reading()
        self._await_next_request()
        self._serve_buffered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self._disarm()

    # -- requests ----------------------------------------------------------------------

    def _serve_buffered(self) -> None:
        while not self.write_paused and not self.closing:
            self.buffer = self.buffer.lstrip(b"\r\n")  # RFC 9112: ignore blank lines before a request
            end = _END_OF_HEAD.search(self.buffer)
            if end is None:
                if len(self.buffer) > MAX_REQUEST_BYTES:
                    self._fail(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
                return
            head, self.buffer = self.buffer[:end.start()], self.buffer[end.end():]
            if end.start() > MAX_REQUEST_BYTES:
                self._fail(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
                return
            self._answer(head)

    def _answer(self, head: bytes) -> None:
        try:
            request = parse_request_head(head)
        except BadRequest as exc:
            self._fail(exc.status, str(exc))
            return
        self.served += 1
        keep_alive = request.keep_alive and self.served < MAX_REQUESTS_PER_CONNECTION
        status, content_type, body = self.server.route(request)
        self._write(encode_response(status, content_type, body, head_only=request.method == "HEAD",
                                    keep_alive=keep_alive))
        if keep_alive:
            self._await_next_request()
        else:
            self.close()

    def _await_next_request(self) -> None:
        """Idle, the connection may wait http_idle_timeout; a request already begun must end within http_timeout."""
        if self.write_paused:  # the deadline for the peer to read its answers comes first
            return
        if self.buffer:
            self._arm(self.server.config.http_timeout, self._request_timed_out)
        else:
            self._arm(self.server.config.http_idle_timeout, self.close)

    def _fail(self, status: HTTPStatus, reason: str) -> None:
        status_, content_type, body = text_response(f"{reason}\n", status)
        self._write(encode_response(status_, content_type, body, head_only=False, keep_alive=False))
        self.close()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    # -- limits -----------------------------------------------------------------------

    def _refuse_over_cap(self) -> None:
        cap = self.server.config.max_http_connections
        self.server.limit_log.bit("http-connections", logging.WARNING,
                                  f"HTTP port at --max-http-connections {cap}: refusing new connections with 503")
        self._fail(HTTPStatus.SERVICE_UNAVAILABLE, f"server busy: {cap} HTTP connections; try again later")

    def _request_timed_out(self) -> None:
        timeout = self.server.config.http_timeout
        self.server.limit_log.bit("http-timeout", logging.INFO,
                                  f"closed an HTTP connection that sent no complete request within {timeout:g} s")
        self._fail(HTTPStatus.REQUEST_TIMEOUT, f"no complete request within {timeout:g} s")

    def _arm(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._disarm()
        self.timer = self.server.loop.call_later(seconds, on_expiry)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        """Close once what is queued is written (a peer that does not read it is aborted after http_timeout)."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.transport.close()
        self._arm(self.server.config.http_timeout, self._abort)

    def _abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
