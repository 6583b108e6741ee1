"""The chatcli.v1 client: connect, send and await acks, iterate messages, reconnect.

The only client module that imports websockets. Every transport failure leaves
here as a ``chatcli.errors.ClientError`` subclass, so commands never see a
websockets exception:

* the server cannot be reached, or the session drops → ``ConnectError`` (3)
* its TLS certificate is not trusted (wss://)         → ``ConnectError`` (3), naming the cause
* the handshake is refused with 401/403               → ``AuthError`` (4)
* a message is refused (its ack says so)              → ``RefusedError`` (5)
* an ack does not come in time                        → ``TimedOutError`` (6)

Durability (servers announcing ``Feature.STORE`` / ``RESUME`` / ``HISTORY``):
``listen`` and ``chat`` reconnect with ``Chatcli-After`` = the last message id
they saw (and ``Chatcli-Epoch`` = the store it came from: a hello with ``reset``
says the store changed, and they start from its beginning instead of skipping)
and confirm handled messages with ``received``; ``send`` resends an
unacknowledged message after a reconnect with the same client id, which the
server answers as a ``duplicate`` if it had already stored it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple, TextIO
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus, InvalidURI, WebSocketException

from chatcli import __version__
from chatcli.config import ClientSettings
from chatcli.errors import (
    AuthError,
    CertificateError,
    ClientError,
    ConnectError,
    RefusedError,
    RemoteProtocolError,
    TimedOutError,
    UnknownFrameType,
    UsageError,
)
from chatcli.protocol import (
    EPOCH_HEADER,
    EPOCH_RULE,
    RECEIVE_HEADER,
    REPLAY_SINCE_HEADER,
    RESUME_AFTER_HEADER,
    SUBPROTOCOL,
    Ack,
    ClientFrame,
    Error,
    ErrorCode,
    Feature,
    Hello,
    History,
    HistoryRequest,
    Message,
    Reason,
    Received,
    Send,
    ServerFrame,
    Watch,
    Who,
    WhoRequest,
    check_text,
    check_user_id,
    encode,
    format_ts,
    is_valid_epoch,
    parse_server_frame,
)
from chatcli.units import parse_duration

Notice = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a session's backlog starts; neither field set means "after the server-side cursor"."""

    #: Only messages with a greater id (``Chatcli-After``); 0 means every stored message.
    after: int | None = None
    #: The store ``after`` belongs to (``Chatcli-Epoch``, from a hello); None when unknown.
    epoch: str | None = None
    #: Only messages received since this ISO 8601 UTC time (``Chatcli-Since``).
    since: str | None = None
    #: False for sessions that only send or ask (``Chatcli-Receive: none``): they get no messages and
    #: do not make their user look online, so a message to ME is stored, not "delivered" to a `send`.
    receive: bool = True

    @classmethod
    def live_only(cls) -> ResumePoint:
        """For sessions that only send or ask for history: no backlog to skip over."""
        return cls(receive=False)

    def headers(self) -> dict[str, str]:
        out = {}
        if self.after is not None:
            out[RESUME_AFTER_HEADER] = str(self.after)
            if self.epoch is not None:
                out[EPOCH_HEADER] = self.epoch
        if self.since is not None:
            out[REPLAY_SINCE_HEADER] = self.since
        if not self.receive:
            out[RECEIVE_HEADER] = "none"
        return out


def parse_since(value: str, now: float | None = None) -> ResumePoint:
    """``listen --since``: a message id (digits only), ``all``, or a duration with a unit (``1h``, ``2d``)."""
    value = value.strip()
    if value.lower() == "all":
        return ResumePoint(after=0)
    if value.isascii() and value.isdigit():
        return ResumePoint(after=int(value))
    try:
        if not value[-1:].isalpha():  # a bare number is an id: a duration needs its unit
            raise ValueError(value)
        seconds = parse_duration(value)
    except ValueError:
        raise UsageError(f"invalid --since {value!r}: use a message id (e.g. 42), a duration with a unit "
                         "(e.g. 30m, 1h, 2d) or 'all'") from None
    return ResumePoint(since=format_ts((time.time() if now is None else now) - seconds))


def user_url(server_url: str, user: str) -> str:
    """``ws://host:port/<user>``, with the id percent-encoded."""
    return server_url.rstrip("/") + "/" + quote(check_user_id(user), safe="")


# ---------------------------------------------------------------------------
# One session
# ---------------------------------------------------------------------------


class Session:
    """An open chatcli.v1 session, after the server's hello."""

    _ids: Final = itertools.count(1)
    #: Servers that store messages treat a repeated (sender, id) as a retry of the same message,
    #: so ids must differ between runs: a random tag per process, then a counter.
    _tag: Final = os.urandom(6).hex()

    def __init__(self, ws: ClientConnection, hello: Hello, timeout: float) -> None:
        self._ws = ws
        self.hello = hello
        self.timeout = timeout

    @staticmethod
    def new_id() -> str:
        """A client id for a ``send``: unique per run, and kept when a message is resent after a reconnect."""
        return f"{Session._tag}-{next(Session._ids)}"

    def offers(self, feature: str) -> bool:
        """Whether the server announced ``feature`` (a ``protocol.Feature``) in its hello."""
        return feature in self.hello.features

    async def _write(self, frame: ClientFrame) -> None:
        try:
            await self._ws.send(encode(frame))
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def send_frame(self, frame: Send) -> None:
        """Send without waiting for the ack (it arrives through ``frames()``)."""
        reason = check_text(frame.text, self.hello.max_text_bytes)
        if reason is not None:
            raise RefusedError(_refusal_text(frame.to, reason, self.hello.max_text_bytes), reason)
        await self._write(frame)

    async def send(self, to: str, text: str) -> Ack:
        """Send one message and return its ack (accepted or refused); messages meanwhile are dropped."""
        return await self.send_and_wait(Send(id=self.new_id(), to=to, text=text))

    async def send_and_wait(self, frame: Send) -> Ack:
        """Send ``frame`` and return its ack; a resent id may be answered with ``duplicate``."""
        await self.send_frame(frame)
        reply = await self._answer(lambda r: isinstance(r, Ack) and r.id == frame.id, "acknowledgement")
        assert isinstance(reply, Ack)
        return reply

    async def acknowledge(self, msg_id: int) -> None:
        """Tell a resuming server every message up to ``msg_id`` was handled (advances its cursor)."""
        if self.offers(Feature.RESUME):
            await self._write(Received(msg_id))

    async def request_history(self, peer: str, limit: int, before: int | None = None) -> str:
        """Ask for the conversation with ``peer``; the ``History`` answer (same id) comes through ``frames()``."""
        request = HistoryRequest(id=self.new_id(), peer=peer, limit=limit, before=before)
        await self._write(request)
        return request.id

    async def history(self, peer: str, limit: int, before: int | None = None) -> tuple[Message, ...]:
        """The last ``limit`` messages between us and ``peer``, oldest first.

        A server caps each answer in bytes and says ``more`` when it cut one short: ask again
        for what comes before the oldest message so far, until ``limit`` or no more.
        """
        messages: tuple[Message, ...] = ()
        while True:
            request_id = await self.request_history(peer, limit - len(messages), before)
            reply = await self._answer(_history_answer_to(request_id), "history")
            assert isinstance(reply, History)
            messages = reply.messages + messages
            if not reply.more or not reply.messages or len(messages) >= limit:
                return messages
            before = reply.messages[0].id

    async def who(self) -> tuple[str, ...]:
        """The users with at least one open session that receives messages, sorted."""
        request = WhoRequest(id=self.new_id())
        await self._write(request)
        reply = await self._answer(lambda r: isinstance(r, Who) and r.id == request.id, "answer to who")
        assert isinstance(reply, Who)
        return reply.users

    async def watch(self, users: tuple[str, ...]) -> None:
        """Ask for ``Presence`` frames about ``users``: one each now, then one at every change."""
        await self._write(Watch(users))

    async def _answer(self, matches: Callable[[ServerFrame], bool], what: str) -> ServerFrame:
        """The first frame that ``matches``; an ``Error`` meanwhile refuses the request."""
        try:
            async with asyncio.timeout(self.timeout):
                async for reply in self.frames():
                    if matches(reply):
                        return reply
                    if isinstance(reply, Error):
                        raise RefusedError(f"the server refused the request ({reply.code}): {reply.message}",
                                           reply.code)
        except TimeoutError:
            raise TimedOutError(f"no {what} from the server within {self.timeout:g} s") from None
        raise ConnectError(f"the server closed the session before its {what}")  # pragma: no cover

    async def frames(self) -> AsyncIterator[ServerFrame]:
        """Every frame the server sends, minus types from newer servers; ``ConnectError`` at close."""
        try:
            async for data in self._ws:
                try:
                    yield parse_server_frame(data)
                except UnknownFrameType:
                    continue
        except ConnectionClosed as exc:
            raise _lost(exc) from None
        detail = _close_detail(self._ws.close_code, self._ws.close_reason)
        raise ConnectError(f"the server closed the session{detail}")

    async def close(self) -> None:
        await self._ws.close()


@asynccontextmanager
async def open_session(settings: ClientSettings, user: str,
                       resume: ResumePoint | None = None) -> AsyncIterator[Session]:
    """Connect as ``user``, read the hello, yield the session, close it on the way out.

    ``resume`` says where the stored backlog starts (default: after the server-side cursor).
    """
    url = user_url(settings.url, user)
    ws = await _handshake(url, settings, resume.headers() if resume is not None else {})
    try:
        if ws.subprotocol != SUBPROTOCOL:
            raise ConnectError(f"{settings.url} does not speak {SUBPROTOCOL} (is it an old seed server?)")
        hello = await _read_hello(ws, settings)
        yield Session(ws, hello, settings.timeout)
    finally:
        await ws.close()


async def _handshake(url: str, settings: ClientSettings, headers: dict[str, str]) -> ClientConnection:
    tls = tls_context(settings.cafile, settings.insecure) if settings.uses_tls else None
    try:
        return await connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {settings.credential}", **headers},
            user_agent_header=f"chatcli/{__version__}",
            open_timeout=settings.timeout,
            close_timeout=1.0,  # leaving must stay quick, even from a hung server
            max_size=None,
            ssl=tls,
        )
    except InvalidStatus as exc:
        raise _refused_handshake(settings, exc.response.status_code, exc.response.body) from None
    except InvalidURI as exc:
        raise UsageError(f"invalid server URL {settings.url!r}: {exc}") from None
    except TimeoutError:
        raise ConnectError(f"cannot connect to {settings.url}: no answer in {settings.timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:  # before OSError, its base class
        raise CertificateError(_untrusted(settings.url, exc)) from None
    except ssl.SSLError as exc:
        raise ConnectError(f"cannot connect to {settings.url}: TLS handshake failed ({exc.reason or exc}); "
                           "is the server serving TLS? (a server started without --certfile needs ws://)") from None
    except (OSError, WebSocketException) as exc:
        raise ConnectError(f"cannot connect to {settings.url}: {_describe(exc)}{_tls_hint(settings, exc)}") from None


def _tls_hint(settings: ClientSettings, exc: BaseException) -> str:
    """A guess at the commonest cause of a garbled handshake: ws:// and wss:// mixed up."""
    if isinstance(exc, ConnectionRefusedError | TimeoutError):
        return ""
    if settings.uses_tls and isinstance(exc, ConnectionResetError):
        return " (is the server serving TLS? a server started without --certfile needs ws://)"
    if not settings.uses_tls and isinstance(exc, InvalidMessage):
        return " (if the server uses TLS, connect to wss://)"
    return ""


@functools.cache
def tls_context(cafile: Path | None, insecure: bool) -> ssl.SSLContext:
    """The TLS settings of wss:// sessions: the system's CAs (``SSL_CERT_FILE`` honoured), ``cafile``'s,
    or no verification at all when ``insecure``."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    except FileNotFoundError:
        raise UsageError(f"cannot read the CA file {str(cafile)!r}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the CA file {str(cafile)!r}: {_describe(exc)} "
                         "(expected PEM certificates)") from None


def _untrusted(url: str, exc: ssl.SSLCertVerificationError) -> str:
    cause = exc.verify_message or exc.reason or str(exc)
    return (f"cannot connect to {url}: the server's TLS certificate is not trusted ({cause}); "
            "if the server uses its own CA, pass --cafile CA.pem (or set SSL_CERT_FILE)")


async def _read_hello(ws: ClientConnection, settings: ClientSettings) -> Hello:
    try:
        async with asyncio.timeout(settings.timeout):
            while True:
                try:
                    frame = parse_server_frame(await ws.recv())
                except UnknownFrameType:
                    continue
                if isinstance(frame, Hello):
                    return frame
                raise ConnectError(f"{settings.url} sent {type(frame).__name__} before its hello")
    except TimeoutError:
        raise ConnectError(f"{settings.url} sent no hello within {settings.timeout:g} s") from None
    except ConnectionClosed as exc:
        raise _lost(exc) from None
    except RemoteProtocolError as exc:
        raise ConnectError(f"{settings.url} broke the protocol: {exc}") from None


def _refused_handshake(settings: ClientSettings, status: int, body: bytes | bytearray | None) -> Exception:
    url = settings.url
    detail = bytes(body or b"").decode("utf-8", "replace").strip()[:200]
    if status in (401, 403):
        if settings.token is not None:
            hint = "check the token (--token-file, CHATCLI_TOKEN, or the profile's token / token_file)"
        else:
            hint = ("a server with accounts needs your token (--token-file or CHATCLI_TOKEN; "
                    "`chatcli user add` on the server makes one); otherwise check --auth-key, "
                    "--auth-key-file or CHATCLI_AUTH_KEY")
        return AuthError(f"authentication refused by {url} (HTTP {status}"
                         f"{': ' + detail if detail else ''}): {hint}")
    if status == 400:
        return UsageError(f"the server refused the user id (HTTP 400){': ' + detail if detail else ''}")
    return ConnectError(f"cannot connect to {url}: HTTP {status}{': ' + detail if detail else ''}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(exc, ConnectionResetError):
        return "the server reset the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _close_detail(code: int | None, reason: str | None) -> str:
    if code is None:
        return ""
    return f" (close code {code}{': ' + reason if reason else ''})"


def _lost(exc: ConnectionClosed) -> ConnectError:
    frame = exc.rcvd or exc.sent
    detail = _close_detail(frame.code, frame.reason) if frame is not None else ""
    return ConnectError(f"lost the connection to the server{detail}")


def _refusal_text(to: str, reason: str, max_bytes: int | None = None) -> str:
    if reason == Reason.TOO_LARGE and max_bytes is not None:
        return f"message to {to} refused: too-large (the server accepts at most {max_bytes} bytes)"
    if reason == Reason.OFFLINE:
        return f"message to {to} refused: offline ({to} is not connected and this server stores nothing)"
    return f"message to {to} refused: {reason}"


def refusal(ack: Ack, to: str) -> RefusedError:
    """The error for a refused ack, with its reason."""
    reason = ack.reason or "refused"
    return RefusedError(_refusal_text(to, reason), reason)


# ---------------------------------------------------------------------------
# Reconnection
# ---------------------------------------------------------------------------


class Backoff:
    """Capped exponential backoff with jitter: delay n is uniform in [d/2, d], d = min(cap, first * 2**n)."""

    def __init__(self, first: float = 0.5, cap: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.first = first
        self.cap = cap
        self._rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling: float = min(self.cap, self.first * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return ceiling / 2 + self._rng() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0


class MessageCursor:
    """The last message id seen and the store it came from, so a resumed stream neither repeats nor skips."""

    def __init__(self) -> None:
        self.last_id: int | None = None
        #: The epoch of the server's store that ``last_id`` belongs to (None: an older server).
        self.epoch: str | None = None
        self.resumable = False

    def on_hello(self, hello: Hello) -> bool:
        """Adopt the server's store; True when it says our resume point was from another store (a reset)."""
        self.resumable = Feature.RESUME in hello.features
        self.epoch = hello.epoch
        if not self.resumable:
            self.last_id = None  # ids of a server without resume restart after it does: forget ours
            return False
        if hello.reset:
            self.last_id = 0  # the server replays this store from its beginning: skip nothing of it
        return hello.reset

    def resume_point(self, start: ResumePoint | None) -> ResumePoint | None:
        """Where the next session starts: right after the last message seen, else at ``start``."""
        return ResumePoint(after=self.last_id, epoch=self.epoch) if self.last_id is not None else start

    def is_new(self, message: Message) -> bool:
        if self.resumable and self.last_id is not None and message.id <= self.last_id:
            return False
        self.last_id = message.id
        return True


def store_changed(resumed: ResumePoint | None) -> str:
    """The warning for a hello with ``reset``: our resume point was from another store."""
    after = f" instead of after message {resumed.after}" if resumed is not None and resumed.after else ""
    return ("the server's message store changed (a new, wiped or restored database): "
            f"starting from its beginning{after}")


class SavedCursor(NamedTuple):
    """What a cursor file holds: the last message id handled, and the store (epoch) it came from."""

    last_id: int
    epoch: str | None  # None in files written before epochs, or for a server that announces none

    def resume_point(self) -> ResumePoint:
        return ResumePoint(after=self.last_id, epoch=self.epoch)


class CursorFile:
    """``listen --cursor-file``: the last message id handled and its store's epoch, kept between runs.

    The file holds one line: the decimal id, then a space and the epoch of the server's store
    (``42 5d1c0a3e…``). A file with the id alone (written by an older chatcli) still loads:
    the server then checks the id only. It is replaced atomically (temporary file, then
    ``os.replace``), so a listener killed at any moment leaves the old or the new line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SavedCursor | None:
        """The saved cursor; ``None`` when the file does not exist yet."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                raise UsageError(f"cannot keep a cursor in {str(self.path)!r}: "
                                 "its directory does not exist") from None
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the cursor file {str(self.path)!r}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        last_id, _, epoch = text.partition(" ")
        if not (last_id.isascii() and last_id.isdigit() and (not epoch or is_valid_epoch(epoch))):
            raise UsageError(f"the cursor file {str(self.path)!r} is corrupt: expected a message id, optionally "
                             f"followed by a space and an epoch ({EPOCH_RULE}), found {text[:80]!r}; "
                             "delete it to start from the server's cursor")
        return SavedCursor(int(last_id), epoch or None)

    def save(self, msg_id: int, epoch: str | None) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(f"{msg_id} {epoch}\n" if epoch else f"{msg_id}\n", encoding="ascii")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise ClientError(f"cannot write the cursor file {str(self.path)!r}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------
# The commands' transport halves
# ---------------------------------------------------------------------------


def read_texts(text: str | None, *, lines: bool, stdin: TextIO) -> Iterator[str]:
    """The messages ``send`` should send: the argument, all of stdin, or one per stdin line."""
    if text is not None and text != "-":
        if lines:
            raise UsageError("--lines reads stdin: give no TEXT (or '-')")
        return iter([_non_empty(text)])
    if stdin.isatty():
        raise UsageError("no TEXT given and stdin is a terminal: pass TEXT, or pipe the message in")
    if lines:
        return _stdin_lines(stdin)
    whole = stdin.read()
    return iter([_non_empty(whole[:-1] if whole.endswith("\n") else whole)])


def _non_empty(text: str) -> str:
    text = text[:-1] if text.endswith("\r") else text
    if not text:
        raise UsageError("the message is empty")
    return text


def _stdin_lines(stdin: TextIO) -> Iterator[str]:
    """Each non-empty line, read as it comes (so ``tail -f log | chatcli send --lines`` streams)."""
    sent = 0
    for line in iter(stdin.readline, ""):
        line = line.rstrip("\r\n")
        if line:
            sent += 1
            yield line
    if not sent:
        raise UsageError("stdin held no non-empty line to send")


async def send_messages(settings: ClientSettings, me: str, peer: str, texts: Iterator[str],
                        on_ack: Callable[[Ack], None], new_id: Callable[[], str] = Session.new_id) -> None:
    """Send each text in order; return once every one was accepted, else raise at the first refusal.

    If a session to a storing server drops, reconnect (backoff, for at most ``settings.timeout``
    seconds) and resend the unacknowledged message with the same client id: the server stores
    it once, answering a repeat as a ``duplicate``. A server that stores nothing cannot tell a
    repeat, so a drop there ends with ``ConnectError``.
    """
    check_user_id(peer)
    unacked: list[Send] = []  # sent (or about to be) and not acknowledged yet, in order
    backoff = Backoff()
    can_retry = False  # set once a session to a storing server was open
    lost_at: float | None = None
    while True:
        try:
            async with open_session(settings, me, ResumePoint.live_only()) as session:
                backoff.reset()
                lost_at = None
                can_retry = session.offers(Feature.STORE)
                await _send_all(session, peer, texts, unacked, on_ack, new_id)
                return
        except ConnectError as exc:
            if not can_retry:
                raise
            lost_at = time.monotonic() if lost_at is None else lost_at
            await _wait_to_resend(exc, lost_at, backoff, settings.timeout, len(unacked))


async def _wait_to_resend(exc: ConnectError, lost_at: float, backoff: Backoff, window: float,
                          waiting: int) -> None:
    left = lost_at + window - time.monotonic()
    if left <= 0:
        raise ConnectError(f"{exc}; no reconnection within {window:g} s "
                           f"({waiting} message(s) unacknowledged)") from None
    await asyncio.sleep(min(left, backoff.next_delay()))


async def _send_all(session: Session, peer: str, texts: Iterator[str], unacked: list[Send],
                    on_ack: Callable[[Ack], None], new_id: Callable[[], str]) -> None:
    """Send the unacknowledged message (if any), then the rest of ``texts``, one ack at a time."""
    while True:
        if not unacked:
            text = await asyncio.to_thread(next, texts, None)
            if text is None:
                return
            unacked.append(Send(id=new_id(), to=peer, text=text))
        ack = await session.send_and_wait(unacked[0])
        unacked.pop(0)
        on_ack(ack)
        if not ack.accepted:
            raise refusal(ack, peer)


def _history_answer_to(request_id: str) -> Callable[[ServerFrame], bool]:
    return lambda frame: isinstance(frame, History) and frame.id == request_id


async def fetch_history(settings: ClientSettings, me: str, peer: str, limit: int) -> tuple[Message, ...]:
    """``chatcli history``: the last ``limit`` messages between ``me`` and ``peer``, oldest first."""
    check_user_id(peer)
    async with open_session(settings, me, ResumePoint.live_only()) as session:
        if not session.offers(Feature.HISTORY):
            raise RefusedError(f"{settings.url} keeps no history: it stores no messages (serve --ephemeral)",
                               ErrorCode.UNAVAILABLE)
        return await session.history(peer, limit)


async def fetch_online(settings: ClientSettings, me: str) -> tuple[str, ...]:
    """``chatcli who``: the users online (with a session that receives messages) that ME may see, sorted.

    The asking session itself only asks (``Chatcli-Receive: none``), so ME is listed only
    when another session of ME is open.
    """
    async with open_session(settings, me, ResumePoint.live_only()) as session:
        if not session.offers(Feature.PRESENCE):
            raise RefusedError(f"{settings.url} does not tell who is online (serve --presence off, or an older "
                               "server)",
                               ErrorCode.UNAVAILABLE)
        return await session.who()


@dataclass(frozen=True, slots=True)
class ListenOptions:
    count: int | None = None
    #: Seconds after which listening stops (``--timeout``), or None to listen until interrupted.
    duration: float | None = None
    sender: str | None = None
    reconnect: bool = True
    #: Where the first session starts (``--since``); None = the cursor file, else the server-side cursor.
    start: ResumePoint | None = None
    cursor_file: CursorFile | None = None


async def listen(settings: ClientSettings, me: str, options: ListenOptions,
                 on_message: Callable[[Message], None], notice: Notice) -> None:
    """Hand each incoming message to ``on_message`` until the count, the duration, or the reader is gone.

    ``on_message`` raising ``BrokenPipeError`` means the reader went away: listening ends quietly.
    """
    received = 0

    def take(message: Message) -> bool:
        nonlocal received
        if options.sender is None or message.sender == options.sender:
            on_message(message)
            received += 1
        return options.count is not None and received >= options.count

    saved = options.cursor_file.load() if options.cursor_file is not None else None
    start = options.start or (saved.resume_point() if saved is not None else None)
    try:
        async with asyncio.timeout(options.duration):
            await _listen_forever(settings, me, options, MessageCursor(), start, take, notice)
    except TimeoutError:
        if options.count is not None:
            raise TimedOutError(f"received {received} of {options.count} messages "
                                f"in {options.duration:g} s") from None
    except BrokenPipeError:
        return


async def _listen_forever(settings: ClientSettings, me: str, options: ListenOptions, cursor: MessageCursor,
                          start: ResumePoint | None, take: Callable[[Message], bool], notice: Notice) -> None:
    backoff = Backoff()
    connected_before = False
    while True:
        resume = cursor.resume_point(start)
        try:
            async with open_session(settings, me, resume) as session:
                store_changed_here = cursor.on_hello(session.hello)
                backoff.reset()
                notice(f"{'reconnected' if connected_before else 'listening'} as {me} on {settings.url}")
                if not cursor.resumable and not connected_before and start is not None:
                    notice("this server stores no messages (--ephemeral): nothing to replay or resume")
                if store_changed_here:
                    _restart_cursor(resume, cursor, options.cursor_file, notice)
                connected_before = True
                handled = _handler(session, options, cursor, take)
                async for frame in session.frames():
                    if isinstance(frame, Message) and cursor.is_new(frame) and await handled(frame):
                        return
        except ConnectError as exc:
            if not options.reconnect or isinstance(exc, CertificateError):
                raise
            delay = backoff.next_delay()
            notice(f"{exc}; reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)


def _restart_cursor(resumed: ResumePoint | None, cursor: MessageCursor, cursor_file: CursorFile | None,
                    notice: Notice) -> None:
    """The server's store is not the one our cursor came from: say so, and keep the new starting point."""
    notice(store_changed(resumed))
    if cursor_file is not None:  # so that the next run starts here too, even if nothing arrives now
        cursor_file.save(0, cursor.epoch)


def _handler(session: Session, options: ListenOptions, cursor: MessageCursor,
             take: Callable[[Message], bool]) -> Callable[[Message], Awaitable[bool]]:
    """Print a new message, then record it as handled: in the cursor file, and on the server.

    A ``--from`` listener leaves the server-side cursor alone: it skips other senders'
    messages, which a later unfiltered listener must still get.
    """

    async def handle(message: Message) -> bool:
        done = take(message)  # printed and flushed (or skipped by --from) before it counts as handled
        if options.cursor_file is not None and cursor.resumable:
            options.cursor_file.save(message.id, cursor.epoch)
        if options.sender is None:
            await session.acknowledge(message.id)
        return done

    return handle
