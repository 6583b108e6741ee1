"""WebSocket transport: websockets' sans-I/O ServerProtocol driven by an asyncio.Protocol.

Why not the websockets high-level API: measured here, a relay on it reaches
0.36x the old Node server, while sans-I/O protocol objects in an
``asyncio.Protocol`` under uvloop, with outgoing writes coalesced once per
event-loop tick, reach 1.18x (``../shared/bench/README.md``). So each
connection queues frames in its ServerProtocol and marks itself dirty; one
``call_soon`` callback per tick writes every dirty connection's bytes at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from websockets.datastructures import Headers
from websockets.exceptions import NegotiationError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike, Subprotocol

from chatcli import __version__
from chatcli import protocol as p
from chatcli.errors import InvalidUserId, LocalProtocolError

if TYPE_CHECKING:
    from chatcli.server.accounts import AccountStore
    from chatcli.server.config import ServerConfig
    from chatcli.server.metrics import Metrics
    from chatcli.server.relay import Relay

log = logging.getLogger("chatcli.server")
# websockets logs every open and close at INFO; we write our own single line per connection.
_ws_log = logging.getLogger("chatcli.server.websockets")
_ws_log.setLevel(logging.WARNING)
_ws_log.propagate = False

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_OPEN = State.OPEN
SERVER_NAME = f"chatcli/{__version__}"
#: ``when_drained`` callbacks run once the outgoing buffer is at or below this many bytes.
DRAIN_LOW_WATER = 64 * 1024


_SUBPROTOCOLS = (Subprotocol(p.SUBPROTOCOL),)  # shared by every connection: idle connections must stay small


def _bearer(headers: Headers) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, credential = value.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


def _check_resume_headers(headers: Headers) -> tuple[int, str] | None:
    after, since = headers.get(p.RESUME_AFTER_HEADER), headers.get(p.REPLAY_SINCE_HEADER)
    if after is not None and not (after.isascii() and after.isdigit() and int(after) <= p.MAX_INT):
        return 400, f"{p.RESUME_AFTER_HEADER} must be a message id (a non-negative integer)\n"
    if since is not None:
        try:
            p.parse_ts(since)
        except LocalProtocolError:
            return 400, f"{p.REPLAY_SINCE_HEADER} must be an ISO 8601 time with a zone, e.g. 2026-11-25T10:00:00Z\n"
    return None


class RelayServerProtocol(ServerProtocol):
    """websockets' ServerProtocol with a fast path for the frame a relay sends most: one whole text frame.

    The generic path builds a Frame object and serialises it through BytesIO:
    about a third of the relay's Python time in a profile. A server's frames
    are never masked, and no extension is negotiated (none is offered to
    clients), so the bytes are a two- to ten-byte header and the payload.
    Anything else (fragments, extensions, debug logging) takes the generic path.
    Relies on ``writes`` and ``expect_continuation_frame``; tests pin the behaviour.
    """

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        """``chatcli.v1`` when offered; no subprotocol (a seed client) when none is offered."""
        if p.SUBPROTOCOL in subprotocols:
            return _SUBPROTOCOLS[0]
        if subprotocols:
            raise NegotiationError(f"unsupported subprotocol; this server speaks {p.SUBPROTOCOL}")
        return None

    def send_text(self, data: BytesLike, fin: bool = True) -> None:
        if not fin or self.expect_continuation_frame or self.extensions or self.debug or self._state is not _OPEN:
            super().send_text(data, fin)
            return
        length = len(data)
        if length < 126:
            header = bytes((0x81, length))
        elif length < 65536:
            header = bytes((0x81, 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x81, 127)) + length.to_bytes(8, "big")
        self.writes.append(header + bytes(data))


class WebSocketServer:
    """State shared by all connections: config, routing, the write-coalescing queue."""

    def __init__(self, config: ServerConfig, relay: Relay, metrics: Metrics,
                 accounts: AccountStore | None = None) -> None:
        self.config = config
        self.relay = relay
        self.metrics = metrics
        self.accounts = accounts
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.dirty: list[Connection] = []
        self.flush_scheduled = False
        self.boot_id = secrets.token_hex(3)
        self.session_counter = 0
        self.closing = False
        self.all_closed = asyncio.Event()  # set once closing and the last connection is gone

    def protocol_factory(self) -> Connection:
        return Connection(self)

    def mark_dirty(self, connection: Connection) -> None:
        self.dirty.append(connection)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty connection's queued frames: one write per connection per tick."""
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for connection in dirty:
            connection.flush()

    def next_session_id(self) -> str:
        self.session_counter += 1
        return f"{self.boot_id}-{self.session_counter}"

    def accounts_on(self) -> bool:
        """Tokens are required with --require-auth, and as soon as any account exists (checked per handshake,
        so `chatcli user add` on a running server takes effect at once)."""
        if self.accounts is None:
            return False
        return self.config.require_auth or self.accounts.any_accounts()

    def heartbeat(self) -> None:
        """Ping sessions that have been silent for ping_interval; drop those whose pong is ping_timeout late."""
        now = self.loop.time()
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        for connection in list(self.connections):
            if not connection.session_id or connection.ws.state is not _OPEN:
                continue
            if connection.ping_sent_at:
                if now - connection.ping_sent_at > timeout:
                    connection.drop("dead-peer", f"no pong within {timeout:g} s")
            elif now - connection.last_seen > interval:
                connection.ping_sent_at = now
                connection.ws.send_ping(b"chatcli")
                connection.schedule_flush()

    def close_all(self, code: int = 1001, reason: str = "server shutting down") -> None:
        self.closing = True
        if not self.connections:
            self.all_closed.set()
        for connection in list(self.connections):
            connection.close(code, reason)


class Connection(asyncio.Protocol):
    """One TCP connection: handshake, then a chat session once open."""

    # Slots: thousands of idle connections must stay under a few KB each.
    __slots__ = ("authenticated", "confirmed_upto", "dirty", "drain_callbacks", "fragment_is_text", "fragments",
                 "last_seen", "legacy",
                 "open_timer", "peer", "ping_sent_at", "server", "session_id", "tokens", "tokens_at", "transport",
                 "user", "writing_paused", "written_upto", "ws")

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.ws = RelayServerProtocol(subprotocols=_SUBPROTOCOLS, max_size=server.config.max_frame_bytes,
                                      logger=_ws_log)
        self.transport: asyncio.Transport | None = None
        self.user = ""
        self.legacy = True
        self.session_id = ""
        self.peer = ""
        self.dirty = False
        self.fragments: list[BytesLike] | None = None
        self.fragment_is_text = True
        self.open_timer: asyncio.TimerHandle | None = None
        self.authenticated = False
        # Rate limit: a token bucket, refilled once per read rather than once per message.
        self.tokens = float(server.config.burst)
        self.tokens_at = self.last_seen = server.loop.time()
        self.ping_sent_at = 0.0
        # Seed clients never acknowledge: the last message id written to them, and the last one
        # whose bytes the kernel took (the buffer was empty after the write): that one counts as received.
        self.written_upto = self.confirmed_upto = 0
        self.drain_callbacks: list[Callable[[], None]] | None = None
        self.writing_paused = False

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # pause_writing/resume_writing mark the low-water mark that when_drained waits for.
        self.transport.set_write_buffer_limits(high=DRAIN_LOW_WATER, low=DRAIN_LOW_WATER)  # type: ignore[union-attr]
        if self.server.closing:
            transport.close()
            return
        self.server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.open_timer = self.server.loop.call_later(self.server.config.open_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        self.server.metrics.bytes_in += len(data)
        self.last_seen = self.server.loop.time()  # any traffic, a pong included, proves the peer alive
        self.ping_sent_at = 0.0
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if type(event) is Frame:
                self._on_frame(event)
            else:
                self._on_request(event)  # type: ignore[arg-type]
        if ws.state is not _OPEN and self.session_id:
            self.server.relay.close_session(self)  # closing: no longer a recipient (idempotent)
        self.schedule_flush()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self.schedule_flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        self.drain_callbacks = None
        server.connections.discard(self)
        if server.closing and not server.connections:
            server.all_closed.set()
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None
        if self.session_id:
            server.relay.close_session(self)
            code = self._close_code()
            log.info("disconnect user=%s protocol=%s peer=%s session=%s code=%s", self.user, self.protocol_name,
                     self.peer, self.session_id,
                     code, extra={"event": "disconnect", "user": self.user, "protocol": self.protocol_name,
                                  "peer": self.peer, "session": self.session_id, "code": code})

    def _close_code(self) -> int:
        """The close code of the closing handshake, whoever started it; 1006 when there was none."""
        close = self.ws.close_rcvd or self.ws.close_sent
        return close.code if close is not None else 1006

    # -- what routing calls ------------------------------------------------------

    def send_text(self, text: str) -> None:
        ws = self.ws
        if ws.state is _OPEN:
            ws.send_text(text.encode())
            if not self.dirty:
                self.dirty = True
                self.server.mark_dirty(self)

    def written(self, msg_id: int) -> None:
        self.written_upto = msg_id

    def allow_send(self) -> bool:
        if self.tokens < 1.0:
            config, now = self.server.config, self.last_seen
            self.tokens = min(float(config.burst), self.tokens + (now - self.tokens_at) * config.rate)
            self.tokens_at = now
            if self.tokens < 1.0:
                return False
        self.tokens -= 1.0
        return True

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, on the loop, when the outgoing buffer is at or below DRAIN_LOW_WATER;
        never if the session closed first."""
        if self.drain_callbacks is None:
            self.drain_callbacks = []
        self.drain_callbacks.append(callback)
        if not self.writing_paused:
            self.server.loop.call_soon(self._drained)  # after this tick's flush

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._drained()

    def _drained(self) -> None:
        callbacks = self.drain_callbacks
        if callbacks is None or self.writing_paused or not self.is_open:
            return
        self.drain_callbacks = None
        for callback in callbacks:
            callback()

    def drop(self, why: str, reason: str) -> None:
        """Close a session the server gave up on: a close frame with the reason, then the TCP connection."""
        self.server.metrics.closed[why] += 1
        self.server.relay.close_session(self)  # from now on its messages are stored, not lost in a buffer
        log.info("closing session of %s: %s", self.user, reason,
                 extra={"event": "session-closed", "user": self.user, "session": self.session_id, "why": why})
        if self.ws.state is _OPEN:
            self.ws.send_close(1008, reason[:120])
            self.flush()
        transport = self.transport
        if transport is not None:
            # close() sends what is queued, the close frame last, so a peer that reads again learns
            # why; one that never does is cut off after close_timeout, which keeps memory bounded.
            transport.close()
            self.server.loop.call_later(self.server.config.close_timeout, transport.abort)

    @property
    def is_open(self) -> bool:
        return self.ws.state is _OPEN

    @property
    def protocol_name(self) -> str:
        return "legacy" if self.legacy else p.SUBPROTOCOL

    def close(self, code: int, reason: str) -> None:
        if self.session_id:
            self.server.relay.close_session(self)
        if self.ws.state is _OPEN:
            self.ws.send_close(code, reason)
            self.schedule_flush()
        elif self.transport is not None:
            self.transport.close()

    # -- internals -----------------------------------------------------------------

    def schedule_flush(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.server.mark_dirty(self)

    def flush(self) -> None:
        self.dirty = False
        chunks = self.ws.data_to_send()
        if not chunks or self.transport is None:
            return
        eof = chunks[-1] == b""
        if eof:
            chunks.pop()
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.server.metrics.bytes_out += len(data)
            self.transport.write(data)
            buffered = self.transport.get_write_buffer_size()
            if buffered > self.server.config.max_buffer_bytes and self.is_open:
                # A session that does not read: bound what waits for it. Its messages are stored,
                # so it gets them when it comes back.
                self.drop("slow-consumer", "closed: too many unread messages (outgoing buffer full)")
                return
            if self.written_upto > self.confirmed_upto and buffered == 0:
                self.confirmed_upto = self.written_upto
                self.server.relay.confirm_received(self.user, self.written_upto)
        if eof:
            # The server closes the TCP connection once the closing handshake is done.
            self.transport.close()

    def _handshake_timeout(self) -> None:
        self.open_timer = None
        if self.ws.state is State.CONNECTING and self.transport is not None:
            self.transport.abort()

    def _on_request(self, request: Request) -> None:
        response = self._handshake_response(request)
        self.ws.send_response(response)
        if response.status_code != 101:
            self.server.metrics.handshakes_refused[response.status_code] += 1
            return
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None
        receive = request.headers.get(p.RECEIVE_HEADER, "all").lower() != "none"
        self._open(*self._resume_point(request.headers), receive=receive)

    def _resume_point(self, headers: Headers) -> tuple[int | None, float | None]:
        """Where a native client's backlog starts: after a message id, or since a time (checked at the handshake)."""
        if self.legacy:
            return None, None
        after, since = headers.get(p.RESUME_AFTER_HEADER), headers.get(p.REPLAY_SINCE_HEADER)
        return (int(after) if after is not None else None), (p.parse_ts(since) if since is not None else None)

    def _handshake_response(self, request: Request) -> Response:
        try:
            self.user, query = p.parse_user_path(request.path)
        except InvalidUserId as exc:
            return self.ws.reject(400, f"{exc}\n")
        response = self.ws.accept(request)
        if response.status_code != 101:
            return response
        self.legacy = self.ws.subprotocol is None
        refusal = self._check_limits() or self._check_credentials(request.headers, query)
        if refusal is None and not self.legacy:
            refusal = _check_resume_headers(request.headers)
        return self.ws.reject(*refusal) if refusal is not None else response

    def _check_limits(self) -> tuple[int, str] | None:
        config = self.server.config
        if len(self.server.connections) > config.max_connections:
            return 503, f"server full: {config.max_connections} connections; try again later\n"
        if self.server.relay.sessions_of(self.user) >= config.max_sessions_per_user:
            return 429, f"too many sessions for {self.user}: at most {config.max_sessions_per_user}\n"
        return None

    def _check_credentials(self, headers: Headers, query: dict[str, str]) -> tuple[int, str] | None:
        """With accounts, every session proves its user with a token (header, or ``?token=`` for seed apps).

        Without accounts, native sessions prove the shared key at the handshake and seed clients
        send it in each frame, as the old system did.
        """
        offered = _bearer(headers) or query.get(p.TOKEN_QUERY_PARAM)
        if self.server.accounts_on():
            assert self.server.accounts is not None
            if not offered:
                return 401, (f"authentication required: send 'Authorization: Bearer <token>' or add "
                             f"?{p.TOKEN_QUERY_PARAM}=<token> to the URL\n")
            if not self.server.accounts.verify(self.user, offered):
                return 403, f"authentication refused: wrong token for {self.user}\n"
            self.authenticated = True
            return None
        if self.legacy:
            return None
        if offered is None:
            return 401, "missing credentials: send the header 'Authorization: Bearer <key>'\n"
        if not hmac.compare_digest(offered.encode(), self.server.config.auth_key.encode()):
            return 403, "authentication refused: wrong key\n"
        return None

    def _open(self, after: int | None, since_ts: float | None, receive: bool = True) -> None:
        server = self.server
        self.session_id = server.next_session_id()
        server.metrics.sessions_opened[self.protocol_name] += 1
        log.info("connect user=%s protocol=%s peer=%s session=%s", self.user, self.protocol_name, self.peer,
                 self.session_id, extra={"event": "connect", "user": self.user, "protocol": self.protocol_name,
                                         "peer": self.peer, "session": self.session_id})
        if self.legacy:
            self.send_text(p.LEGACY_CONNECTED)
        else:
            features = server.relay.features + ((p.Feature.TOKENS,) if self.authenticated else ())
            hello = p.Hello(user=self.user, session=self.session_id, server=SERVER_NAME,
                            max_text_bytes=server.config.max_text_bytes, features=features)
            self.send_text(p.encode(hello))
        server.relay.open_session(self, after, since_ts, receive=receive)

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if not frame.fin:
                self.fragments = [frame.data]
                self.fragment_is_text = opcode is _TEXT
                return
            self._on_message(opcode is _TEXT, frame.data)
        elif opcode is _CONT and self.fragments is not None:
            self.fragments.append(frame.data)
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), None
                self._on_message(self.fragment_is_text, data)

    def _on_message(self, is_text: bool, data: BytesLike) -> None:
        # No state check: frames that arrived before a close frame in the same read still count.
        relay = self.server.relay
        if not is_text:
            relay.on_binary(self)
            return
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError:
            self.server.metrics.error("bad-utf8")
            self.ws.fail(1007, "invalid UTF-8 in a text frame")
            return
        if self.legacy:
            relay.on_legacy_text(self, text)
        else:
            relay.on_native_text(self, text)
