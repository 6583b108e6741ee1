"""WebSocket transport: websockets' sans-I/O ServerProtocol driven by an asyncio.Protocol.

Why not the websockets high-level API: measured here, a relay on it reaches
0.36x the old Node server, while sans-I/O protocol objects in an
``asyncio.Protocol`` under uvloop, with outgoing writes coalesced once per
event-loop tick, reach 1.18x (``../shared/bench/README.md``). So each
connection queues frames in its ServerProtocol and marks itself dirty; one
``call_soon`` callback per tick writes every dirty connection's bytes at once.

Which wire protocol a session speaks is decided once, at the handshake: the
connection keeps the protocol's codec (``chatcli.server.codecs``), which encodes
what it is sent and hands what it sends to the relay's reader for that protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from websockets.exceptions import NegotiationError
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike, Subprotocol

try:  # websockets' C unmasking, which its own parser uses; its pure-Python twin where it was not built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - depends on the platform's wheel
    from websockets.utils import apply_mask

from chatcli import __version__
from chatcli import protocol as p
from chatcli.errors import StorageError
from chatcli.server.admission import Admitted, Refused, admit
from chatcli.server.codecs import LEGACY, Codec, codec_for
from chatcli.server.limitlog import LimitLog
from chatcli.server.throttle import AuthThrottle

if TYPE_CHECKING:
    from chatcli.server.config import ServerConfig
    from chatcli.server.engine.base import Accounts
    from chatcli.server.metrics import Metrics
    from chatcli.server.relay import Relay

__all__ = ["HANDSHAKE_SLACK", "HIGH_WATER_BYTES", "LOW_WATER_BYTES", "MAX_FRAGMENTS", "MAX_REQUEST_HEAD_BYTES",
           "SERVER_NAME", "TOKEN_CHECK_INTERVAL_S", "Connection", "Phase", "RelayServerProtocol", "WebSocketServer"]

log = logging.getLogger("chatcli.server")
# websockets logs every open and close at INFO; we write our own single line per connection.
_ws_log = logging.getLogger("chatcli.server.websockets")
_ws_log.setLevel(logging.WARNING)
_ws_log.propagate = False

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
#: First header bytes of the frames read without websockets' parser: FIN set, no reserved bit, text or binary.
_WHOLE_DATA_FRAMES: Final = {0x81: _TEXT, 0x82: _BINARY}
_OPCODES: Final = frozenset(int(opcode) for opcode in Opcode)
_OPEN = State.OPEN
SERVER_NAME = f"chatcli/{__version__}"


_SUBPROTOCOLS = (Subprotocol(p.SUBPROTOCOL),)  # shared by every connection: idle connections must stay small


#: Bytes a request head (request line and headers) may take before it is refused with 431.
MAX_REQUEST_HEAD_BYTES: Final = 16 * 1024
#: Connections beyond --max-connections that are still read, to be refused with a 503 that says why;
#: past this many more, new connections are closed unread.
HANDSHAKE_SLACK: Final = 256
#: Fragments one message may arrive in: each costs a parse and a list slot, and empty
#: continuation frames cost no bytes, so ``max_size`` alone does not bound them.
MAX_FRAGMENTS: Final = 1024
#: Outgoing bytes above which a connection counts as backlogged: its own further requests wait, and
#: paced answers (replay and history pages) stop, until the buffer is back under LOW_WATER_BYTES.
HIGH_WATER_BYTES: Final = 256 * 1024
LOW_WATER_BYTES: Final = 64 * 1024
_HEAD_END: Final = b"\r\n\r\n"
#: How often the accounts' generation is read, while token sessions are open: a rotated or removed token's
#: sessions close within about this long.
TOKEN_CHECK_INTERVAL_S: Final = 1.0
#: After the accounts could not be read, token checks wait this long: a Redis out of reach would otherwise
#: hold the event loop for its whole timeout every second.
TOKEN_CHECK_RETRY_S: Final = 10.0
#: The close reason of a session whose token was rotated or whose account was removed.
TOKEN_REVOKED_REASON: Final = "token revoked"


class Phase(enum.Enum):
    """Where a connection is. Frames are acted on in OPEN only: admission first."""

    HANDSHAKE = enum.auto()  # waiting for the request head; nothing after it is even parsed
    OPEN = enum.auto()  # the handshake was accepted and the credentials proved
    CLOSING = enum.auto()  # the server failed, dropped or closed it: the rest is only drained
    REFUSED = enum.auto()  # the handshake was refused: everything more is discarded


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

    def queue_text(self, data: bytes) -> bool:
        """``send_text`` if the connection is open; False (nothing queued) if not. Reads ``_state``, not
        websockets' ``state`` property: a property call per frame showed in the relay's profile."""
        if self._state is not _OPEN:
            return False
        self.send_text(data)
        return True

    # -- reading ---------------------------------------------------------------------

    #: An incomplete frame held by ``receive_frames`` (class defaults: an idle connection holds none), and
    #: the size it must reach before it is worth parsing again (0: as soon as anything arrives).
    partial: bytearray | None = None
    partial_needs = 0

    def receive_frames(self, data: bytes | bytearray) -> list[Frame]:
        """``receive_data`` then ``events_received``, reading whole unfragmented data frames itself.

        websockets' parser runs a generator and three or four buffer reads per frame: a quarter of the relay's
        CPU under load. While the connection is open, without extensions or debug logging, a complete,
        masked, final text or binary frame outside a fragmented message is unmasked here. Every other
        frame goes to websockets' parser whole and at a frame boundary, so its state (fragments, pings,
        close, every error and limit) is what it would be had it read everything; a header it refuses
        (a bad opcode, no mask, more than ``max_size``) goes to it at once, and so does everything once
        the connection is no longer open. An incomplete frame waits here, bounded by ``max_size`` like
        websockets' own buffer.
        """
        held = self.partial
        if held is not None:
            held += data
            if len(held) < self.partial_needs:
                return []
            self.partial, data = None, held
        frames: list[Frame] = []
        position = self._read_whole_frames(data, frames)
        if position < len(data):
            if self.state is _OPEN and self.partial_needs >= 0:
                self.partial = bytearray(data[position:])
            else:
                self._parse_with_websockets(data[position:], frames)
        return frames

    def _read_whole_frames(self, data: bytes | bytearray, frames: list[Frame]) -> int:
        """Append the complete frames at the start of ``data`` to ``frames``; return where they end.

        Sets ``partial_needs`` to the size an incomplete frame at the end needs, or to -1 when the
        rest must go to websockets' parser (the connection stopped being open, or a header it refuses).
        """
        position, end = 0, len(data)
        while position < end:
            if self._state is not _OPEN or self.extensions or self.debug:
                self.partial_needs = -1
                return position
            if end - position < 2:
                break
            head1, head2 = data[position], data[position + 1]
            length, start = head2 & 0x7F, position + 6  # a client's frames carry a 4-byte mask
            if length >= 126:
                size = 2 if length == 126 else 8
                if end - position < 2 + size:
                    break
                length = int.from_bytes(data[position + 2:position + 2 + size], "big")
                start += size
            limit = self.max_message_size
            if limit is not None and self.current_size is not None:
                limit -= self.current_size
            if head1 & 0x0F not in _OPCODES or not head2 & 0x80 or (limit is not None and length > limit):
                self.partial_needs = -1  # websockets fails the connection on this header alone
                return position
            stop = start + length
            if stop > end:
                self.partial_needs = stop - position
                return position
            opcode = _WHOLE_DATA_FRAMES.get(head1)
            if opcode is not None and self.current_size is None:
                frames.append(Frame(opcode, apply_mask(data[start:stop], data[start - 4:start])))
            else:
                self._parse_with_websockets(data[position:stop], frames)
            position = stop
        self.partial_needs = 0
        return position

    def _parse_with_websockets(self, data: bytes | bytearray, frames: list[Frame]) -> None:
        self.receive_data(data)
        frames.extend(self.events_received())  # type: ignore[arg-type]  # frames only, once open

    def receive_eof(self) -> None:
        held, self.partial = self.partial, None
        if held is not None and self.state is _OPEN:  # websockets reports the frame cut short, as it would
            self._parse_with_websockets(held, [])
        super().receive_eof()


@contextlib.contextmanager
def _logged_storage_error(doing: str) -> Iterator[None]:
    """Log a storage error for the operator (the peer gets a plain 503), and let it propagate."""
    try:
        yield
    except StorageError as exc:
        log.error("cannot %s: %s", doing, exc, extra={"event": "storage-error"})
        raise


def _log_auth_change(required: bool) -> None:
    """`chatcli user add` or `user remove` on a running server changed who may connect: say so."""
    if required:
        log.info("authentication: accounts were added: per-user tokens are now required",
                 extra={"event": "auth-mode", "mode": "tokens"})
    else:
        log.warning("authentication: the last account was removed: tokens are no longer required and the "
                    "shared key lets anyone connect as any user (--require-auth keeps tokens required)",
                    extra={"event": "auth-mode", "mode": "shared-key"})


class WebSocketServer:
    """State shared by all connections: config, routing, the write-coalescing queue."""

    def __init__(self, config: ServerConfig, relay: Relay, metrics: Metrics,
                 accounts: Accounts | None = None) -> None:
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
        self.auth_throttle = AuthThrottle()
        self.refusal_log = LimitLog("handshake-refused")
        self.tokens_required: bool | None = None  # the last answer of accounts_on, to log a change
        # Per user with token sessions open, the id of the token they proved: one entry shared by all of
        # the user's sessions (an idle connection pays nothing for it). A handshake that proves another id
        # closes the sessions of the old one; check_tokens closes those of a rotated or removed token.
        self.token_ids: dict[str, bytes] = {}
        self.accounts_generation: int | None = None  # as last read by check_tokens; None: check everyone
        self.token_checks_resume_at = 0.0  # loop time: after a failed read, checks pause until then
        self.token_check_log = LimitLog("storage-error")

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

    # -- what admission reads (chatcli.server.admission.AdmissionState) ------------------------

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    def verify_token(self, user: str, token: str) -> bytes | None:
        assert self.accounts is not None
        with _logged_storage_error("check a token"):
            return self.accounts.verified_token_id(user, token)

    def sessions_of(self, user: str) -> int:
        return self.relay.sessions_of(user)

    def auth_retry_after(self, address: str) -> float:
        return self.auth_throttle.retry_after(address, self.loop.time())

    def accounts_on(self) -> bool:
        """Tokens are required with --require-auth, and as soon as any account exists (checked per handshake,
        so `chatcli user add` on a running server takes effect at once)."""
        if self.accounts is None:
            return False
        with _logged_storage_error("read the accounts"):
            required = self.config.require_auth or self.accounts.any_accounts()
        if self.tokens_required is not None and required != self.tokens_required:
            _log_auth_change(required)
        self.tokens_required = required
        return required

    def heartbeat(self) -> None:
        """Ping sessions that have been silent for ping_interval; drop those whose pong is ping_timeout late."""
        now = self.loop.time()
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        for connection in list(self.connections):
            if not connection.session_id or connection.ws.state is not _OPEN or connection.token_timer is not None:
                continue  # (unread for the user's rate limit: a pong would wait unread too)
            if connection.ping_sent_at:
                if now - connection.ping_sent_at > timeout:
                    connection.drop("dead-peer", f"no pong within {timeout:g} s")
            elif now - connection.last_seen > interval:
                connection.ping_sent_at = now
                connection.ws.send_ping(b"chatcli")
                connection.schedule_flush()
        self.relay.forget_refilled_quotas()  # periodic, like the pings; keeps the per-user table bounded

    # -- revoked tokens --------------------------------------------------------------------------

    def token_proved(self, user: str, token_id: bytes) -> None:
        """A handshake proved ``user``'s current token: sessions that proved an earlier one are revoked now."""
        known = self.token_ids.get(user)
        if known == token_id:
            return  # the same token as the user's other sessions: they share the entry
        if known is not None:
            self.revoke_tokens({user})
        self.token_ids[user] = token_id

    def check_tokens(self) -> None:
        """Close the sessions whose token was rotated or removed since they proved it. Called every
        TOKEN_CHECK_INTERVAL_S: one read of the generation while token sessions are open (none otherwise),
        and when it changed, one batched lookup of their users' current tokens."""
        if self.accounts is None or not self.token_ids:
            self.accounts_generation = None  # the next token session's user is checked on the first look
            return
        if self.loop.time() < self.token_checks_resume_at:
            return
        current = self._current_token_ids_if_changed(self.accounts)
        if current is not None:
            revoked = {user for user, token_id in self.token_ids.items() if current.get(user) != token_id}
            if revoked:
                self.revoke_tokens(revoked)

    def _current_token_ids_if_changed(self, accounts: Accounts) -> dict[str, bytes] | None:
        """The current token ids of the users with token sessions if the accounts changed since the last
        look; None if they did not, or could not be read (then checks pause for TOKEN_CHECK_RETRY_S)."""
        try:
            generation = accounts.generation()  # first: a change after it is seen at the next look
            if generation == self.accounts_generation:
                return None
            current = accounts.current_token_ids(self.token_ids)
        except StorageError as exc:
            self.token_checks_resume_at = self.loop.time() + TOKEN_CHECK_RETRY_S
            self.token_check_log.bit("token-check", logging.ERROR, f"cannot check for revoked tokens: {exc}")
            return None
        self.accounts_generation = generation
        return current

    def revoke_tokens(self, users: set[str]) -> None:
        """Close the token sessions of ``users`` (1008, "token revoked"): one pass over the connections."""
        closed = dict.fromkeys(users, 0)
        for connection in list(self.connections):
            if connection.user in closed and connection.authenticated and connection.phase is Phase.OPEN:
                connection.drop("token-revoked", TOKEN_REVOKED_REASON)
                closed[connection.user] += 1
        for user, count in closed.items():
            self.token_ids.pop(user, None)
            log.info("the token of %s was rotated or removed: closed %d session(s) that proved it", user, count,
                     extra={"event": "token-revoked", "user": user, "sessions": count})

    def forget_token(self, user: str) -> None:
        """``user``'s last session closed: nothing of theirs is left to check."""
        if not self.relay.sessions_of(user):
            self.token_ids.pop(user, None)

    def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down") -> None:
        self.closing = True
        if not self.connections:
            self.all_closed.set()
        for connection in list(self.connections):
            connection.close(code, reason)


class Connection(asyncio.Protocol):
    """One TCP connection: the handshake and its admission, then a chat session once open."""

    # Slots: thousands of idle connections must stay under a few KB each.
    __slots__ = ("authenticated", "codec", "confirmed_upto", "dirty", "drain_waiters", "fragment_is_text",
                 "fragments", "frame_budget", "frame_budget_at", "head_bytes", "head_tail", "held_frames", "last_seen",
                 "open_timer", "peer", "peer_address", "phase", "ping_sent_at", "queued_bytes", "server",
                 "session_id", "token_timer", "transport", "user", "writing_paused", "written_upto", "ws")

    def __init__(self, server: WebSocketServer) -> None:
        # The connection: its server, its socket and peer (set once connected), websockets' state for it.
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""  # host:port, for the logs
        self.peer_address = ""  # the host: failed authentications are counted against it
        self.ws = RelayServerProtocol(subprotocols=_SUBPROTOCOLS, max_size=server.config.max_frame_bytes,
                                      logger=_ws_log)
        # Admission: nothing the peer sends is acted on before phase is OPEN, and user is only set then.
        self.phase = Phase.HANDSHAKE
        self.head_bytes = 0  # request-head bytes seen so far, bounded by MAX_REQUEST_HEAD_BYTES
        self.head_tail = b""  # the last bytes of the head so far: its end may straddle two reads
        self.open_timer: asyncio.TimerHandle | None = None
        # The session, once admitted: who, and the codec of its wire protocol (what it is sent is encoded
        # by it, and what it sends is handed by it to the relay's reader for that protocol).
        self.user = ""
        self.codec: Codec = LEGACY  # replaced at the handshake; nothing is sent or read before it
        self.authenticated = False
        self.session_id = ""
        # Writing: frames queue in ws and go out once per tick. Backpressure: while the transport's
        # buffer is above its high-water mark, the peer's own requests wait in held_frames (reading
        # paused) and paced answers wait in drain_waiters; both are None when empty (idle connections
        # must stay small).
        self.dirty = False
        self.queued_bytes = 0  # bytes queued in ws this tick, not yet written
        self.writing_paused = False
        self.held_frames: list[Frame] | None = None
        self.token_timer: asyncio.TimerHandle | None = None  # frames held for the user's rate limit
        self.drain_waiters: list[Callable[[], None]] | None = None
        # Reading: a message arriving in fragments, and the frame limit, refilled once per read rather
        # than once per frame (messages and requests draw on the user's bucket in the relay).
        self.fragments: list[BytesLike] | None = None
        self.fragment_is_text = True
        now = server.loop.time()
        self.frame_budget = float(server.config.frame_burst)
        self.frame_budget_at = now
        # Liveness: any traffic proves the peer alive; a ping is sent after ping_interval of silence.
        self.last_seen = now
        self.ping_sent_at = 0.0
        # Messages written to this session: received acks cannot go past it. Seed clients never
        # acknowledge (their codec confirms on write): for them the last id whose bytes the kernel took
        # (the buffer was empty after the write) counts as received.
        self.written_upto = self.confirmed_upto = 0

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tcp
        server = self.server
        if server.closing or len(server.connections) >= server.config.max_connections + HANDSHAKE_SLACK:
            # Far past the limit even the polite 503 costs too much: close before reading anything.
            tcp.abort()
            return
        server.connections.add(self)
        tcp.set_write_buffer_limits(high=HIGH_WATER_BYTES, low=LOW_WATER_BYTES)
        peer = tcp.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_address, self.peer = str(peer[0]), f"{peer[0]}:{peer[1]}"
        else:
            self.peer_address = self.peer = str(peer)
        self.open_timer = self.server.loop.call_later(self.server.config.open_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        server = self.server
        server.metrics.bytes_in += len(data)
        now = self.last_seen = server.loop.time()  # any traffic, a pong included, proves the peer alive
        self.ping_sent_at = 0.0
        if self.phase is not Phase.OPEN:
            data = self._receive_unless_open(data)
            if not data:  # a handshake's answer goes at once: in a burst of connections, each starts sooner
                self.flush()
                return
        ws = self.ws
        events = ws.receive_frames(data)
        if not self._take_frames(len(events), now):
            return
        if self.held_frames is None:
            self._handle_frames(events)
        else:  # reading is paused, but a transport may still hand over what it had: keep the order
            self.held_frames.extend(events)
        if ws.state is not _OPEN and self.session_id:
            self._stop_receiving()
        if ws.writes:  # websockets' own answers (a pong, a close); what the relay sends marks itself
            self.schedule_flush()

    def _handle_frames(self, frames: list[Frame]) -> None:
        """Act on frames in order; hold the rest, reading paused, while this connection is backlogged
        or its user has no request left in their bucket.

        A peer that pipelines requests without reading their answers (history pages of up to
        hundreds of KB each) then costs at most one read of held frames, not an answer per frame. A
        user sending faster than ``--rate`` is paced the same way: their frames wait, in order, until
        the bucket refills, so a script's stream is slowed down, never cut by refusals.
        """
        relay = self.server.relay
        allowance = relay.allowance(self.user)  # counted down here; the relay charges the real bucket
        for position, frame in enumerate(frames):
            if self.phase is not Phase.OPEN:
                return  # failed or dropped while handling an earlier frame of this read: act on nothing more
            if self.queued_bytes > HIGH_WATER_BYTES or self.writing_paused:
                self._hold(frames[position:])
                return
            if allowance < 1.0:
                allowance = relay.allowance(self.user)
                if allowance < 1.0:
                    self._hold(frames[position:])
                    self._wait_for_tokens(relay.token_wait(self.user))
                    return
            allowance -= 1.0
            self._on_frame(frame)

    def _hold(self, frames: list[Frame]) -> None:
        self.held_frames = frames
        if self.transport is not None:
            self.transport.pause_reading()

    def _wait_for_tokens(self, seconds: float) -> None:
        if self.token_timer is None:
            metrics = self.server.metrics
            metrics.rate_waits += 1
            metrics.rate_wait_seconds += seconds
            self.token_timer = self.server.loop.call_later(seconds, self._tokens_refilled)

    def _tokens_refilled(self) -> None:
        self.token_timer = None
        if not self.writing_paused:  # else resume_writing acts on the held frames
            self._release_held()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.token_timer is None:  # else the timer acts on the held frames once the bucket refilled
            self._release_held()
        waiters, self.drain_waiters = self.drain_waiters, None
        for callback in waiters or ():
            callback()

    def _release_held(self) -> None:
        """Act on the held frames (some may be held again), and read on once none are left."""
        held, self.held_frames = self.held_frames, None
        if held:
            self._handle_frames(held)
            self.schedule_flush()
        if self.held_frames is None and self.transport is not None and self.phase is not Phase.REFUSED:
            self.transport.resume_reading()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this connection's outgoing buffer is at or below the low-water mark.

        Checked on the next loop turn, after this tick's writes went out: what was just queued counts.
        Never called if the connection is gone first.
        """
        self.server.loop.call_soon(self._call_when_drained, callback)

    def _call_when_drained(self, callback: Callable[[], None]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.writing_paused:
            if self.drain_waiters is None:
                self.drain_waiters = []
            self.drain_waiters.append(callback)
        else:
            callback()

    def _receive_unless_open(self, data: bytes) -> bytes:
        """Before admission, only the request head reaches websockets; what follows it, only once admitted."""
        if self.phase is Phase.HANDSHAKE:
            return self._receive_handshake(data)
        if self.phase is Phase.CLOSING:
            return data  # still parsed, for the peer's close frame; no data frame is acted on
        return b""  # refused: discarded unread

    def eof_received(self) -> bool | None:
        if self.phase is not Phase.REFUSED:
            self.ws.receive_eof()
            self.schedule_flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.connections.discard(self)
        if server.closing and not server.connections:
            server.all_closed.set()
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None
        if self.token_timer is not None:
            self.token_timer.cancel()
            self.token_timer = None
        if self.session_id:
            server.relay.close_session(self)
            if self.authenticated:
                server.forget_token(self.user)
            code = self._close_code()
            protocol = self.codec.name
            log.info("disconnect user=%s protocol=%s peer=%s session=%s code=%s", self.user, protocol, self.peer,
                     self.session_id, code, extra={"event": "disconnect", "user": self.user, "protocol": protocol,
                                                   "peer": self.peer, "session": self.session_id, "code": code})

    def _close_code(self) -> int:
        """The close code of the closing handshake, whoever started it; 1006 when there was none."""
        close = self.ws.close_rcvd or self.ws.close_sent
        return close.code if close is not None else CloseCode.ABNORMAL_CLOSURE

    # -- what routing calls ------------------------------------------------------

    def send_text(self, text: str) -> None:
        data = text.encode()
        if self.ws.queue_text(data):
            self.queued_bytes += len(data)
            if not self.dirty:
                self.dirty = True
                self.server.mark_dirty(self)

    def written(self, msg_id: int) -> None:
        self.written_upto = msg_id

    def auth_failed(self) -> None:
        """A frame of this session carried a wrong key: count it against its address, and stop a guesser."""
        if self.server.auth_throttle.failed(self.peer_address, self.server.loop.time()):
            self.drop("auth-failures", "too many failed authentication attempts")

    def drop(self, why: str, reason: str) -> None:
        """Close a session the server gave up on: a close frame with the reason, then the TCP connection."""
        self.server.metrics.closed[why] += 1
        self._stop_receiving()  # from now on its messages are stored, not lost in a buffer
        log.info("closing session of %s: %s", self.user, reason,
                 extra={"event": "session-closed", "user": self.user, "session": self.session_id, "why": why})
        if self.ws.state is _OPEN:
            self.ws.send_close(CloseCode.POLICY_VIOLATION, reason[:120])
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

    def close(self, code: int, reason: str) -> None:
        self._stop_receiving()
        if self.ws.state is _OPEN:
            self.ws.send_close(code, reason)
            self.schedule_flush()
        elif self.transport is not None:
            self.transport.close()

    # -- internals -----------------------------------------------------------------

    def _stop_receiving(self) -> None:
        """No more frames of this connection are acted on, and it is no longer a recipient (idempotent)."""
        if self.phase is Phase.OPEN:
            self.phase = Phase.CLOSING
        if self.session_id:
            self.server.relay.close_session(self)

    def schedule_flush(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.server.mark_dirty(self)

    def flush(self) -> None:
        self.dirty = False
        self.queued_bytes = 0
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
            if self.codec.confirms_on_write and self.written_upto > self.confirmed_upto and buffered == 0:
                self.confirmed_upto = self.written_upto
                self.server.relay.confirm_received(self.user, self.written_upto)
        if eof:
            # The server closes the TCP connection once the closing handshake is done, or after a refusal.
            self.transport.close()

    def _handshake_timeout(self) -> None:
        self.open_timer = None
        if self.phase is Phase.HANDSHAKE and self.transport is not None:
            self.transport.abort()

    def _take_frames(self, count: int, now: float) -> bool:
        """Charge ``count`` frames of any kind to the frame budget; drop a peer that floods.

        Messages have their own, finer limit; this one bounds what costs work before any message
        exists: empty continuation frames, pings, frames the relay only answers with an error.
        """
        budget = self.frame_budget - count
        if budget < 0:
            config = self.server.config
            budget = min(float(config.frame_burst), budget + (now - self.frame_budget_at) * config.frame_rate)
            self.frame_budget_at = now
            if budget < 0:
                self.frame_budget = 0.0
                if self.phase is Phase.OPEN:
                    self.server.metrics.error("too-many-frames")
                    self.drop("flood", "too many frames: slow down")
                return False
        self.frame_budget = budget
        return True

    # -- the handshake: admission first -----------------------------------------------

    def _receive_handshake(self, data: bytes) -> bytes:
        """Feed websockets the request head, and nothing after it until the handshake is accepted.

        websockets parses a request and the frames pipelined behind it in one call; feeding it only
        the head means no frame is even parsed for a connection that is refused. What follows the
        head is returned to be parsed as frames once the session is open, and dropped otherwise.
        """
        end = self._head_end(data)
        head = data if end < 0 else data[:end]
        self.head_bytes += len(head)
        ws = self.ws
        if self.head_bytes > MAX_REQUEST_HEAD_BYTES:
            self._refuse(ws.reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                   f"request head larger than {MAX_REQUEST_HEAD_BYTES} bytes\n"))
            return b""
        ws.receive_data(head)
        for request in ws.events_received():  # the request, once its head is complete
            self._on_request(request)  # type: ignore[arg-type]
        if self.phase is Phase.HANDSHAKE and ws.eof_sent:
            self._refuse_malformed()
        return data[end:] if end >= 0 and self.phase is Phase.OPEN else b""

    def _head_end(self, data: bytes) -> int:
        """Where the request head ends in ``data`` (just past its blank line), or -1 when not in it."""
        carried = self.head_tail
        index = (carried + data).find(_HEAD_END)
        if index < 0:
            self.head_tail = (carried + data)[-(len(_HEAD_END) - 1):]
            return -1
        return index + len(_HEAD_END) - len(carried)

    def _on_request(self, request: Request) -> None:
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None
        server, ws = self.server, self.ws
        response = ws.accept(request)  # websockets' own checks: a WebSocket upgrade, a known subprotocol
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            self._refuse(response)
            return
        codec = codec_for(ws.subprotocol)
        verdict = admit(request.path, request.headers, legacy=codec is LEGACY, peer_address=self.peer_address,
                        state=server)
        # websockets' parser keeps the request in its generator's frame for the connection's whole life:
        # its headers were a quarter of an idle connection's memory (~1.5 of 6 KB), a bearer token with them.
        request.headers.clear()
        if isinstance(verdict, Refused):
            if verdict.auth_failure:
                self._count_auth_failure()
            self._refuse(ws.reject(verdict.status, verdict.reason))
            return
        if verdict.token_id is not None:
            server.token_proved(verdict.user, verdict.token_id)
        ws.send_response(response)
        self.user, self.authenticated, self.codec = verdict.user, verdict.authenticated, codec
        self.phase = Phase.OPEN
        self._open(verdict)

    def _refuse(self, response: Response) -> None:
        self.phase = Phase.REFUSED
        status = response.status_code
        self.server.metrics.handshakes_refused[status] += 1
        reason = (response.body or b"").decode("utf-8", "replace").strip().partition("\n")[0]  # one log line
        # Not the request path: a seed app's ?token= is in it, and tokens never reach the log.
        self.server.refusal_log.bit(str(status), logging.INFO,
                                    f"refused a handshake from {self.peer_address}: {status} {reason}",
                                    status=status, peer=self.peer_address)
        self.ws.send_response(response)

    def _refuse_malformed(self) -> None:
        """websockets closes a request it cannot parse (a raw space in the path, say) without a word: answer
        400 first, as the HTTP port does. Its own end of stream is still queued, so this goes before it."""
        self.phase = Phase.REFUSED
        # Not the request line itself: it may hold a token (a seed app's ?token=), or TLS bytes sent to a
        # plain port.
        reason = "malformed request: expected a WebSocket upgrade, GET /<your-id> HTTP/1.1"
        self.server.metrics.handshakes_refused[HTTPStatus.BAD_REQUEST] += 1
        self.server.refusal_log.bit("400", logging.INFO, f"refused a handshake from {self.peer_address}: 400 "
                                    f"{reason}", status=400, peer=self.peer_address)
        if self.transport is not None:
            self.transport.write(self.ws.reject(HTTPStatus.BAD_REQUEST, reason + "\n").serialize())

    def _count_auth_failure(self) -> None:
        server = self.server
        if server.auth_throttle.failed(self.peer_address, server.loop.time()):
            log.warning("too many failed authentication attempts from %s: refusing it for %g s",
                        self.peer_address, server.auth_throttle.window_s,
                        extra={"event": "auth-throttled", "peer": self.peer_address})

    def _open(self, admitted: Admitted) -> None:
        server = self.server
        self.session_id = server.next_session_id()
        protocol = self.codec.name
        server.metrics.sessions_opened[protocol] += 1
        log.info("connect user=%s protocol=%s peer=%s session=%s", self.user, protocol, self.peer,
                 self.session_id, extra={"event": "connect", "user": self.user, "protocol": protocol,
                                         "peer": self.peer, "session": self.session_id})
        relay = server.relay
        after, reset = relay.resume_after(self.user, admitted.after, admitted.epoch)  # seed clients: (None, False)
        features = relay.features + ((p.Feature.TOKENS,) if self.authenticated else ())
        hello = p.Hello(user=self.user, session=self.session_id, server=SERVER_NAME,
                        max_text_bytes=server.config.max_text_bytes, features=features, epoch=relay.epoch, reset=reset)
        self.send_text(self.codec.greeting(hello))
        relay.open_session(self, after, admitted.since_ts, receive=admitted.receive)

    # -- frames ----------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if not frame.fin:
                self.fragments = [frame.data]
                self.fragment_is_text = opcode is _TEXT
                return
            self._on_message(opcode is _TEXT, frame.data)
        elif opcode is _CONT and self.fragments is not None:
            if len(self.fragments) >= MAX_FRAGMENTS:
                self._fail(CloseCode.MESSAGE_TOO_BIG, f"a message may arrive in at most {MAX_FRAGMENTS} fragments")
                return
            self.fragments.append(frame.data)
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), None
                self._on_message(self.fragment_is_text, data)

    def _on_message(self, is_text: bool, data: BytesLike) -> None:
        # Frames that arrived before a peer's close frame in the same read still count: the phase,
        # not websockets' state, says whether to act (it changes only when the server gives up).
        relay = self.server.relay
        if not is_text:
            relay.on_binary(self)
            return
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError:
            self.server.metrics.error("bad-utf8")
            self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame")
            return
        self.codec.dispatch(relay, self, text)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (a close frame with ``code``): nothing more it sent is acted on."""
        self._stop_receiving()
        self.ws.fail(code, reason)
