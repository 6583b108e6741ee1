"""The chatcli.v1 client: connect, send and await acks, iterate messages, reconnect.

The only client module that imports websockets. Every transport failure leaves
here as a ``chatcli.errors.ClientError`` subclass, so commands never see a
websockets exception:

* the server cannot be reached, or the session drops → ``ConnectError`` (3)
* the handshake is refused with 401/403               → ``AuthError`` (4)
* a message is refused (its ack says so)              → ``RefusedError`` (5)
* an ack does not come in time                        → ``TimedOutError`` (6)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, TextIO
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from chatcli import __version__
from chatcli.config import ClientSettings
from chatcli.errors import (
    AuthError,
    ConnectError,
    RefusedError,
    RemoteProtocolError,
    TimedOutError,
    UnknownFrameType,
    UsageError,
)
from chatcli.protocol import (
    SUBPROTOCOL,
    Ack,
    Error,
    Hello,
    Message,
    Reason,
    Send,
    ServerFrame,
    check_text,
    check_user_id,
    encode,
    parse_server_frame,
)

#: Announced by servers that resend stored messages after the client's cursor.
#: Only then are message ids comparable across sessions (an in-memory server restarts at 1).
RESUME_FEATURE: Final = "resume"

Notice = Callable[[str], None]


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

    async def send_frame(self, frame: Send) -> None:
        """Send without waiting for the ack (it arrives through ``frames()``)."""
        reason = check_text(frame.text, self.hello.max_text_bytes)
        if reason is not None:
            raise RefusedError(_refusal_text(frame.to, reason, self.hello.max_text_bytes), reason)
        try:
            await self._ws.send(encode(frame))
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def send(self, to: str, text: str) -> Ack:
        """Send one message and return its ack (accepted or refused); messages meanwhile are dropped."""
        frame = Send(id=self.new_id(), to=to, text=text)
        await self.send_frame(frame)
        try:
            async with asyncio.timeout(self.timeout):
                async for reply in self.frames():
                    if isinstance(reply, Ack) and reply.id == frame.id:
                        return reply
                    if isinstance(reply, Error):
                        raise RefusedError(f"the server rejected the message: {reply.message}", reply.code)
        except TimeoutError:
            raise TimedOutError(f"no acknowledgement from the server within {self.timeout:g} s") from None
        raise ConnectError("the server closed the session before acknowledging the message")

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
async def open_session(settings: ClientSettings, user: str) -> AsyncIterator[Session]:
    """Connect as ``user``, read the hello, yield the session, close it on the way out."""
    url = user_url(settings.url, user)
    ws = await _handshake(url, settings)
    try:
        if ws.subprotocol != SUBPROTOCOL:
            raise ConnectError(f"{settings.url} does not speak {SUBPROTOCOL} (is it an old seed server?)")
        hello = await _read_hello(ws, settings)
        yield Session(ws, hello, settings.timeout)
    finally:
        await ws.close()


async def _handshake(url: str, settings: ClientSettings) -> ClientConnection:
    try:
        return await connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {settings.auth_key}"},
            user_agent_header=f"chatcli/{__version__}",
            open_timeout=settings.timeout,
            close_timeout=1.0,  # leaving must stay quick, even from a hung server
            max_size=None,
        )
    except InvalidStatus as exc:
        raise _refused_handshake(settings.url, exc.response.status_code, exc.response.body) from None
    except InvalidURI as exc:
        raise UsageError(f"invalid server URL {settings.url!r}: {exc}") from None
    except TimeoutError:
        raise ConnectError(f"cannot connect to {settings.url}: no answer in {settings.timeout:g} s") from None
    except (OSError, WebSocketException) as exc:
        raise ConnectError(f"cannot connect to {settings.url}: {_describe(exc)}") from None


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


def _refused_handshake(url: str, status: int, body: bytes | bytearray | None) -> Exception:
    detail = bytes(body or b"").decode("utf-8", "replace").strip()[:200]
    if status in (401, 403):
        return AuthError(f"authentication refused by {url} (HTTP {status}): "
                         "check --auth-key, --auth-key-file or CHATCLI_AUTH_KEY")
    if status == 400:
        return UsageError(f"the server refused the user id (HTTP 400){': ' + detail if detail else ''}")
    return ConnectError(f"cannot connect to {url}: HTTP {status}{': ' + detail if detail else ''}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
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
    """The last message id seen, so a resumed stream neither repeats nor skips messages."""

    def __init__(self) -> None:
        self.last_id: int | None = None
        self._comparable = False

    def on_hello(self, hello: Hello) -> None:
        # Ids of a server without resume restart after it does: forget ours.
        self._comparable = RESUME_FEATURE in hello.features
        if not self._comparable:
            self.last_id = None

    def is_new(self, message: Message) -> bool:
        if self._comparable and self.last_id is not None and message.id <= self.last_id:
            return False
        self.last_id = message.id
        return True


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
                        on_ack: Callable[[Ack], None]) -> None:
    """Send each text in order; return once every one was accepted, else raise at the first refusal."""
    check_user_id(peer)
    async with open_session(settings, me) as session:
        while (text := await asyncio.to_thread(next, texts, None)) is not None:
            ack = await session.send(peer, text)
            on_ack(ack)
            if not ack.accepted:
                raise refusal(ack, peer)


@dataclass(frozen=True, slots=True)
class ListenOptions:
    count: int | None = None
    #: Seconds after which listening stops (``--timeout``), or None to listen until interrupted.
    duration: float | None = None
    sender: str | None = None
    reconnect: bool = True


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

    try:
        async with asyncio.timeout(options.duration):
            await _listen_forever(settings, me, options.reconnect, take, notice)
    except TimeoutError:
        if options.count is not None:
            raise TimedOutError(f"received {received} of {options.count} messages "
                                f"in {options.duration:g} s") from None
    except BrokenPipeError:
        return


async def _listen_forever(settings: ClientSettings, me: str, reconnect: bool,
                          take: Callable[[Message], bool], notice: Notice) -> None:
    cursor = MessageCursor()
    backoff = Backoff()
    connected_before = False
    while True:
        try:
            async with open_session(settings, me) as session:
                cursor.on_hello(session.hello)
                backoff.reset()
                notice(f"{'reconnected' if connected_before else 'listening'} as {me} on {settings.url}")
                connected_before = True
                async for frame in session.frames():
                    if isinstance(frame, Message) and cursor.is_new(frame) and take(frame):
                        return
        except ConnectError as exc:
            if not reconnect:
                raise
            delay = backoff.next_delay()
            notice(f"{exc}; reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)
