"""``chatcli chat``: a prompt_toolkit REPL beside a reconnecting session, over several conversations.

The only module that imports prompt_toolkit. Two tasks share one event loop:
the prompt (``prompt_async`` inside ``patch_stdout``, so lines printed by the
other task appear above the input without disturbing it) and ``ChatClient.run``,
which keeps a session open, sends what was typed, and prints what arrives.

One conversation is on screen at a time (``/open PEER``; none while the chat shows
the inbox). Messages for another conversation are not printed: they are counted as
unread on the status line, newest first as WeeChat's hotlist does, and announced by the
bell, a desktop notification or nothing (``--notify``); ``/next`` opens the one with
unread messages, ``/inbox`` lists them all. The commands are one table, ``COMMANDS``.

Unread counts come from the server's inbox (``Feature.READS``: read positions kept per
user and conversation, shared by every session of the user) plus what arrived since.
Showing a message moves the read position (``read``), which also tells the sender
(``receipt``, unless ``--no-receipts``); our messages the peer has read are shown
again with "✓✓ read". While the user types, the peer is told (``typing``, at most every
``TYPING_SEND_INTERVAL_S``; ``--no-typing`` stops it), and "PEER is typing…" shows
on the status line until their message or ``TYPING_SHOWN_S`` of silence. Ctrl-X Ctrl-E
edits the message in $VISUAL/$EDITOR (prompt_toolkit's own binding).

Replies (issue 13): ``/reply [ID] [TEXT]`` sends a message that answers the conversation's
last message, or message ID (the server checks it is of this conversation), and every
message shown that answers another has a one-line quote of it above (``QUOTE_MEMORY``
messages shown are remembered for that). ``/search TEXT`` lists the open conversation's
messages matching TEXT, newest first.

Our messages wait in ``pending`` until the server acknowledges them; whatever is
pending when a session opens is sent on it, so text typed while offline goes out on
reconnect. A conversation opens with its last ``HISTORY_LINES`` messages; messages
arriving meanwhile wait until they are shown, so the screen stays in order. Each
incoming message handled is confirmed (``received``), and a reconnect resumes right
after the last one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from chatcli.client import render
from chatcli.client.environment import Environment
from chatcli.client.reconnect import Backoff, MessageCursor, ResumePoint, store_changed
from chatcli.client.render import ConnectionState
from chatcli.client.session import ClientSession, open_session
from chatcli.client.settings import ClientSettings
from chatcli.errors import (
    AuthError,
    CertificateError,
    ClientError,
    ConnectError,
    LocalProtocolError,
    RefusedError,
    UsageError,
)
from chatcli.paths import state_dir
from chatcli.protocol import (
    DEFAULT_MAX_TEXT_BYTES,
    HISTORY_MAX_LIMIT,
    MAX_INT,
    USER_ID_RULE,
    Ack,
    Conversation,
    Error,
    Feature,
    History,
    Inbox,
    Message,
    PeerTyping,
    Presence,
    ReadPosition,
    Receipt,
    Search,
    Send,
    ServerFrame,
    Status,
    check_user_id,
    is_valid_user_id,
    text_size,
)

__all__ = ["COMMANDS", "HELP", "HISTORY_LINES", "TYPING_SEND_INTERVAL_S", "TYPING_SHOWN_S", "ChatClient", "Command",
           "chat"]

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.buffer import Buffer
    from prompt_toolkit.completion import Completer
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import History as Recall
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output
    from prompt_toolkit.validation import Validator

HELP: Final = (
    "Enter sends · Alt+Enter (or Esc, Enter) adds a newline · Ctrl-X Ctrl-E edits in $VISUAL/$EDITOR · "
    "Ctrl-D or /quit leaves",
    "//text sends '/text' · messages typed while offline are sent on reconnect",
)
#: Messages of a conversation shown when it opens. In this module "history" is always the
#: conversation kept by the server; the lines typed at the prompt are the "recall".
HISTORY_LINES: Final = 20
#: More are shown when more are unread, up to this many (older pages asked for as needed): beyond it,
#: a notice points at `chatcli history`.
UNREAD_SHOWN_MAX: Final = 500
#: Messages for other conversations kept to show when they open, from a server that keeps no history: the
#: newest, within this many bytes of text (peers can send much; the chat's memory stays bounded).
KEPT_BYTES_MAX: Final = 8 * 1024 * 1024
#: The recall's file in the state directory; its name predates the distinction and is kept, so
#: existing users keep what they typed.
RECALL_FILE: Final = "history"
#: While the user types, the peer is told at most this often (the server passes on one every 2 s at most).
TYPING_SEND_INTERVAL_S: Final = 3.0
#: "PEER is typing…" shows this long after their last typing event (unless their message comes first).
TYPING_SHOWN_S: Final = 6.0
#: Our accepted messages remembered for receipts (the newest ones).
OWN_REMEMBERED: Final = 500
#: A burst of messages for other conversations alerts once: at most one bell or notification this often.
ALERT_INTERVAL_S: Final = 1.0
#: The receipt lines shown at once; earlier messages read with them are summed up in one notice.
RECEIPT_LINES: Final = 3
#: Messages shown (all conversations) remembered for reply quotes and /reply, the newest ones.
QUOTE_MEMORY: Final = 1000
#: Matches /search shows at most.
SEARCH_LINES: Final = 20


@dataclass(frozen=True, slots=True)
class Command:
    """A REPL command: ``/name ARGS``. ``run`` gets the client and the words after the name (with ``raw``,
    the text after the name as typed, newlines and spaces kept: a message); it returns True to leave the chat."""

    name: str
    args: str
    help: str
    run: Callable[[ChatClient, list[str]], Awaitable[bool]]
    raw: bool = False


class ChatClient:
    """The session side of the chat: connection state, conversations, unread counts, what to print."""

    def __init__(self, settings: ClientSettings, me: str, peer: str | None, *, colour: bool,
                 show: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.me = me
        self.peer = peer
        self.colour = colour
        self.show = show
        self.on_change: Callable[[], None] = lambda: None
        self.bell: Callable[[], None] = lambda: None
        self.state = ConnectionState.CONNECTING
        self.retry_at: float | None = None
        self.pending: dict[str, tuple[str, str]] = {}  # client id → (recipient, text), in typing order
        #: Why the chat stopped connecting for good (credentials or certificate refused): exits with it.
        self.fatal_error: ClientError | None = None
        self.peer_online: bool | None = None  # unknown until the server says
        self.peer_hidden = False  # the server does not show us the peer's presence
        self.known_peers: set[str] = set() if peer is None else {peer}
        self._session: ClientSession | None = None
        self._sent: set[str] = set()  # ids sent on the current session
        self.cursor = MessageCursor()
        self._history_ids: set[int] = set()  # shown as history: not shown again when they arrive
        self._history_shown = False  # the conversation on screen opened with its history (once, not per reconnect)
        self._history_request: str | None = None  # while waiting for the answer…
        self._held: list[Message] = []  # …incoming messages wait here
        self._history_pages: tuple[Message, ...] = ()  # the pages so far, when the unread go back further
        self._history_asked = HISTORY_LINES  # the size of the page asked for
        self._history_floor: int | None = None  # the oldest message shown: older ones arriving are not shown
        #: Messages for other conversations, from a server without history: shown when their conversation opens.
        self._kept: deque[Message] = deque()  # oldest first, every conversation
        self._kept_bytes = 0
        self._server_keeps_history = True  # as the last session said
        self.max_text_bytes = DEFAULT_MAX_TEXT_BYTES  # the server's, as its hello said: checked before sending
        # Unread: the server's count and newest id per peer (inbox), plus ids that arrived since.
        self._inbox_base: dict[str, tuple[int, int]] = {}
        self._live_unread: dict[str, set[int]] = {}
        self._read_upto: dict[str, int] = {}  # our read position per peer, as far as we know
        self._peer_read: dict[str, int] = {}  # how far each peer has read (their receipts)
        self._inbox_request: str | None = None
        self._inbox_shown = False  # print the answer (``/inbox``, or the chat opened on the inbox)
        self._typing_until: dict[str, float] = {}
        self._typing_sent_at = float("-inf")
        self._own: dict[int, tuple[str, str, str | None]] = {}  # our accepted messages: id → (to, text, ts)
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected_before = False  # what is said once per chat, not at every reconnect
        self._alerted_at = float("-inf")
        # Replies and search (issue 13): messages shown, by id, for quotes and /reply; the message each
        # pending client id replies to; the next line's reply (/reply without TEXT); the search awaited.
        self._recent: OrderedDict[int, Message] = OrderedDict()
        self._replying: dict[str, int] = {}
        self.reply_next: int | None = None
        self._search_request: str | None = None
        self._search_text = ""

    # -- what the status line shows ---------------------------------------------------------

    def view(self) -> render.StatusView:
        loop = asyncio.get_running_loop()
        retry_in = None if self.retry_at is None else max(0.0, self.retry_at - loop.time())
        typing = self.peer is not None and self._typing_until.get(self.peer, 0.0) > loop.time()
        return render.StatusView(self.state, self.settings.url, self.me, self.peer, retry_in,
                                 tuple(text for _, text in self.pending.values()), self.peer_online,
                                 self.peer_hidden, typing, self.hotlist())

    def unread(self, peer: str) -> int:
        count, newest = self._inbox_base.get(peer, (0, 0))
        return count + sum(1 for msg_id in self._live_unread.get(peer, ()) if msg_id > newest)

    def _newest(self, peer: str) -> int:
        live: set[int] = self._live_unread.get(peer, set())
        return max(self._inbox_base.get(peer, (0, 0))[1], max(live, default=0))

    def hotlist(self) -> tuple[tuple[str, int], ...]:
        """The other conversations with unread messages, the most recent first."""
        peers = set(self._inbox_base) | set(self._live_unread)
        counts = [(self._newest(peer), peer, self.unread(peer)) for peer in peers if peer != self.peer]
        return tuple((peer, count) for _, peer, count in sorted(counts, reverse=True) if count)

    def _set_state(self, state: ConnectionState, retry_at: float | None = None) -> None:
        self.state, self.retry_at = state, retry_at
        if state is not ConnectionState.CONNECTED:
            self.peer_online, self.peer_hidden = None, False  # nobody tells us while we are away
            self._typing_until.clear()
        self.on_change()

    def notice(self, text: str) -> None:
        self.show(render.notice_ansi(text, colour=self.colour))

    # -- the connection ------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled, or until the server refuses our credentials."""
        backoff = Backoff()
        while True:
            resume = self.cursor.resume_point(None)
            try:
                async with open_session(self.settings, self.me, resume) as session:
                    backoff.reset()
                    await self._serve(session, resume)
            except (AuthError, CertificateError) as exc:
                self._session = None
                self.fatal_error = exc
                self._set_state(ConnectionState.AUTH_REFUSED if isinstance(exc, AuthError)
                                else ConnectionState.CERTIFICATE_UNTRUSTED)
                self.notice(f"{exc}; /quit to leave")
                return
            except ConnectError as exc:
                self._session = None
                await self._wait_to_retry(backoff.next_delay(), str(exc))

    async def _serve(self, session: ClientSession, resumed: ResumePoint | None) -> None:
        first, self._connected_before = not self._connected_before, True
        self._session, self._sent = session, set()
        if self.cursor.on_hello(session.hello):
            self._history_ids.clear()  # ids of the old store: the new one's messages with those ids are others
            self.notice(store_changed(resumed))
        self._held, self._history_request, self._inbox_request = [], None, None
        self._set_state(ConnectionState.CONNECTED)
        self._server_keeps_history = session.offers(Feature.HISTORY)
        self.max_text_bytes = session.hello.max_text_bytes
        if first:
            self._say_what_is_missing(session)
        if session.offers(Feature.READS):
            await self._ask_inbox(session, show=self.peer is None and first)
        elif self.peer is None and first:
            self.notice("no conversation open: /open PEER starts one")
        if self.peer is not None:
            await self._enter(session)
        for client_id in list(self.pending):
            await self._send(session, client_id)
        async for frame in session.frames():
            await self._handle(session, frame)

    def _say_what_is_missing(self, session: ClientSession) -> None:
        """A server without some of the chat's features (``--ephemeral``, an older one): say so, once."""
        missing = [what for feature, what in ((Feature.READS, "read positions and the inbox (unread counts cover "
                                                              "this chat only)"),
                                              (Feature.RECEIPTS, "read receipts"), (Feature.TYPING, "typing"))
                   if not session.offers(feature)]
        if missing:
            self.notice(f"this server does not offer {', '.join(missing)}")

    async def _wait_to_retry(self, delay: float, why: str) -> None:
        loop = asyncio.get_running_loop()
        retry_at = loop.time() + delay
        self._set_state(ConnectionState.RECONNECTING, retry_at)
        self.notice(f"{why}; reconnecting in {delay:.1f} s")
        while (left := retry_at - loop.time()) > 0:
            await asyncio.sleep(min(left, 1.0))
            self.on_change()  # the countdown on the status line
        self._set_state(ConnectionState.CONNECTING)

    # -- conversations ---------------------------------------------------------------------------

    async def open_conversation(self, peer: str) -> None:
        """Put the conversation with ``peer`` on screen: its last messages, then what arrives."""
        self.peer, self.peer_online, self.peer_hidden = peer, None, False
        self.reply_next = None  # it named a message of the conversation left
        self.known_peers.add(peer)
        self._history_ids.clear()
        self._history_shown, self._history_floor = False, None
        self.notice(f"conversation with {peer}" + (f" ({n} unread)" if (n := self.unread(peer)) else ""))
        kept = self._take_kept(peer)
        if kept and not self._server_keeps_history:  # else its history shows them
            self.notice(f"{len(kept)} message(s) that came while it was closed")
            for message in kept:
                self._history_ids.add(message.id)
                self._show_message(message)
            self._live_unread.pop(peer, None)
        self.on_change()
        if self._session is not None:
            with suppress(ConnectError):  # the next session enters it
                await self._enter(self._session)

    async def _enter(self, session: ClientSession) -> None:
        assert self.peer is not None
        if session.offers(Feature.READS):  # answered before the history: how far the peer has read
            await self._ask_inbox(session, show=False)
        if session.offers(Feature.PRESENCE):
            await session.watch((self.peer,))  # answered at once with a Presence, then one per change
        if session.offers(Feature.HISTORY) and not self._history_shown:
            self._history_pages, self._history_asked = (), HISTORY_LINES
            self._history_request = await session.request_history(self.peer, HISTORY_LINES)

    async def show_inbox(self) -> None:
        """``/inbox``: the server's list when it keeps one, else the unread counts known here."""
        if self._session is not None and self._session.offers(Feature.READS):
            with suppress(ConnectError):
                await self._ask_inbox(self._session, show=True)
                return
        hotlist = self.hotlist()
        if not hotlist:
            self.notice("no unread messages")
        for peer, count in hotlist:
            self.notice(f"{peer}: {count} unread")

    async def _ask_inbox(self, session: ClientSession, *, show: bool) -> None:
        self._inbox_shown = self._inbox_shown or show
        if self._inbox_request is None:
            self._inbox_request = await session.request_inbox()

    def _take_inbox(self, inbox: Inbox) -> None:
        """The server's counts replace ours; messages that arrived after its newest still count."""
        self._inbox_request = None
        for conversation in inbox.conversations:
            self.known_peers.add(conversation.peer)
            self._read_upto[conversation.peer] = max(conversation.read, self._read_upto.get(conversation.peer, 0))
            if conversation.peer_read is not None:
                self._peer_read[conversation.peer] = max(conversation.peer_read,
                                                         self._peer_read.get(conversation.peer, 0))
            shown = conversation.peer == self.peer  # on screen: read, or about to be
            self._inbox_base[conversation.peer] = (0 if shown else conversation.unread, conversation.last_id)
        if self._inbox_shown:
            self._inbox_shown = False
            self._print_inbox(inbox.conversations)
        self.on_change()

    def _print_inbox(self, conversations: Iterable[Conversation]) -> None:
        lines = [render.inbox_line(c, colour=self.colour) for c in conversations]
        self.notice("inbox: " + (f"{len(lines)} conversation(s); /open PEER or /next" if lines
                                 else "no conversations yet; /open PEER starts one"))
        for line in lines:
            self.show(line)

    def next_unread(self) -> str | None:
        hotlist = self.hotlist()
        return hotlist[0][0] if hotlist else None

    # -- sending -----------------------------------------------------------------------------------

    async def submit(self, text: str, reply_to: int | None = None) -> None:
        """Queue a message to the conversation on screen (a reply to ``reply_to``, or to the message
        /reply chose) and send it now if a session is open."""
        if self.peer is None:
            self.notice("no conversation open: /open PEER first (or /next)")
            return
        client_id = ClientSession.new_id()
        reply_to, self.reply_next = reply_to or self.reply_next, None
        if reply_to is not None:
            self._replying[client_id] = reply_to
        self.pending[client_id] = (self.peer, text)
        self._typing_sent_at = float("-inf")  # a new message: the next keystroke says so again
        self.on_change()
        if self._session is not None:
            await self._send(self._session, client_id)

    async def _send(self, session: ClientSession, client_id: str) -> None:
        if client_id in self._sent or client_id not in self.pending:
            return
        self._sent.add(client_id)
        to, text = self.pending[client_id]
        reply_to = self._replying.get(client_id)
        try:
            if reply_to is not None and not session.offers(Feature.REPLIES):
                raise RefusedError("this server does not support replies", "bad-reply")
            await session.send_frame(Send(id=client_id, to=to, text=text, reply_to=reply_to))
        except RefusedError as exc:  # refused before sending, e.g. too large for this server
            self._resolve(client_id, render.Outcome(Status.REFUSED, exc.reason))
        except LocalProtocolError as exc:  # a frame no server would take: pending, it would stop every session
            self.notice(str(exc))
            self._resolve(client_id, render.Outcome(Status.REFUSED, "bad-frame"))
        except ConnectError:
            pass  # still pending: the next session sends it

    def typed(self, text: str) -> None:
        """The prompt's text changed: tell the peer we are typing, at most every TYPING_SEND_INTERVAL_S."""
        session, peer = self._session, self.peer
        if (not self.settings.typing or session is None or peer is None or not text.strip()
                or text.startswith("/")):
            return
        now = asyncio.get_running_loop().time()
        if now - self._typing_sent_at < TYPING_SEND_INTERVAL_S:
            return
        self._typing_sent_at = now
        self._spawn(session.typing(peer))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            with suppress(ConnectError):
                await work

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what arrives ------------------------------------------------------------------------------

    async def _handle(self, session: ClientSession, frame: ServerFrame) -> None:
        if isinstance(frame, Message):
            if self._history_request is not None:
                self._held.append(frame)
            else:
                await self._show_incoming(session, frame)
        elif isinstance(frame, Ack):
            self._resolve(frame.id, render.Outcome(frame.status, frame.reason, frame.ts), frame.msg_id)
        elif isinstance(frame, Presence) and frame.user == self.peer:
            self.peer_online, self.peer_hidden = frame.online, frame.hidden
            if not frame.online:  # gone: whatever they were typing will not come
                self._typing_until.pop(frame.user, None)
            self.on_change()
        elif isinstance(frame, History) and frame.id == self._history_request:
            await self._take_history(session, frame)
        elif isinstance(frame, Inbox) and frame.id == self._inbox_request:
            self._take_inbox(frame)
        elif isinstance(frame, Search) and frame.id == self._search_request:
            self._show_search(frame)
        else:
            await self._handle_event(session, frame)

    async def _handle_event(self, session: ClientSession, frame: ServerFrame) -> None:
        if isinstance(frame, PeerTyping):
            self._peer_typing(frame.sender)
        elif isinstance(frame, Receipt):
            self._receipt(frame)
        elif isinstance(frame, ReadPosition):
            self._read_elsewhere(session, frame)
        elif isinstance(frame, Error):
            self.notice(f"server error {frame.code}: {frame.message}")
            if self._inbox_request is not None and frame.details.get("id") == self._inbox_request:
                self._inbox_request, self._inbox_shown = None, False
            elif self._search_request is not None and frame.details.get("id") == self._search_request:
                self._search_request = None
            elif self._history_request is not None:  # the only other request that can fail without an ack
                await self._show_history(session, self._history_pages)

    async def _take_history(self, session: ClientSession, page: History) -> None:
        """A page of the conversation, newest first: shown once it reaches back to the first unread message
        (every unread one is shown, in order), or UNREAD_SHOWN_MAX of them."""
        messages = self._history_pages = page.messages + self._history_pages
        read_upto, before = self._read_upto.get(page.peer), page.older_than(self._history_asked)
        all_unread = read_upto is not None and bool(messages) and messages[0].id > read_upto
        if all_unread and before is not None and len(messages) < UNREAD_SHOWN_MAX:
            self._history_asked = min(HISTORY_MAX_LIMIT, UNREAD_SHOWN_MAX - len(messages))
            self._history_request = await session.request_history(page.peer, self._history_asked, before=before)
            return
        await self._show_history(session, messages)
        if all_unread and before is not None:
            self.notice(f"earlier unread messages are not shown: chatcli history {self.me} {page.peer} "
                        f"--before {messages[0].id} has them")

    async def _show_history(self, session: ClientSession, messages: tuple[Message, ...]) -> None:
        self._history_request, self._history_shown, self._history_pages = None, True, ()
        peer = self.peer
        self._history_floor = messages[0].id if messages else None
        if messages and peer is not None:
            self.notice(f"the last {len(messages)} message(s) with {peer}")
            read_upto = self._read_upto.get(peer)
            marked = False
            for message in messages:
                self._history_ids.add(message.id)
                if read_upto is not None and not marked and message.sender == peer and message.id > read_upto:
                    self.notice("unread:")
                    marked = True
                read = message.sender == self.me and message.id <= self._peer_read.get(peer, 0)
                self._show_message(message, read=read)
            await self._mark_read(session, peer, messages[-1].id)
        held, self._held = self._held, []
        for message in held:
            await self._show_incoming(session, message)

    def _conversation_of(self, message: Message) -> str:
        return message.to if message.sender == self.me else message.sender

    async def _show_incoming(self, session: ClientSession, message: Message) -> None:
        """Show a message of the conversation on screen, or count it as unread; confirm it either way:
        the server will not send it to a later session (the read position keeps it unread)."""
        if not self.cursor.is_new(message):
            return
        peer = self._conversation_of(message)
        self.known_peers.add(peer)
        self._typing_until.pop(message.sender, None)
        if peer == self.peer:
            older = self._history_floor is not None and message.id < self._history_floor  # said in a notice
            if message.id not in self._history_ids and not older:
                self._show_message(message)
            await self._mark_read(session, peer, message.id)
        elif message.sender != self.me:  # ours from another session is not unread
            self._live_unread.setdefault(peer, set()).add(message.id)
            if not self._server_keeps_history:
                self._keep(message)
            self._alert(message)
        self.on_change()
        await session.acknowledge(message.id)

    def _keep(self, message: Message) -> None:
        self._kept.append(message)
        self._kept_bytes += text_size(message.text)
        while self._kept_bytes > KEPT_BYTES_MAX:
            self._kept_bytes -= text_size(self._kept.popleft().text)

    def _take_kept(self, peer: str) -> list[Message]:
        """The kept messages of the conversation with ``peer``, in order; the others stay."""
        taken = [m for m in self._kept if self._conversation_of(m) == peer]
        if taken:
            self._kept = deque(m for m in self._kept if self._conversation_of(m) != peer)
            self._kept_bytes -= sum(text_size(m.text) for m in taken)
        return taken

    async def _mark_read(self, session: ClientSession, peer: str, msg_id: int) -> None:
        """Shown on screen: read. The server keeps it for every session of ours and tells the peer."""
        self._inbox_base[peer] = (0, max(msg_id, self._newest(peer)))
        self._live_unread.pop(peer, None)
        if msg_id > self._read_upto.get(peer, 0):
            self._read_upto[peer] = msg_id
            await session.mark_read(peer, msg_id, receipt=self.settings.receipts)

    def _read_elsewhere(self, session: ClientSession, frame: ReadPosition) -> None:
        """Another session of ours read this far: what it showed is no longer unread here."""
        self._read_upto[frame.peer] = max(frame.id, self._read_upto.get(frame.peer, 0))
        if frame.id >= self._newest(frame.peer):
            self._inbox_base[frame.peer] = (0, frame.id)
            self._live_unread.pop(frame.peer, None)
        else:  # only some of it: ask the server for the count
            self._spawn(self._ask_inbox(session, show=False))
        self.on_change()

    def _alert(self, message: Message) -> None:
        """A message for another conversation: the bell, a desktop notification, or nothing."""
        mode, now = self.settings.notify, asyncio.get_running_loop().time()
        if mode == "off" or now - self._alerted_at < ALERT_INTERVAL_S:  # no process per message of a flood
            return
        self._alerted_at = now
        if mode != "desktop" or not _notify_desktop(f"chatcli: {message.sender}", message.text[:200]):
            self.bell()

    def _peer_typing(self, sender: str) -> None:
        loop = asyncio.get_running_loop()
        self._typing_until[sender] = loop.time() + TYPING_SHOWN_S
        loop.call_later(TYPING_SHOWN_S + 0.05, self.on_change)  # redraw once it has expired
        self.on_change()

    def _receipt(self, receipt: Receipt) -> None:
        """The peer read our messages up to ``receipt.id``: show ours on screen again, marked read."""
        self._peer_read[receipt.sender] = max(receipt.id, self._peer_read.get(receipt.sender, 0))
        read = sorted(msg_id for msg_id, (to, _, _) in self._own.items()
                      if to == receipt.sender and msg_id <= receipt.id)
        shown = [self._own.pop(msg_id) for msg_id in read]
        if receipt.sender != self.peer or not shown:
            return
        if len(shown) > RECEIPT_LINES:
            self.notice(f"{receipt.sender} read {len(shown) - RECEIPT_LINES} earlier message(s) of yours")
        for _, text, ts in shown[-RECEIPT_LINES:]:
            self.show(render.receipt_ansi(self.me, text, ts, colour=self.colour))

    def _resolve(self, client_id: str, outcome: render.Outcome, msg_id: int | None = None) -> None:
        entry = self.pending.pop(client_id, None)
        if entry is None:
            return
        to, text = entry
        reply_to = self._replying.pop(client_id, None)
        if reply_to is not None:
            self._show_quote(reply_to)
        self.show(render.own_message_ansi(self.me, text, outcome, colour=self.colour,
                                          to=None if to == self.peer else to))
        if msg_id is not None and outcome.status != Status.REFUSED:
            self._own[msg_id] = (to, text, outcome.ts)
            if len(self._own) > OWN_REMEMBERED:
                del self._own[min(self._own)]
            if outcome.ts:
                self._remember(Message(msg_id, self.me, to, text, outcome.ts, reply_to))
        self.on_change()

    # -- replies and search (issue 13) ---------------------------------------------------------

    def _show_message(self, message: Message, *, read: bool = False) -> None:
        """A message of the conversation, under a one-line quote of the message it replies to."""
        if message.reply_to is not None:
            self._show_quote(message.reply_to)
        self.show(render.message_ansi(message, colour=self.colour, read=read))
        self._remember(message)

    def _show_quote(self, reply_to: int) -> None:
        self.show(render.quote_ansi(self._recent.get(reply_to), reply_to, colour=self.colour))

    def _remember(self, message: Message) -> None:
        self._recent[message.id] = message
        if len(self._recent) > QUOTE_MEMORY:
            self._recent.popitem(last=False)

    def reply_command(self, args: str) -> str | None:
        """``/reply [ID] [TEXT]``: the text to send as a reply now, or None when the next line will be
        the reply (or nothing can be replied to: said in a notice)."""
        first, _, rest = args.strip().partition(" ")
        target: int | None
        if first.isascii() and first.isdigit():
            target, text = int(first), rest.strip()
            if not 0 < target <= MAX_INT:
                self.notice(f"no message #{first}: /reply ID takes a message id shown in the chat")
                return None
        else:  # the last message shown of the conversation on screen
            shown = [msg_id for msg_id, m in self._recent.items() if self._conversation_of(m) == self.peer]
            target, text = max(shown, default=None), args.strip()
        if self.peer is None or target is None:
            self.notice("no conversation open: /open PEER first" if self.peer is None
                        else "nothing to reply to yet: /reply ID names a message")
            return None
        self.reply_next = target
        if not text:
            quoted = self._recent.get(target)
            about = (f"{quoted.sender}: {render.safe_text(quoted.text).splitlines()[0][:60]}"
                     if quoted is not None and quoted.text.strip() else f"message #{target}")
            self.notice(f"replying to {about}; type the reply (/reply again to change it)")
        return text or None

    async def search_command(self, text: str) -> None:
        """``/search TEXT``: the open conversation's messages matching TEXT, newest first."""
        session, text = self._session, text.strip()
        if not text or self.peer is None:
            self.notice("no conversation open: /open PEER first" if self.peer is None
                        else "/search TEXT: give the words to find")
        elif session is None:
            self.notice("not connected: search once the chat is connected again")
        elif not session.offers(Feature.SEARCH):
            self.notice("this server does not offer search (it keeps no messages, or it is older)")
        else:
            self._search_text = text
            with suppress(ConnectError):  # the reconnect says so
                self._search_request = await session.request_search(text[:256], SEARCH_LINES, self.peer)

    def _show_search(self, answer: Search) -> None:
        self._search_request = None
        self.notice(f"{len(answer.messages)} message(s) with {self.peer} matching {self._search_text!r}, newest first"
                    + (" (older matches not shown)" if answer.more else ""))
        for message in answer.messages:
            self.show(render.search_ansi(message, self._search_text, colour=self.colour))


def _notify_desktop(title: str, body: str) -> bool:
    """A desktop notification through notify-send, if this system has it; False where it has none."""
    program = shutil.which("notify-send")
    if program is None:
        return False
    try:
        subprocess.Popen([program, "--app-name=chatcli", title, render.safe_text(body)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------
# The commands: one table, so that a new one is one entry (issue 13 adds /reply and /search)
# ---------------------------------------------------------------------------


async def _help(client: ChatClient, args: list[str]) -> bool:
    for text in HELP:
        client.notice(text)
    for command in COMMANDS.values():
        client.notice(f"/{command.name}{' ' + command.args if command.args else ''}: {command.help}")
    return False


async def _quit(client: ChatClient, args: list[str]) -> bool:
    return True


async def _open(client: ChatClient, args: list[str]) -> bool:
    if len(args) != 1 or not is_valid_user_id(args[0]):
        client.notice("usage: /open PEER" if len(args) != 1 else f"invalid user id {args[0]!r}: use {USER_ID_RULE}")
        return False
    await client.open_conversation(args[0])
    return False


async def _next(client: ChatClient, args: list[str]) -> bool:
    peer = client.next_unread()
    if peer is None:
        client.notice("no unread messages")
    else:
        await client.open_conversation(peer)
    return False


async def _inbox(client: ChatClient, args: list[str]) -> bool:
    await client.show_inbox()
    return False


async def _reply(client: ChatClient, args: list[str]) -> bool:
    text = client.reply_command(args[0] if args else "")
    if text:
        await client.submit(text)
    return False


async def _search(client: ChatClient, args: list[str]) -> bool:
    await client.search_command(args[0] if args else "")
    return False


COMMANDS: Final[dict[str, Command]] = {command.name: command for command in (
    Command("open", "PEER", "switch to the conversation with PEER (Tab completes known peers)", _open),
    Command("next", "", "open the most recent conversation with unread messages", _next),
    Command("inbox", "", "list your conversations with their unread counts", _inbox),
    Command("reply", "[ID] [TEXT]", "answer the last message (or message ID); without TEXT, the next line is the "
            "reply", _reply, raw=True),
    Command("search", "TEXT", "find this conversation's messages matching TEXT, newest first", _search, raw=True),
    Command("help", "", "show this", _help),
    Command("quit", "", "leave (or Ctrl-D)", _quit),
)}


async def run_command(client: ChatClient, line: str) -> bool:
    """Run a ``/command`` line; True to leave."""
    name, *args = line[1:].split()
    command = COMMANDS.get(name)
    if command is None:
        client.notice(f"unknown command {'/' + name!r}: /help lists them")
        return False
    if command.raw:
        args = line[1:].split(maxsplit=1)[1:]
    return await command.run(client, args)


def chat(settings: ClientSettings, me: str, peer: str | None, env: Environment, *, input: Input | None = None,
         output: Output | None = None) -> None:
    """Run the REPL until /quit or Ctrl-D; Ctrl-C ends it as an interruption (exit 130)."""
    check_user_id(me)
    if peer is not None:
        check_user_id(peer)
    if input is None and not env.stdin_isatty:
        raise UsageError("chat needs a terminal; in scripts use 'chatcli send' and 'chatcli listen'")
    interrupted, client = asyncio.run(_chat(settings, me, peer, env, input, output))
    for to, text in client.pending.values():  # on stderr, so that nothing typed is lost without a trace
        env.notice(f"not acknowledged, to {to}: {text}")
    if client.fatal_error is not None:
        raise client.fatal_error
    if interrupted:
        raise KeyboardInterrupt
    if client.pending:
        raise ConnectError(f"{len(client.pending)} message(s) not acknowledged: the server may not have them")


async def _chat(settings: ClientSettings, me: str, peer: str | None, env: Environment, input: Input | None,
                output: Output | None) -> tuple[bool, ChatClient]:
    from prompt_toolkit.patch_stdout import patch_stdout

    colour = output is None and env.colour
    client = ChatClient(settings, me, peer, colour=colour)
    with patch_stdout(raw=True):
        prompt = _prompt_session(client, input, output)
        client.on_change = prompt.app.invalidate
        client.bell = prompt.app.output.bell
        prompt.default_buffer.on_text_changed += lambda buffer: client.typed(buffer.text)
        connection = asyncio.create_task(client.run())
        try:
            interrupted = await _read_loop(prompt, client)
        finally:
            connection.cancel()
            with suppress(asyncio.CancelledError):
                await connection
    return interrupted, client


async def _read_loop(prompt: PromptSession[str], client: ChatClient) -> bool:
    """Read lines until the user leaves; True when that was Ctrl-C."""
    warned = False  # leaving with messages not acknowledged takes a second Ctrl-D or /quit

    def may_leave() -> bool:
        nonlocal warned
        if not client.pending or warned:
            return True
        warned = True
        client.notice(f"{len(client.pending)} message(s) not acknowledged by the server yet: Ctrl-D or /quit "
                      f"again leaves without them (they are printed on leaving)")
        return False

    while True:
        try:
            line = await prompt.prompt_async()
        except EOFError:
            if may_leave():
                return False
            continue
        except KeyboardInterrupt:
            return True
        if line.startswith("/") and not line.startswith("//") and line.strip() != "/":
            try:
                if await run_command(client, line.strip()) and may_leave():
                    return False
            except LocalProtocolError as exc:
                client.notice(str(exc))
        elif line.strip():
            await client.submit(line[1:] if line.startswith("//") else line)


def _prompt_session(client: ChatClient, input: Input | None, output: Output | None) -> PromptSession[str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import ANSI
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: object) -> None:
        event.current_buffer.insert_text("\n")  # type: ignore[attr-defined]

    @bindings.add("c-x", "c-e")
    def _edit(event: Any) -> None:
        event.app.create_background_task(_edit_in_editor(event.current_buffer, client))

    def toolbar() -> ANSI:
        return ANSI(render.status_ansi(client.view(), colour=client.colour))

    return PromptSession(f"{client.me}> ", history=_recall(), bottom_toolbar=toolbar, key_bindings=bindings,
                         multiline=False, input=input, output=output, erase_when_done=False,
                         completer=_completer(client), complete_while_typing=False,
                         validator=_size_limit(client), validate_while_typing=False,
                         enable_suspend=True)  # Ctrl-Z suspends, as in a shell, rather than typing ^Z


def _size_limit(client: ChatClient) -> Validator:
    """A message over the server's size limit is not accepted: the draft stays, to be cut, and is not
    printed whole only to be refused."""
    from prompt_toolkit.validation import ValidationError, Validator

    class SizeLimit(Validator):
        def validate(self, document: Document) -> None:
            size, limit = text_size(document.text), client.max_text_bytes
            if size > limit:
                raise ValidationError(len(document.text), f"{size:,} bytes: this server takes messages of at "
                                                           f"most {limit:,} bytes; nothing sent")

    return SizeLimit()


#: Tried in order after $VISUAL and $EDITOR, as prompt_toolkit does.
_EDITORS: Final = ("/usr/bin/editor", "/usr/bin/nano", "/usr/bin/pico", "/usr/bin/vi", "/usr/bin/emacs")


async def _edit_in_editor(buffer: Buffer, client: ChatClient) -> None:
    """Ctrl-X Ctrl-E: the draft in $VISUAL or $EDITOR; saved, it is sent, as a shell runs an edited command.
    Ours rather than prompt_toolkit's, which printed a traceback and lost the draft for a file not in UTF-8."""
    import tempfile

    from prompt_toolkit.application import run_in_terminal
    from prompt_toolkit.document import Document

    fd, name = tempfile.mkstemp(prefix="chatcli-", suffix=".txt")  # 0600: the draft is nobody else's
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(buffer.text)
        if not await run_in_terminal(lambda: _run_editor(name), in_executor=True):
            return  # the editor failed (vim's :cq): nothing sent, the draft kept
        with open(name, "rb") as file:
            raw = file.read()
    finally:
        os.unlink(name)
    try:
        text = raw.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as exc:
        client.notice(f"the editor saved text that is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                      f"{exc.start}): nothing sent, the draft is kept")
        return
    buffer.document = Document(text, len(text))
    buffer.validate_and_handle()


def _run_editor(path: str) -> bool:
    """Run the user's editor on ``path``; True if it exited 0."""
    import shlex

    for editor in (os.environ.get("VISUAL"), os.environ.get("EDITOR"), *_EDITORS):
        if editor:
            try:
                return subprocess.call([*shlex.split(editor), path]) == 0
            except OSError:  # not there: the next one
                continue
    return False


def _completer(client: ChatClient) -> Completer:
    """Tab completes command names after ``/``, and known peers after ``/open``."""
    from prompt_toolkit.completion import Completer, Completion

    class ChatCompleter(Completer):
        def get_completions(self, document: Document, complete_event: object) -> Iterable[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/") or text.startswith("//"):
                return
            if " " not in text:
                names = sorted(COMMANDS)
                yield from (Completion(f"/{n}", -len(text)) for n in names if f"/{n}".startswith(text))
            elif text.startswith("/open ") and text.count(" ") == 1:
                word = text[len("/open "):]
                yield from (Completion(p, -len(word)) for p in sorted(client.known_peers) if p.startswith(word))

    return ChatCompleter()


def _recall() -> Recall:
    """The lines typed at the prompt, recalled with the arrow keys, kept between chats when the disk allows."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    directory = state_dir()
    path = directory / RECALL_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Every message typed is in it: readable by its owner only, as shells keep their history.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        return InMemoryHistory()  # a read-only home should not stop the chat
    return FileHistory(str(path))
