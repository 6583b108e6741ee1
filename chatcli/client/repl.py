"""``chatcli chat``: a prompt_toolkit REPL beside a reconnecting session.

The only module that imports prompt_toolkit. Two tasks share one event loop:
the prompt (``prompt_async`` inside ``patch_stdout``, so lines printed by the
other task appear above the input without disturbing it) and ``ChatClient.run``,
which keeps a session open, sends what was typed, and prints what arrives.

Our messages wait in ``pending`` until the server acknowledges them; whatever
is pending when a session opens is sent on it, so text typed while offline
goes out on reconnect. The status line lists them until their ack comes, and
shows whether the peer is online (``watch`` / ``presence``, on servers that offer it).

On a server that keeps messages, the chat opens with the last ``HISTORY_LINES``
messages of the conversation; messages arriving meanwhile wait until they are
shown, so the screen stays in order. Each incoming message shown is confirmed
(``received``), and a reconnect resumes right after the last one.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Final

from chatcli.client import render
from chatcli.client.environment import Environment
from chatcli.client.reconnect import Backoff, MessageCursor, ResumePoint, store_changed
from chatcli.client.render import ConnectionState
from chatcli.client.session import ClientSession, open_session
from chatcli.client.settings import ClientSettings
from chatcli.errors import AuthError, CertificateError, ClientError, ConnectError, RefusedError, UsageError
from chatcli.paths import state_dir
from chatcli.protocol import (
    Ack,
    Error,
    Feature,
    History,
    Message,
    Presence,
    Search,
    Send,
    ServerFrame,
    Status,
    check_user_id,
)

__all__ = ["HELP", "HISTORY_LINES", "ChatClient", "chat"]

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import History as Recall
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output

HELP: Final = (
    "Enter sends · Alt+Enter (or Esc, Enter) adds a newline · Ctrl-D or /quit leaves",
    "/help shows this · //text sends '/text' · messages typed while offline are sent on reconnect",
    "/reply [ID] [TEXT] answers the last message (or message ID); without TEXT, the next line is the reply",
    "/search TEXT finds messages of this conversation, newest first",
)
#: Messages of the conversation remembered for reply quotes and /reply (the newest ones).
QUOTE_MEMORY: Final = 1000
#: Matches /search shows at most.
SEARCH_LINES: Final = 20
#: Messages of the conversation shown when the chat opens. In this module "history" is always the
#: conversation kept by the server; the lines typed at the prompt are the "recall".
HISTORY_LINES: Final = 20
#: The recall's file in the state directory; its name predates the distinction and is kept, so
#: existing users keep what they typed.
RECALL_FILE: Final = "history"


class ChatClient:
    """The session side of the chat: connection state, pending messages, what to print."""

    def __init__(self, settings: ClientSettings, me: str, peer: str, *, colour: bool,
                 show: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.me = me
        self.peer = peer
        self.colour = colour
        self.show = show
        self.on_change: Callable[[], None] = lambda: None
        self.state = ConnectionState.CONNECTING
        self.retry_at: float | None = None
        self.pending: dict[str, str] = {}  # client id → text, in typing order
        #: Why the chat stopped connecting for good (credentials or certificate refused): exits with it.
        self.fatal_error: ClientError | None = None
        self.peer_online: bool | None = None  # unknown until the server says
        self.peer_hidden = False  # the server does not show us the peer's presence
        self._session: ClientSession | None = None
        self._sent: set[str] = set()  # ids sent on the current session
        self.cursor = MessageCursor()
        self._history_ids: set[int] = set()  # shown as history: not shown again when they arrive
        self._history_loaded = False
        self._history_request: str | None = None  # while waiting for the answer…
        self._held: list[Message] = []  # …incoming messages wait here
        # Replies and search (issue 13): the conversation's latest messages by id, for quotes and /reply;
        # the message each pending client id replies to; the next line's reply (/reply without TEXT).
        self._recent: OrderedDict[int, Message] = OrderedDict()
        self._replying: dict[str, int] = {}
        self.reply_next: int | None = None
        self._search_request: str | None = None
        self._search_text = ""

    def view(self) -> render.StatusView:
        retry_in = None
        if self.retry_at is not None:
            retry_in = max(0.0, self.retry_at - asyncio.get_running_loop().time())
        return render.StatusView(self.state, self.settings.url, self.me, self.peer, retry_in,
                                 tuple(self.pending.values()), self.peer_online, self.peer_hidden)

    def _set_state(self, state: ConnectionState, retry_at: float | None = None) -> None:
        self.state, self.retry_at = state, retry_at
        if state is not ConnectionState.CONNECTED:
            self.peer_online, self.peer_hidden = None, False  # nobody tells us while we are away
        self.on_change()

    def notice(self, text: str) -> None:
        self.show(render.notice_ansi(text, colour=self.colour))

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
        self._session, self._sent = session, set()
        if self.cursor.on_hello(session.hello):
            self._history_ids.clear()  # ids of the old store: the new one's messages with those ids are others
            self.notice(store_changed(resumed))
        self._held, self._history_request = [], None
        self._set_state(ConnectionState.CONNECTED)
        if session.offers(Feature.PRESENCE):
            await session.watch((self.peer,))  # answered at once with a Presence, then one per change
        if not self._history_loaded and session.offers(Feature.HISTORY):
            self._history_request = await session.request_history(self.peer, HISTORY_LINES)
        for client_id in list(self.pending):
            await self._send(session, client_id)
        async for frame in session.frames():
            await self._handle(session, frame)

    async def _wait_to_retry(self, delay: float, why: str) -> None:
        loop = asyncio.get_running_loop()
        retry_at = loop.time() + delay
        self._set_state(ConnectionState.RECONNECTING, retry_at)
        self.notice(f"{why}; reconnecting in {delay:.1f} s")
        while (left := retry_at - loop.time()) > 0:
            await asyncio.sleep(min(left, 1.0))
            self.on_change()  # the countdown on the status line
        self._set_state(ConnectionState.CONNECTING)

    async def submit(self, text: str, reply_to: int | None = None) -> None:
        """Queue a message (a reply to ``reply_to``, or to the message /reply chose) and send it now if a
        session is open."""
        client_id = ClientSession.new_id()
        reply_to, self.reply_next = reply_to or self.reply_next, None
        if reply_to is not None:
            self._replying[client_id] = reply_to
        self.pending[client_id] = text
        self.on_change()
        if self._session is not None:
            await self._send(self._session, client_id)

    async def _send(self, session: ClientSession, client_id: str) -> None:
        if client_id in self._sent or client_id not in self.pending:
            return
        self._sent.add(client_id)
        try:
            reply_to = self._replying.get(client_id)
            if reply_to is not None and not session.offers(Feature.REPLIES):
                raise RefusedError("this server does not support replies", "bad-reply")
            await session.send_frame(Send(id=client_id, to=self.peer, text=self.pending[client_id], reply_to=reply_to))
        except RefusedError as exc:  # refused before sending, e.g. too large for this server
            self._resolve(client_id, render.Outcome(Status.REFUSED, exc.reason))
        except ConnectError:
            pass  # still pending: the next session sends it

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
            self.on_change()
        elif isinstance(frame, History) and frame.id == self._history_request:
            await self._show_history(session, frame.messages)
        elif isinstance(frame, Search) and frame.id == self._search_request:
            self._show_search(frame.messages)
        elif isinstance(frame, Error):
            self.notice(f"server error {frame.code}: {frame.message}")
            if self._history_request is not None:  # the only request that can fail without an ack
                await self._show_history(session, ())

    async def _show_history(self, session: ClientSession, messages: tuple[Message, ...]) -> None:
        self._history_request, self._history_loaded = None, True
        if messages:
            self.notice(f"the last {len(messages)} message(s) with {self.peer}")
        for message in messages:
            self._history_ids.add(message.id)
            self._show_message(message)
        held, self._held = self._held, []
        for message in held:
            await self._show_incoming(session, message)

    async def _show_incoming(self, session: ClientSession, message: Message) -> None:
        """Show a message once, then confirm it: the server will not send it to a later session."""
        if not self.cursor.is_new(message):
            return
        if message.id not in self._history_ids:
            self._show_message(message)
        await session.acknowledge(message.id)

    def _resolve(self, client_id: str, outcome: render.Outcome, msg_id: int | None = None) -> None:
        text = self.pending.pop(client_id, None)
        reply_to = self._replying.pop(client_id, None)
        if text is not None:
            if reply_to is not None:
                self._show_quote(reply_to)
            self.show(render.own_message_ansi(self.me, text, outcome, colour=self.colour))
            if msg_id is not None and outcome.ts and outcome.status != Status.REFUSED:
                self._remember(Message(msg_id, self.me, self.peer, text, outcome.ts, reply_to))
            self.on_change()

    # -- replies and search (issue 13) -----------------------------------------------------

    def _show_message(self, message: Message) -> None:
        """A message of the conversation, under a one-line quote of the message it replies to."""
        if message.reply_to is not None:
            self._show_quote(message.reply_to)
        self.show(render.message_ansi(message, colour=self.colour))
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
        else:
            target, text = (max(self._recent) if self._recent else None), args.strip()
        if target is None:
            self.notice("nothing to reply to yet: /reply ID names a message")
            return None
        if text:
            self.reply_next = target
            return text
        self.reply_next = target
        quoted = self._recent.get(target)
        about = f"{quoted.sender}: {render.safe_text(quoted.text).splitlines()[0][:60]}" if quoted and quoted.text \
            else f"message #{target}"
        self.notice(f"replying to {about}; type the reply (/reply again to change it)")
        return None

    async def search_command(self, text: str) -> None:
        """``/search TEXT``: this conversation's messages matching TEXT, newest first."""
        session, text = self._session, text.strip()
        if not text:
            self.notice("/search TEXT: give the words to find")
        elif session is None:
            self.notice("not connected: search once the chat is connected again")
        elif not session.offers(Feature.SEARCH):
            self.notice("this server does not offer search (it keeps no messages, or it is older)")
        else:
            self._search_text = text
            self._search_request = await session.request_search(text[:256], SEARCH_LINES, self.peer)

    def _show_search(self, messages: tuple[Message, ...]) -> None:
        self._search_request = None
        self.notice(f"{len(messages)} message(s) with {self.peer} matching {self._search_text!r}, newest first")
        for message in messages:
            self.show(render.search_ansi(message, self._search_text, colour=self.colour))


def chat(settings: ClientSettings, me: str, peer: str, env: Environment, *, input: Input | None = None,
         output: Output | None = None) -> None:
    """Run the REPL until /quit or Ctrl-D; Ctrl-C ends it as an interruption (exit 130)."""
    check_user_id(me)
    check_user_id(peer)
    if input is None and not env.stdin_isatty:
        raise UsageError("chat needs a terminal; in scripts use 'chatcli send' and 'chatcli listen'")
    interrupted, client = asyncio.run(_chat(settings, me, peer, env, input, output))
    if client.fatal_error is not None:
        raise client.fatal_error
    if interrupted:
        raise KeyboardInterrupt


async def _chat(settings: ClientSettings, me: str, peer: str, env: Environment, input: Input | None,
                output: Output | None) -> tuple[bool, ChatClient]:
    from prompt_toolkit.patch_stdout import patch_stdout

    colour = output is None and env.colour
    client = ChatClient(settings, me, peer, colour=colour)
    with patch_stdout(raw=True):
        prompt = _prompt_session(client, input, output)
        client.on_change = prompt.app.invalidate
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
    while True:
        try:
            line = await prompt.prompt_async()
        except EOFError:
            return False
        except KeyboardInterrupt:
            return True
        if line.strip() == "/quit":
            return False
        if line.strip() == "/help":
            for text in HELP:
                client.notice(text)
        elif line.startswith("/reply") and line[6:7] in ("", " "):
            reply = client.reply_command(line[6:])
            if reply:
                await client.submit(reply)
        elif line.startswith("/search") and line[7:8] in ("", " "):
            await client.search_command(line[7:])
        elif line.startswith("/") and not line.startswith("//"):
            client.notice(f"unknown command {line.split()[0]!r}: /help lists them")
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

    def toolbar() -> ANSI:
        return ANSI(render.status_ansi(client.view(), colour=client.colour))

    return PromptSession(f"{client.me}> ", history=_recall(), bottom_toolbar=toolbar, key_bindings=bindings,
                         multiline=False, input=input, output=output, erase_when_done=False)


def _recall() -> Recall:
    """The lines typed at the prompt, recalled with the arrow keys, kept between chats when the disk allows."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    directory = state_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return InMemoryHistory()  # a read-only home should not stop the chat
    return FileHistory(str(directory / RECALL_FILE))
