"""The commands' transport halves: ``send``, ``listen``, ``history`` and ``who`` over client sessions.

Each takes resolved settings and callbacks for what to show, and leaves formatting and
exit statuses to ``chatcli.cli``.

Durability (servers announcing ``Feature.STORE`` / ``RESUME`` / ``HISTORY``):
``listen`` (and the chat REPL) reconnect with ``Chatcli-After`` = the last message id
they saw (and ``Chatcli-Epoch`` = the store it came from: a hello with ``reset``
says the store changed, and they start from its beginning instead of skipping)
and confirm handled messages with ``received``; ``send`` resends an
unacknowledged message after a reconnect with the same client id, which the
server answers as a ``duplicate`` if it had already stored it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from chatcli.client.reconnect import Backoff, CursorFile, MessageCursor, ResumePoint, store_changed
from chatcli.client.session import ClientSession, open_session, refusal
from chatcli.client.settings import ClientSettings
from chatcli.errors import CertificateError, ConnectError, RefusedError, TimedOutError
from chatcli.protocol import Ack, ErrorCode, Feature, Message, Send, check_user_id

__all__ = ["ListenOptions", "Notice", "fetch_history", "fetch_online", "listen", "send_messages"]

#: Where ``listen`` reports connecting, reconnecting and store changes (stderr, in the CLI).
Notice = Callable[[str], None]


async def send_messages(settings: ClientSettings, me: str, peer: str, texts: Iterator[str],
                        on_ack: Callable[[Ack], None], new_id: Callable[[], str] = ClientSession.new_id) -> None:
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


async def _send_all(session: ClientSession, peer: str, texts: Iterator[str], unacked: list[Send],
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


def _handler(session: ClientSession, options: ListenOptions, cursor: MessageCursor,
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
