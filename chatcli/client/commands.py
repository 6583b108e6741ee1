"""The commands' transport halves: ``send``, ``listen``, ``history``, ``who``, ``ask`` and ``search``.

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
import contextlib
import functools
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from chatcli.client.reconnect import Backoff, CursorFile, MessageCursor, ResumePoint, store_changed
from chatcli.client.session import ClientSession, open_session, refusal
from chatcli.client.settings import ClientSettings
from chatcli.errors import CertificateError, ConnectError, RefusedError, TimedOutError
from chatcli.protocol import INBOX_MAX_LIMIT, Ack, ErrorCode, Feature, Inbox, Message, Send, Status, check_user_id

if TYPE_CHECKING:
    from chatcli.client.hooks import HookRunner

__all__ = ["DEFAULT_WINDOW", "NO_READS", "ListenOptions", "Notice", "TextBatches", "ask", "fetch_history",
           "fetch_inbox", "fetch_online", "listen", "search_messages", "send_messages"]

T = TypeVar("T")
#: What ``send`` sends: batches of (input line number, text), in order, as they become available.
TextBatches = AsyncIterator[list[tuple[int, str]]] | Iterable[list[tuple[int, str]]]

#: Where ``listen`` reports connecting, reconnecting and store changes (stderr, in the CLI).
Notice = Callable[[str], None]


#: Messages ``send`` keeps in flight, sent and not acknowledged yet: enough to keep a relay busy,
#: few enough that a refusal stops the stream soon after it happens.
DEFAULT_WINDOW = 256


@dataclass(slots=True)
class _Outgoing:
    """One message of ``send``: its input line, its frame, and the ack once it came."""

    line: int
    frame: Send
    sent_at: float = 0.0
    ack: Ack | None = None
    refused_here: RefusedError | None = None  # refused before sending: its error names the server's limit


class _Window:
    """The messages in flight, in input order. Acks may come out of order (a refusal is answered at
    once, an accepted message after its commit), so they are matched by client id and handed on in
    input order."""

    def __init__(self, size: int, on_ack: Callable[[Ack], None]) -> None:
        self.size = size
        self.on_ack = on_ack
        self.in_order: deque[_Outgoing] = deque()
        self.by_id: dict[str, _Outgoing] = {}
        self.refused: list[_Outgoing] = []
        self.last_sent_line = 0
        self.accepted = 0
        self.acked_at = 0.0  # when the last ack came: a paced stream is still progressing
        self.changed = asyncio.Event()

    @property
    def room(self) -> int:
        return self.size - len(self.in_order)

    def add(self, outgoing: _Outgoing) -> None:
        self.in_order.append(outgoing)
        self.by_id[outgoing.frame.id] = outgoing

    def unacknowledged(self) -> list[_Outgoing]:
        return [o for o in self.in_order if o.ack is None]

    def overdue_in(self, timeout: float) -> float | None:
        """Seconds until the oldest unacknowledged message has waited ``timeout`` (None: nothing is waiting).

        Its wait starts when it was sent, or when the last ack came if that was later: a server pacing
        the stream to its ``--rate`` acks a full window slowly, but keeps acking.
        """
        for outgoing in self.in_order:  # acknowledged ones wait only for those before them
            if outgoing.ack is None:
                return max(outgoing.sent_at, self.acked_at) + timeout - time.monotonic()
        return None

    def acknowledged(self, ack: Ack) -> None:
        outgoing = self.by_id.pop(ack.id, None)
        if outgoing is None:
            return  # not ours, or a second answer to a resend
        outgoing.ack = ack
        self.acked_at = time.monotonic()
        if ack.accepted:
            self.accepted += 1
        else:
            self.refused.append(outgoing)
        in_order = self.in_order
        while in_order and in_order[0].ack is not None:
            self.on_ack(in_order.popleft().ack)  # type: ignore[arg-type]
        self.changed.set()

    def progress(self) -> str:
        """Where a stream that ended early stands, by input line: what a script needs to resume it."""
        waiting = [o.line for o in self.in_order if o.ack is None]
        if not self.last_sent_line:
            return "no line was sent"
        if not waiting:
            return f"every line up to line {self.last_sent_line} was accepted; nothing after it was sent"
        accepted = (f"every line before line {waiting[0]} was accepted" if self.accepted
                    else "no line was accepted")
        span = f"line {waiting[0]}" if len(waiting) == 1 else f"lines {waiting[0]}-{waiting[-1]}"
        return (f"{accepted}; {span} sent but not acknowledged (the server may have stored them); "
                f"nothing after line {self.last_sent_line} was sent")

    def wait_for_change(self) -> Coroutine[Any, Any, Literal[True]]:
        """Something to await until the next ack. The event is cleared now, synchronously, right after
        the caller checked the window: clearing it when the waiting task starts would lose an ack that
        came in between, and with it the last wake-up (a hang)."""
        self.changed.clear()
        return self.changed.wait()


async def send_messages(settings: ClientSettings, me: str, peer: str, texts: TextBatches,
                        on_ack: Callable[[Ack], None], *, window: int = DEFAULT_WINDOW, by_line: bool = False,
                        new_id: Callable[[], str] = ClientSession.new_id, reply_to: int | None = None,
                        on_interrupt: Callable[[str], None] | None = None) -> None:
    """Send each text in order, up to ``window`` unacknowledged at once; return once every one was
    accepted. ``on_ack`` gets the acks in input order.

    A refusal stops the stream: nothing more is read or sent, the messages in flight get their
    acks, and ``RefusedError`` names every refused message (``by_line``: by input line number).
    If a session to a storing server drops, reconnect (backoff, for at most ``settings.timeout``
    seconds) and resend every unacknowledged message with its client id: the server stores each
    once, answering a repeat as a ``duplicate``. A server that stores nothing cannot tell a
    repeat, so a drop there ends with ``ConnectError``. With ``reply_to``, every message replies to
    that message id; a server without the ``replies`` feature is refused before anything is sent (it
    would drop the reference silently). With ``by_line``, a stream that ends early (timed out, server
    lost, or interrupted: then ``on_interrupt`` gets it) says how far it got, by input line.
    """
    check_user_id(peer)
    pending = _Window(window, on_ack)
    source = _Lines(texts)
    if by_line:
        _stop_on_sigterm()  # a supervisor's SIGTERM gets the same account of how far the stream got
    try:
        await _send_stream(settings, me, peer, source, pending, new_id, reply_to)
    except asyncio.CancelledError:
        if by_line and on_interrupt is not None:
            on_interrupt(f"{'terminated' if _terminated else 'interrupted'}: {pending.progress()}")
        if _terminated:  # an interruption, as Ctrl-C
            raise KeyboardInterrupt from None
        raise
    except (TimedOutError, ConnectError) as exc:
        if by_line:
            exc.args = (f"{exc}; {pending.progress()}",)
        raise
    finally:
        source.close()
    if pending.refused:
        raise _refused_lines(pending, peer, by_line=by_line)


async def _send_stream(settings: ClientSettings, me: str, peer: str, source: _Lines, pending: _Window,
                       new_id: Callable[[], str], reply_to: int | None) -> None:
    """Sessions, one after another while a storing server can be reached again, until the stream is sent."""
    backoff = Backoff()
    can_retry = False  # set once a session to a storing server was open
    lost_at: float | None = None
    while True:
        try:
            async with open_session(settings, me, ResumePoint.live_only()) as session:
                backoff.reset()
                lost_at = None
                can_retry = session.offers(Feature.STORE)
                if reply_to is not None:
                    _require(session, Feature.REPLIES, settings.url, "replies")
                await _send_all(session, peer, source, pending, new_id, settings.timeout, reply_to)
                return
        except ConnectError as exc:
            if not can_retry:
                raise
            lost_at = time.monotonic() if lost_at is None else lost_at
            await _wait_to_resend(exc, lost_at, backoff, settings.timeout, len(pending.by_id))


class _Lines:
    """The texts to send, taken as many at a time as the window has room for.

    Never waits for a batch to fill: whatever has arrived goes out at once, so a line piped in by
    ``tail -f`` is sent when it is written. The input is read by a task of its own into a short
    queue, so a session lost while waiting for input loses no line already read.
    """

    #: Batches read ahead of sending: bounds memory when stdin is faster than the server.
    READ_AHEAD = 8

    def __init__(self, batches: TextBatches) -> None:
        self._batches = batches
        self._queue: asyncio.Queue[list[tuple[int, str]] | BaseException | None] = asyncio.Queue(self.READ_AHEAD)
        self._reader: asyncio.Task[None] | None = None
        self._ready: deque[tuple[int, str]] = deque()
        self._ended = False

    async def take(self, most: int) -> list[tuple[int, str]]:
        """Up to ``most`` texts: what is ready, else wait for the next batch; [] at the end."""
        if not self._ready and not self._ended:
            if self._reader is None:
                self._reader = asyncio.create_task(self._read_all())
            batch = await self._queue.get()  # safe to cancel: nothing is lost
            if isinstance(batch, BaseException):
                raise batch
            if batch is None:
                self._ended = True
            else:
                self._ready.extend(batch)
        ready = self._ready
        return [ready.popleft() for _ in range(min(most, len(ready)))]

    async def _read_all(self) -> None:
        batches = self._batches
        try:
            async for batch in (batches if isinstance(batches, AsyncIterator) else _aiter(batches)):
                await self._queue.put(batch)
        except Exception as exc:  # e.g. UsageError: nothing to send; raised where the lines are taken
            await self._queue.put(exc)
            return
        await self._queue.put(None)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


async def _aiter(batches: Iterable[list[tuple[int, str]]]) -> AsyncIterator[list[tuple[int, str]]]:
    for batch in batches:
        yield batch


async def _wait_to_resend(exc: ConnectError, lost_at: float, backoff: Backoff, window: float,
                          waiting: int) -> None:
    left = lost_at + window - time.monotonic()
    if left <= 0:
        raise ConnectError(f"{exc}; no reconnection within {window:g} s "
                           f"({waiting} message(s) unacknowledged)") from None
    await asyncio.sleep(min(left, backoff.next_delay()))


async def _send_all(session: ClientSession, peer: str, source: _Lines, pending: _Window,
                    new_id: Callable[[], str], timeout: float, reply_to: int | None = None) -> None:
    """Resend what is unacknowledged, then stream the rest of the lines, keeping the window full."""
    acks = asyncio.create_task(_take_acks(session, pending))

    async def send(outgoing: _Outgoing) -> None:
        outgoing.sent_at = time.monotonic()
        try:
            await session.send_frame(outgoing.frame)
        except RefusedError as exc:  # refused here (too large for this server): reported as the server's are
            outgoing.refused_here = exc
            pending.acknowledged(Ack(outgoing.frame.id, Status.REFUSED, reason=exc.reason))

    try:
        for outgoing in pending.unacknowledged():
            await send(outgoing)
        while not pending.refused:
            if pending.room <= 0:
                await _wait(pending.wait_for_change, acks, pending, timeout)
                continue
            lines = await _wait(functools.partial(source.take, pending.room), acks, pending, timeout)
            if not lines:
                break
            batch = [_Outgoing(number, Send(id=new_id(), to=peer, text=text, reply_to=reply_to))
                     for number, text in lines]
            for outgoing in batch:  # all in the window first: a drop mid-batch resends the rest
                pending.add(outgoing)
            pending.last_sent_line = batch[-1].line
            for outgoing in batch:
                await send(outgoing)
        while pending.by_id:  # the rest of the acks, refused or not
            await _wait(pending.wait_for_change, acks, pending, timeout)
    finally:
        acks.cancel()


async def _wait(step: Callable[[], Awaitable[T]], acks: asyncio.Task[None], pending: _Window, timeout: float) -> T:
    """Await ``step()``, unless the ack reader ends first (the session was lost: raise its error) or the
    oldest message in flight has waited ``timeout`` seconds for its ack (``TimedOutError``)."""
    task = asyncio.ensure_future(step())
    try:
        while True:
            left = pending.overdue_in(timeout)
            if left is not None and left <= 0:
                raise TimedOutError(f"no acknowledgement from the server within {timeout:g} s")
            done, _ = await asyncio.wait((task, acks), timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if acks in done:
                acks.result()  # raises the ConnectError that ended it
                raise ConnectError("the server closed the session")  # pragma: no cover - never ends quietly
    finally:
        task.cancel()


async def _take_acks(session: ClientSession, pending: _Window) -> None:
    async for frame in session.frames():
        if isinstance(frame, Ack):
            pending.acknowledged(frame)


def _refused_lines(pending: _Window, peer: str, *, by_line: bool) -> RefusedError:
    """One error for every refused message; with ``--lines``, by input line number, and what became of
    the others (lines in flight after the first refusal were sent, and may have been accepted)."""
    refused = pending.refused
    first = refused[0].ack
    assert first is not None
    if not by_line:
        return refused[0].refused_here or refusal(first, peer)
    lines = sorted(refused, key=lambda o: o.line)
    shown = ", ".join(f"line {o.line}: {o.ack.reason if o.ack else 'refused'}" for o in lines[:20])
    more = f" and {len(lines) - 20} more" if len(lines) > 20 else ""
    last, accepted = pending.last_sent_line, pending.accepted
    others = ("no other line was accepted" if not accepted else
              f"the other {accepted} line(s) up to line {last} were accepted")
    return RefusedError(f"{len(lines)} message(s) to {peer} refused ({shown}{more}); {others}; nothing after "
                        f"line {last} was sent", first.reason or "refused")


#: Why a server cannot say what is unread (``Feature.READS`` missing).
NO_READS = "keeps no read positions (serve --ephemeral, or a server older than read positions)"


async def fetch_history(settings: ClientSettings, me: str, peer: str, limit: int, *, before: int | None = None,
                        mark_read: bool = False, notice: Notice | None = None) -> tuple[Message, ...]:
    """``chatcli history``: the last ``limit`` messages between ``me`` and ``peer`` (before message
    ``before``), oldest first.

    Reading history marks nothing read, unless ``mark_read``: then ME's read position with PEER moves to
    the newest message shown (with a receipt to PEER unless the settings opt out of receipts).
    """
    check_user_id(peer)
    async with open_session(settings, me, ResumePoint.live_only()) as session:
        if not session.offers(Feature.HISTORY):
            raise RefusedError(f"{settings.url} keeps no history: it stores no messages (serve --ephemeral)",
                               ErrorCode.UNAVAILABLE)
        messages = await session.history(peer, limit, before)
        if mark_read and messages:
            if session.offers(Feature.READS):
                await session.mark_read(peer, messages[-1].id, receipt=settings.receipts)
            elif notice is not None:
                notice(f"nothing marked read: {settings.url} {NO_READS}")
        return messages


async def fetch_inbox(settings: ClientSettings, me: str, limit: int = 50) -> Inbox:
    """``chatcli inbox``: ME's conversations, the most recent first, with unread counts."""
    async with open_session(settings, me, ResumePoint.live_only()) as session:
        if not session.offers(Feature.READS):
            raise RefusedError(f"{settings.url} {NO_READS}: no inbox", ErrorCode.UNAVAILABLE)
        return await session.inbox(min(limit, INBOX_MAX_LIMIT))


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


def _require(session: ClientSession, feature: Feature, url: str, what: str) -> None:
    if not session.offers(feature):
        raise RefusedError(f"{url} does not support {what} (an older server, or one that cannot keep them): "
                           "upgrade it", ErrorCode.UNAVAILABLE)


async def search_messages(settings: ClientSettings, me: str, text: str, limit: int, peer: str | None = None,
                          since: str | None = None) -> tuple[tuple[Message, ...], bool]:
    """``chatcli search``: ME's messages matching ``text``, newest first; True if older ones were not read."""
    if peer is not None:
        check_user_id(peer)
    async with open_session(settings, me, ResumePoint.live_only()) as session:
        _require(session, Feature.SEARCH, settings.url, "search")
        return await session.search(text, limit, peer, since)


#: ``Chatcli-Since`` of a session that wants no stored messages, only what arrives from now on.
_NOTHING_STORED = ResumePoint(since="9999-12-31T00:00:00Z")


async def ask(settings: ClientSettings, me: str, peer: str, text: str, *, wait: float, any_message: bool,
              notice: Notice) -> Message:
    """``chatcli ask``: send ``text`` to ``peer``, then wait up to ``wait`` seconds for the answer.

    The answer is PEER's first message that replies to ours (``any_message``: PEER's first message
    after ours, a seed app's included). One receiving session asks and waits, starting with no
    backlog: anything that answers ours comes after our ack on it (the server acknowledges a batch's
    messages in id order, and a reply needs our id). After a drop it resends with the same client id
    (a storing server keeps the question once) and, once asked, resumes right after the question, so
    an answer that came meanwhile is not missed. ``TimedOutError`` when none came in time.
    """
    check_user_id(peer)
    question = Send(id=ClientSession.new_id(), to=peer, text=text)
    asked: Ack | None = None
    epoch: str | None = None
    backoff = Backoff()
    resendable = True  # until a server that stores nothing (and so cannot tell a resend) was sent the question
    reached = False
    not_replies = 0  # PEER's messages after the question that do not reply to it

    def not_a_reply(message: Message) -> None:
        nonlocal not_replies
        not_replies += 1
        if not_replies == 1:  # once: why ask goes on waiting
            notice(f"{peer} wrote a message that is not a reply to the question; still waiting for a reply "
                   f"(/reply in the chat, or send --reply-to {asked.msg_id if asked else '?'}; "
                   f"ask --any takes any message)")
    try:
        async with asyncio.timeout(wait):
            while True:
                resume = _NOTHING_STORED if asked is None else ResumePoint(after=asked.msg_id, epoch=epoch)
                try:
                    async with open_session(settings, me, resume) as session:
                        backoff.reset()
                        epoch, reached = session.hello.epoch, True
                        if not any_message and not session.offers(Feature.REPLIES):  # no answer could ever match
                            _require(session, Feature.REPLIES, settings.url, "replies (ask --any still works)")
                        if asked is None:
                            resendable = session.offers(Feature.STORE)
                            asked = await session.send_and_wait(question)
                            if not asked.accepted:
                                raise refusal(asked, peer)
                        return await _answer(session, peer, asked.msg_id or 0, any_message, not_a_reply)
                except ConnectError as exc:
                    if isinstance(exc, CertificateError) or (asked is None and not resendable):
                        raise  # a resend could ask twice: the server would not recognise it
                    delay = backoff.next_delay()
                    notice(f"{exc}; reconnecting in {delay:.1f} s")
                    await asyncio.sleep(delay)
    except TimeoutError:
        if not reached:  # the server was down the whole time: say that, not "no answer"
            raise ConnectError(f"could not connect to {settings.url} in {wait:g} s") from None
        if asked is None:
            raise TimedOutError(f"could not ask {peer} within {wait:g} s") from None
        others = f" ({not_replies} message(s) from {peer} did not reply to the question)" if not_replies else ""
        raise TimedOutError(f"no answer from {peer} within {wait:g} s{others}") from None


async def _answer(session: ClientSession, peer: str, question: int, any_message: bool,
                  not_a_reply: Callable[[Message], None]) -> Message:
    async for frame in session.frames():
        if isinstance(frame, Message) and frame.sender == peer and frame.id > question:
            if any_message or frame.reply_to == question:
                return frame
            not_a_reply(frame)
    raise ConnectError("the server closed the session")  # pragma: no cover - frames() ends by raising


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
    #: Makes what ``on_message`` wrote visible (stdout's flush): called once per batch of messages.
    flush: Callable[[], None] = lambda: None
    #: Move ME's read position with each sender past what was printed (``--mark-read``), sending receipts
    #: unless ``receipts`` is false.
    mark_read: bool = False
    receipts: bool = True
    #: ``listen --exec``: messages go to these hooks, and the cursor moves only past handled ones.
    hooks: HookRunner | None = None
    #: Whether nobody reads what ``on_message`` prints any more (stdout a pipe whose reader exited),
    #: checked every READER_CHECK_S while listening; None never checks.
    reader_gone: Callable[[], bool] | None = None


#: How often an idle ``listen`` checks that its stdout still has a reader.
READER_CHECK_S = 0.5


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
    cursor = MessageCursor()
    progress = _HookProgress(options, cursor)
    if options.hooks is not None:
        options.hooks.on_handled = progress.handled
        _stop_on_sigterm()  # so that running hooks are killed, not left behind
    try:
        async with asyncio.timeout(options.duration):
            await _unless_reader_gone(_listen_forever(settings, me, options, cursor, start, take, notice, progress),
                                      options.reader_gone)
            if options.hooks is not None:  # --count reached: the hooks of those messages finish first
                await options.hooks.drain()
    except TimeoutError:
        if cursor.sessions == 0:  # not "nothing came": nothing could have come
            raise ConnectError(f"could not connect to {settings.url} in {options.duration:g} s") from None
        if options.count is not None:
            hooks = options.hooks
            unhandled = (f"; the hooks of {hooks.unfinished} of them had not succeeded "
                         f"({hooks.failures} failed attempt(s))" if hooks is not None and hooks.unfinished else "")
            raise TimedOutError(f"received {received} of {options.count} messages "
                                f"in {options.duration:g} s{unhandled}") from None
    except BrokenPipeError:
        return
    except asyncio.CancelledError:
        if _terminated:  # SIGTERM: an interruption, as Ctrl-C
            raise KeyboardInterrupt from None
        raise
    finally:
        if options.hooks is not None:
            options.hooks.stop()


async def _unless_reader_gone(listening: Coroutine[Any, Any, None], reader_gone: Callable[[], bool] | None) -> None:
    """Run ``listening``; raise ``BrokenPipeError`` once nobody reads what it prints, so that an idle
    ``listen | head -1`` ends when ``head`` does, not at its next message's write."""
    if reader_gone is None:
        await listening
        return
    task = asyncio.ensure_future(listening)
    try:
        while not reader_gone():
            done, _ = await asyncio.wait((task,), timeout=READER_CHECK_S)
            if done:
                return task.result()  # count reached, or the error that ended it
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    raise BrokenPipeError("nobody reads the output any more")


async def _listen_forever(settings: ClientSettings, me: str, options: ListenOptions, cursor: MessageCursor,
                          start: ResumePoint | None, take: Callable[[Message], bool], notice: Notice,
                          progress: _HookProgress | None = None) -> None:
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
                if options.mark_read and not connected_before and not session.offers(Feature.READS):
                    notice(f"--mark-read: {settings.url} {NO_READS}; nothing is marked read")
                if store_changed_here:
                    if options.hooks is not None:
                        options.hooks.store_changed()
                    _restart_cursor(resume, cursor, options.cursor_file, notice)
                connected_before = True
                if await _take_batches(session, options, cursor, take, progress):
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


async def _take_batches(session: ClientSession, options: ListenOptions, cursor: MessageCursor,
                        take: Callable[[Message], bool], progress: _HookProgress | None = None) -> bool:
    """Hand on each new message; True once ``take`` says it has enough.

    Per batch of messages that arrived together, once ``take`` wrote them all: flush them,
    then record the last as handled, in the cursor file and on the server. A ``--from``
    listener leaves the server-side cursor alone: it skips other senders' messages, which a
    later unfiltered listener must still get.
    """
    if options.hooks is not None and progress is not None:
        return await _take_into_hooks(session, options, cursor, take, options.hooks, progress)
    async for batch in session.frame_batches():
        last_id, done = None, False
        for frame in batch:
            if isinstance(frame, Message) and cursor.is_new(frame):
                last_id, done = frame.id, take(frame)
                if done:
                    break
        if last_id is not None:
            options.flush()  # printed before it counts as handled
            if options.cursor_file is not None and cursor.resumable:
                options.cursor_file.save(last_id, cursor.epoch)
            if options.sender is None:
                await session.acknowledge(last_id)
            if options.mark_read:
                await _mark_read(session, batch, last_id, options)
        if done:
            return True
    return False  # pragma: no cover - frame_batches ends by raising ConnectError


async def _mark_read(session: ClientSession, batch: list[Any], upto: int, options: ListenOptions) -> None:
    """``listen --mark-read``: each sender's conversation read up to the newest of its messages printed."""
    newest: dict[str, int] = {}
    for frame in batch:
        if isinstance(frame, Message) and frame.id <= upto and options.sender in (None, frame.sender):
            newest[frame.sender] = max(frame.id, newest.get(frame.sender, 0))
    for sender, msg_id in newest.items():
        await session.mark_read(sender, msg_id, receipt=options.receipts)

_terminated: list[bool] = []


def _stop_on_sigterm() -> None:
    """SIGTERM cancels listening (ending as an interruption) instead of ending the process where it stands."""
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - always called from a task
        return

    def stop() -> None:
        _terminated.append(True)
        task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)


class _HookProgress:
    """Where ``listen --exec`` records handled messages: the cursor file, and the server-side cursor through
    the session reading now (a confirmation lost with a session only means a repeat, never a skip)."""

    def __init__(self, options: ListenOptions, cursor: MessageCursor) -> None:
        self.options = options
        self.cursor = cursor
        self.session: ClientSession | None = None
        self._confirming: set[asyncio.Task[None]] = set()

    def handled(self, msg_id: int) -> None:
        options = self.options
        if options.cursor_file is not None and self.cursor.resumable:
            options.cursor_file.save(msg_id, self.cursor.epoch)
        if options.sender is None and self.session is not None:  # --from leaves the server's cursor alone
            task = asyncio.ensure_future(_confirm(self.session, msg_id))
            self._confirming.add(task)
            task.add_done_callback(self._confirming.discard)


async def _confirm(session: ClientSession, msg_id: int) -> None:
    with contextlib.suppress(ConnectError):
        await session.acknowledge(msg_id)


async def _take_into_hooks(session: ClientSession, options: ListenOptions, cursor: MessageCursor,
                           take: Callable[[Message], bool], hooks: HookRunner, progress: _HookProgress) -> bool:
    """``listen --exec``: hand each new message to the hooks; the cursor moves as they finish (``progress``).

    ``take`` only counts (``--count``): what is printed is each message whose hook succeeded.
    """
    progress.session = session
    try:
        async for batch in session.frame_batches():
            for frame in batch:
                if isinstance(frame, Message) and cursor.is_new(frame):
                    if options.sender is None or frame.sender == options.sender:
                        await hooks.submit(frame)
                    if take(frame):
                        return True
    finally:
        progress.session = None
    return False  # pragma: no cover - frame_batches ends by raising ConnectError
