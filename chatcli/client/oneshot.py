"""``chatcli send`` of one message, and ``chatcli history``, over a blocking socket (``wire``): no asyncio,
no websockets to import.

The same outcomes as the asyncio ``send_messages`` it stands in for when there is one text:
the ack (``delivered``/``stored``, or a refusal raised as ``RefusedError`` after ``on_ack``
saw it), ``TimedOutError`` when no ack comes within ``--timeout``, and the same wording and
exit status for every failure to connect (``connecting``). A session to a storing server
that drops before the ack is opened again (backoff, within ``--timeout`` of the loss) and the
message resent with its client id, which the server answers as a ``duplicate`` if it had
stored it. ``fetch_history`` pages back like ``ClientSession.history``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from chatcli import __version__
from chatcli.client.connecting import (
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
from chatcli.client.reconnect import Backoff, ResumePoint
from chatcli.client.settings import ClientSettings
from chatcli.client.wire import Closed, HandshakeRefused, InvalidResponse, WebSocket
from chatcli.errors import ConnectError, RefusedError, RemoteProtocolError, TimedOutError, UnknownFrameType
from chatcli.protocol import (
    HISTORY_MAX_LIMIT,
    SUBPROTOCOL,
    Ack,
    Error,
    ErrorCode,
    Feature,
    Hello,
    History,
    HistoryRequest,
    Message,
    Send,
    ServerFrame,
    check_text,
    check_user_id,
    encode,
    parse_server_frame,
)

__all__ = ["fetch_history", "send_one"]


def send_one(settings: ClientSettings, me: str, peer: str, text: str, on_ack: Callable[[Ack], None], *,
             new_id: Callable[[], str] = new_client_id) -> None:
    """Send ``text`` to ``peer`` as ``me`` and return once it was accepted; ``on_ack`` gets its ack."""
    check_user_id(peer)
    frame = Send(id=new_id(), to=peer, text=text)
    backoff = Backoff()
    can_retry = False  # set once a session to a storing server was open
    lost_at: float | None = None
    while True:
        try:
            with _session(settings, me) as (ws, hello):
                backoff.reset()
                can_retry = Feature.STORE in hello.features
                ack = _send_and_wait(ws, hello, frame, settings)
            break
        except ConnectError as exc:
            if not can_retry:
                raise
            lost_at = time.monotonic() if lost_at is None else lost_at
            _wait_to_resend(exc, lost_at, backoff, settings.timeout)
    on_ack(ack)
    if not ack.accepted:
        raise refusal(ack, peer)


def _wait_to_resend(exc: ConnectError, lost_at: float, backoff: Backoff, window: float) -> None:
    left = lost_at + window - time.monotonic()
    if left <= 0:
        raise ConnectError(f"{exc}; no reconnection within {window:g} s (1 message(s) unacknowledged)") from None
    time.sleep(min(left, backoff.next_delay()))


@contextmanager
def _session(settings: ClientSettings, me: str) -> Iterator[tuple[WebSocket, Hello]]:
    """Connect as ``me`` (a send-only session), read the hello; close on the way out (a lost
    connection fails that at once), or just drop the connection of a server that stopped answering."""
    ws = _connect(settings, me)
    try:
        if ws.subprotocol != SUBPROTOCOL:
            raise ConnectError(f"{settings.url} does not speak {SUBPROTOCOL} (is it an old seed server?)")
        yield ws, _read_hello(ws, settings)
    except TimedOutError:
        ws.abort()
        raise
    except BaseException:
        ws.close()
        raise
    ws.close()


def _connect(settings: ClientSettings, me: str) -> WebSocket:
    url = user_url(settings.url, me)
    headers = {"Sec-WebSocket-Protocol": SUBPROTOCOL, "Authorization": f"Bearer {settings.credential}",
               "User-Agent": f"chatcli/{__version__}", **ResumePoint.live_only().headers()}
    tls = tls_context(settings.cafile, settings.insecure) if settings.uses_tls else None
    try:
        return WebSocket.connect(url, headers, time.monotonic() + settings.timeout, tls)
    except HandshakeRefused as exc:
        raise refused_handshake(settings, exc.status, exc.body) from None
    except InvalidResponse as exc:
        hint = "" if settings.uses_tls else " (if the server uses TLS, connect to wss://)"
        raise ConnectError(f"cannot connect to {settings.url}: {exc}{hint}") from None
    except OSError as exc:
        raise _connect_failure(settings, exc) from None


def _connect_failure(settings: ClientSettings, exc: OSError) -> ConnectError:
    if settings.uses_tls:
        import ssl

        if isinstance(exc, ssl.SSLError):
            return tls_failure(settings.url, exc)
    if isinstance(exc, TimeoutError):
        return ConnectError(f"cannot connect to {settings.url}: no answer in {settings.timeout:g} s")
    hint = ""
    if settings.uses_tls and isinstance(exc, ConnectionResetError):
        hint = " (is the server serving TLS? a server started without --certfile needs ws://)"
    return ConnectError(f"cannot connect to {settings.url}: {describe(exc)}{hint}")


def _read_hello(ws: WebSocket, settings: ClientSettings) -> Hello:
    deadline = time.monotonic() + settings.timeout
    try:
        frame = _next_frame(ws, deadline)
    except TimeoutError:
        raise ConnectError(f"{settings.url} sent no hello within {settings.timeout:g} s") from None
    except RemoteProtocolError as exc:
        raise ConnectError(f"{settings.url} broke the protocol: {exc}") from None
    if not isinstance(frame, Hello):
        raise ConnectError(f"{settings.url} sent {type(frame).__name__} before its hello")
    return frame


def _send_and_wait(ws: WebSocket, hello: Hello, frame: Send, settings: ClientSettings) -> Ack:
    """Send ``frame`` and return its ack (accepted or refused); other frames meanwhile are dropped."""
    reason = check_text(frame.text, hello.max_text_bytes)
    if reason is not None:
        raise RefusedError(refusal_text(frame.to, reason, hello.max_text_bytes), reason)
    reply = _ask(ws, settings, frame, lambda r: isinstance(r, Ack) and r.id == frame.id, "acknowledgement")
    assert isinstance(reply, Ack)
    return reply


def fetch_history(settings: ClientSettings, me: str, peer: str, limit: int,
                  before: int | None = None) -> tuple[Message, ...]:
    """``chatcli history``: the last ``limit`` messages between ``me`` and ``peer`` (before message
    ``before``), oldest first.

    Each answer holds at most HISTORY_MAX_LIMIT messages and the server caps it in bytes: ask again for
    what comes before the oldest message so far, until ``limit`` or the conversation's start.
    """
    check_user_id(peer)
    with _session(settings, me) as (ws, hello):
        if Feature.HISTORY not in hello.features:
            raise RefusedError(f"{settings.url} keeps no history: it stores no messages (serve --ephemeral)",
                               ErrorCode.UNAVAILABLE)
        messages: tuple[Message, ...] = ()
        while len(messages) < limit:
            asked = min(limit - len(messages), HISTORY_MAX_LIMIT)
            request = HistoryRequest(id=new_client_id(), peer=peer, limit=asked, before=before)
            reply = _ask(ws, settings, request, _history_answer_to(request.id), "history", error_refuses=True)
            assert isinstance(reply, History)
            messages = reply.messages + messages
            before = reply.older_than(asked)
            if before is None:
                break
        return messages


def _history_answer_to(request_id: str) -> Callable[[ServerFrame], bool]:
    return lambda frame: isinstance(frame, History) and frame.id == request_id


def _ask(ws: WebSocket, settings: ClientSettings, request: Send | HistoryRequest,
         matches: Callable[[ServerFrame], bool], what: str, *, error_refuses: bool = False) -> ServerFrame:
    """Send ``request`` and return the first frame that ``matches``, within ``--timeout``; with
    ``error_refuses``, an ``Error`` meanwhile refuses the request."""
    deadline = time.monotonic() + settings.timeout
    try:
        with _connection_errors():
            ws.send_text(encode(request), deadline)
        while True:
            reply = _next_frame(ws, deadline)
            if matches(reply):
                return reply
            if error_refuses and isinstance(reply, Error):
                raise RefusedError(f"the server refused the request ({reply.code}): {reply.message}", reply.code)
    except TimeoutError:
        raise TimedOutError(f"no {what} from the server within {settings.timeout:g} s") from None


def _next_frame(ws: WebSocket, deadline: float) -> ServerFrame:
    """The next frame of a type this client knows; ``ConnectError`` when the session ends."""
    while True:
        try:
            with _connection_errors():
                data = ws.receive_text(deadline)
            return parse_server_frame(data)
        except UnknownFrameType:
            continue


@contextmanager
def _connection_errors() -> Iterator[None]:
    """The connection's end or breakage as a ``ConnectError``; timeouts pass through."""
    try:
        yield
    except TimeoutError:
        raise
    except Closed as exc:
        if exc.code in (1000, 1001):
            raise ConnectError(f"the server closed the session (close code {exc.code}"
                               f"{': ' + exc.reason if exc.reason else ''})") from None
        raise lost_connection(exc.code, exc.reason or None) from None
    except OSError:
        raise lost_connection() from None
    except (InvalidResponse, UnicodeDecodeError) as exc:
        raise ConnectError(f"the server broke the WebSocket protocol: {exc}") from None
