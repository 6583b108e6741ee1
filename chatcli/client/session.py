"""One chatcli.v1 client session: connect, handshake, send and await answers, and error translation.

The only client module that imports websockets. Every transport failure leaves
here as a ``chatcli.errors.ClientError`` subclass, so commands never see a
websockets exception:

* the server cannot be reached, or the session drops → ``ConnectError`` (3)
* its TLS certificate is not trusted (wss://)         → ``ConnectError`` (3), naming the cause
* the handshake is refused with 401/403               → ``AuthError`` (4)
* a message is refused (its ack says so)              → ``RefusedError`` (5)
* an ack does not come in time                        → ``TimedOutError`` (6)
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)

from chatcli import __version__
from chatcli.client.connecting import (
    close_detail,
    describe,
    lost_connection,
    new_client_id,
    refusal,
    refusal_text,
    refused_handshake,
    tls_context,
    tls_failure,
    user_url,
)
from chatcli.client.reconnect import ResumePoint
from chatcli.client.settings import ClientSettings
from chatcli.errors import (
    ConnectError,
    RefusedError,
    RemoteProtocolError,
    TimedOutError,
    UnknownFrameType,
    UsageError,
)
from chatcli.protocol import (
    HISTORY_MAX_LIMIT,
    SUBPROTOCOL,
    Ack,
    ClientFrame,
    Error,
    Feature,
    Hello,
    History,
    HistoryRequest,
    Inbox,
    InboxRequest,
    MarkRead,
    Message,
    Received,
    Search,
    SearchRequest,
    Send,
    ServerFrame,
    Typing,
    Watch,
    Who,
    WhoRequest,
    check_text,
    encode,
    parse_server_frame,
)

__all__ = ["ClientSession", "open_session", "refusal", "tls_context", "user_url"]


class ClientSession:
    """An open chatcli.v1 session, after the server's hello."""

    def __init__(self, ws: ClientConnection, hello: Hello, timeout: float) -> None:
        self._ws = ws
        self.hello = hello
        self.timeout = timeout
        #: Frames of a batch that a reader of ``frames()`` stopped in the middle of: the next reader gets them
        #: first (``ask`` takes its ack, and the answer that came in the same read must not be lost).
        self._unread: deque[ServerFrame] = deque()

    @staticmethod
    def new_id() -> str:
        """A client id for a ``send``: unique per run, and kept when a message is resent after a reconnect."""
        return new_client_id()

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
            raise RefusedError(refusal_text(frame.to, reason, self.hello.max_text_bytes), reason)
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
        """The last ``limit`` messages between us and ``peer`` (before message ``before``), oldest first.

        Each answer holds at most HISTORY_MAX_LIMIT messages and the server caps it in bytes: ask
        again for what comes before the oldest message so far, until ``limit`` or the start.
        """
        messages: tuple[Message, ...] = ()
        while len(messages) < limit:
            asked = min(limit - len(messages), HISTORY_MAX_LIMIT)
            request_id = await self.request_history(peer, asked, before)
            reply = await self._answer(_history_answer_to(request_id), "history")
            assert isinstance(reply, History)
            messages = reply.messages + messages
            before = reply.older_than(asked)
            if before is None:
                break
        return messages

    async def request_search(self, text: str, limit: int, peer: str | None = None, since: str | None = None,
                             before: int | None = None) -> str:
        """Ask for our messages matching ``text``; the ``Search`` answer (same id) comes through ``frames()``."""
        request = SearchRequest(id=self.new_id(), text=text, limit=limit, peer=peer, since=since, before=before)
        await self._write(request)
        return request.id

    async def search(self, text: str, limit: int, peer: str | None = None, since: str | None = None,
                     rounds: int = 20) -> tuple[tuple[Message, ...], bool]:
        """Up to ``limit`` of our messages matching ``text``, newest first (feature ``search``), and
        whether older matches may exist that were not read.

        An answer the server cut short (``more``) is followed by another for older messages, for at
        most ``rounds`` answers: a common word in a large store is then left incomplete, not endless.
        """
        messages: tuple[Message, ...] = ()
        before: int | None = None
        for _ in range(rounds):
            request_id = await self.request_search(text, limit - len(messages), peer, since, before)
            reply = await self._answer(_search_answer_to(request_id), "search answer")
            assert isinstance(reply, Search)
            messages += reply.messages
            if not reply.more or len(messages) >= limit:
                return messages, False
            if not reply.messages:  # the server stopped reading before a match: nothing to page back from
                return messages, True
            before = reply.messages[-1].id
        return messages, True

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

    # -- the chat experience (issue 12): each a no-op on a server without its feature --------------

    async def mark_read(self, peer: str, msg_id: int, *, receipt: bool = True) -> None:
        """Tell the server we have read the conversation with ``peer`` up to ``msg_id`` (and ``peer``,
        as a receipt, unless ``receipt`` is false)."""
        if self.offers(Feature.READS) or self.offers(Feature.RECEIPTS):
            await self._write(MarkRead(peer, msg_id, receipt))

    async def typing(self, to: str) -> None:
        """Tell ``to`` we are typing (passed on only if they are online)."""
        if self.offers(Feature.TYPING):
            await self._write(Typing(to))

    async def request_inbox(self, limit: int = 50) -> str:
        """Ask for our conversations; the ``Inbox`` answer (same id) comes through ``frames()``."""
        request = InboxRequest(id=self.new_id(), limit=limit)
        await self._write(request)
        return request.id

    async def inbox(self, limit: int = 50) -> Inbox:
        """Our conversations, the most recent first, with unread counts."""
        request_id = await self.request_inbox(limit)
        reply = await self._answer(lambda r: isinstance(r, Inbox) and r.id == request_id, "inbox")
        assert isinstance(reply, Inbox)
        return reply

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
        """Every frame the server sends, minus types from newer servers; ``ConnectError`` at close. A reader
        that stops (``break``, ``return``) leaves the frames after the one it stopped at to the next reader."""
        async for batch in self.frame_batches():
            self._unread.extend(batch)
            while self._unread:
                yield self._unread.popleft()

    async def frame_batches(self) -> AsyncIterator[list[ServerFrame]]:
        """The frames in batches of what arrived together: the next one, and every one already waiting.

        Lets a reader flush its output and acknowledge once per batch instead of once per message,
        without ever holding a message back while nothing more has arrived.
        """
        if self._unread:  # left by a reader of frames()
            left, self._unread = list(self._unread), deque()
            yield left
        ws = self._ws
        try:
            while True:
                batch = [data := await ws.recv()]
                while _waiting(ws):
                    batch.append(data := await ws.recv())
                frames = []
                for data in batch:
                    try:
                        frames.append(parse_server_frame(data))
                    except UnknownFrameType:
                        continue
                yield frames
        except ConnectionClosedOK:
            pass
        except ConnectionClosed as exc:
            raise _lost(exc) from None
        detail = close_detail(ws.close_code, ws.close_reason)
        raise ConnectError(f"the server closed the session{detail}")


def _waiting(ws: ClientConnection) -> bool:
    """Whether another message has already arrived (websockets queues the frames it has read)."""
    return bool(len(ws.recv_messages.frames))


def _history_answer_to(request_id: str) -> Callable[[ServerFrame], bool]:
    return lambda frame: isinstance(frame, History) and frame.id == request_id


def _search_answer_to(request_id: str) -> Callable[[ServerFrame], bool]:
    return lambda frame: isinstance(frame, Search) and frame.id == request_id


#: How long a session that ran out of time waits for the server's close frame.
CLOSE_TIMEOUT_WHEN_LATE_S: Final = 0.1


@asynccontextmanager
async def open_session(settings: ClientSettings, user: str,
                       resume: ResumePoint | None = None) -> AsyncIterator[ClientSession]:
    """Connect as ``user``, read the hello, yield the session, close it on the way out.

    ``resume`` says where the stored backlog starts (default: after the server-side cursor).
    """
    url = user_url(settings.url, user)
    ws = await _handshake(url, settings, resume.headers() if resume is not None else {})
    try:
        if ws.subprotocol != SUBPROTOCOL:
            raise ConnectError(f"{settings.url} does not speak {SUBPROTOCOL} (is it an old seed server?)")
        hello = await _read_hello(ws, settings)
        yield ClientSession(ws, hello, settings.timeout)
    except (TimeoutError, TimedOutError, asyncio.CancelledError):
        # Out of time (or Ctrl-C): the server may be hung, and --timeout bounds the whole run, so the close
        # handshake gets a moment, not the second a healthy leave may take.
        ws.close_timeout = CLOSE_TIMEOUT_WHEN_LATE_S
        raise
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
        raise refused_handshake(settings, exc.response.status_code, exc.response.body) from None
    except InvalidURI as exc:
        raise UsageError(f"invalid server URL {settings.url!r}: {exc}") from None
    except TimeoutError:
        raise ConnectError(f"cannot connect to {settings.url}: no answer in {settings.timeout:g} s") from None
    except ssl.SSLError as exc:  # before OSError, its base class
        raise tls_failure(settings.url, exc) from None
    except (OSError, WebSocketException) as exc:
        raise ConnectError(f"cannot connect to {settings.url}: {describe(exc)}{_tls_hint(settings, exc)}") from None


def _tls_hint(settings: ClientSettings, exc: BaseException) -> str:
    """A guess at the commonest cause of a garbled handshake: ws:// and wss:// mixed up."""
    if isinstance(exc, ConnectionRefusedError | TimeoutError):
        return ""
    if settings.uses_tls and isinstance(exc, ConnectionResetError):
        return " (is the server serving TLS? a server started without --certfile needs ws://)"
    if not settings.uses_tls and isinstance(exc, InvalidMessage):
        return " (if the server uses TLS, connect to wss://)"
    return ""


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





def _lost(exc: ConnectionClosed) -> ConnectError:
    frame = exc.rcvd or exc.sent
    return lost_connection(frame.code, frame.reason) if frame is not None else lost_connection()
