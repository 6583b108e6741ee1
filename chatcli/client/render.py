"""What the clients show: JSON lines, chat lines and the status line.

Rich is used only here, and imported only by the functions that draw with it,
so ``send`` and ``listen`` (JSON and plain text) start without loading it.
Text from the network goes through ``safe_text`` before it reaches a terminal:
a message cannot move the cursor, retitle the window or clear the screen.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from chatcli.errors import LocalProtocolError
from chatcli.protocol import Ack, Conversation, Message, Status, parse_ts

__all__ = [
    "ConnectionState", "Outcome", "StatusView", "ack_json", "author_colour", "conversation_json", "history_ansi",
    "inbox_line", "message_ansi", "message_json", "notice_ansi", "own_message_ansi", "quote_ansi", "receipt_ansi",
    "safe_text", "search_ansi", "status_ansi", "status_text", "unread_json", "users_json",
]

if TYPE_CHECKING:
    from rich.text import Text

# C0 controls except \t and \n, DEL, C1 controls, and the bidi overrides/isolates
# that can make a line read differently from what it contains.
_UNSAFE: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # ␛ for ESC, ␍ for CR, …
    if code == 0x7F:
        return "\u2421"  # ␡
    return f"<U+{code:04X}>"


def safe_text(text: str) -> str:
    """``text`` with every terminal control character replaced by a visible stand-in."""
    return _UNSAFE.sub(_visible, text)


# ---------------------------------------------------------------------------
# JSON lines (send --json, listen): no Rich
# ---------------------------------------------------------------------------


def message_json(message: Message) -> str:
    """The stable ``listen`` line: ``{"id", "from", "to", "text", "ts", "reply_to"}`` (``reply_to``: null
    unless a reply); JSON escapes every control.

    ``json.dumps`` of that dict, character for character, from a template: ``listen`` writes one
    per message, and the dict and the encoder were a sixth of its CPU. A ``Message`` holds valid
    user ids (``[A-Za-z0-9._@-]``, nothing to escape) and int ids.
    """
    reply_to = "null" if message.reply_to is None else message.reply_to
    return (f'{{"id": {message.id}, "from": "{message.sender}", "to": "{message.to}", '
            f'"text": {_json_string(message.text)}, "ts": {_json_string(message.ts)}, "reply_to": {reply_to}}}')


def _json_string(text: str) -> str:
    """``_dumps(text)``: as it is when nothing in it needs escaping."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return _dumps(text)


# What json.dumps(ensure_ascii=False) leaves raw but a terminal acts on (DEL, C1 controls such as CSI
# U+009B, bidi overrides) or a JavaScript reader splits lines on (U+2028/9): escaped too, so that printing
# a line is safe. Any such character is inside a string: keys and numbers are ASCII.
_JSON_UNSAFE: Final = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _dumps(value: object) -> str:
    """JSON without ASCII escapes for text, but with every control character escaped."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


def ack_json(ack: Ack, to: str) -> str:
    """A ``send --json`` line: the ack's fields, ``to`` added; ``duplicate`` always present.

    ``duplicate: true`` answers a message resent after a reconnect that the server had
    already stored: ``msg_id`` is the original's and nothing was delivered twice.
    """
    fields = ack.to_dict()
    del fields["type"]
    return _dumps({**fields, "duplicate": ack.duplicate, "to": to})


def users_json(users: tuple[str, ...]) -> str:
    """A ``who --json`` line: one JSON array of user ids, sorted as the server sent them."""
    return json.dumps(list(users))


def conversation_json(conversation: Conversation) -> str:
    """An ``inbox --json`` line, a stable schema: ``{"peer", "unread", "read", "last_id", "last_from",
    "last_ts", "preview", "peer_read"}`` (``peer_read`` null when the peer sends no receipts)."""
    return _dumps({**conversation.to_dict(), "peer_read": conversation.peer_read})


def unread_json(total: int) -> str:
    """``inbox --count --json``: ``{"unread": N}``."""
    return json.dumps({"unread": total})


# ---------------------------------------------------------------------------
# The chat screen (Rich)
# ---------------------------------------------------------------------------

_AUTHOR_COLOURS: Final = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan",
                          "bright_magenta")


def _to_ansi(text: Text, colour: bool, width: int = 10_000) -> str:
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    console = Console(file=buffer, force_terminal=colour, no_color=not colour, width=width,
                      color_system="standard" if colour else None, highlight=False, soft_wrap=True)
    console.print(text, end="")
    return buffer.getvalue()


def _clock(ts: str | None, layout: str = "%H:%M") -> str:
    try:
        moment = parse_ts(ts) if ts else time.time()
    except LocalProtocolError:
        moment = time.time()
    return time.strftime(layout, time.localtime(moment))


def author_colour(user: str) -> str:
    """The same colour for the same user in every session."""
    return _AUTHOR_COLOURS[zlib.crc32(user.encode()) % len(_AUTHOR_COLOURS)]


def _chat_line(clock: str, author: str, style: str, text: str) -> Text:
    from rich.text import Text

    line = Text()
    line.append(clock + " ", style="dim")
    line.append(author, style=f"bold {style}")
    line.append(": ")
    # Continuation lines of a multi-line message are indented under the text.
    indent = "\n" + " " * (len(clock) + len(author) + 3)
    line.append(safe_text(text).replace("\n", indent))
    return line


def message_ansi(message: Message, *, colour: bool, read: bool = False) -> str:
    """A message: ``HH:MM author: text``, the author in their colour; ``read``: one of ours the peer has
    read, marked ``✓✓ read``."""
    line = _chat_line(_clock(message.ts), safe_text(message.sender), author_colour(message.sender), message.text)
    if read:
        line.append("  ✓✓ read", style="bold green")
    return _to_ansi(line, colour)


def history_ansi(message: Message, *, colour: bool) -> str:
    """A line of ``chatcli history``: ``YYYY-MM-DD HH:MM author: text`` (a conversation spans days)."""
    return _to_ansi(_chat_line(_clock(message.ts, "%Y-%m-%d %H:%M"), safe_text(message.sender),
                               author_colour(message.sender), message.text), colour)


# -- issue 13: search results and reply quotes --------------------------------------------

_WORD: Final = re.compile(r"\w+")


def search_ansi(message: Message, query: str, *, colour: bool) -> str:
    """A search result: ``YYYY-MM-DD HH:MM from → to: text``, each word of ``query`` highlighted in the text
    (whole words, as the server matched them; a word matched with other accents is not highlighted)."""
    author = f"{safe_text(message.sender)} → {safe_text(message.to)}"
    clock = _clock(message.ts, "%Y-%m-%d %H:%M")
    line = _chat_line(clock, author, author_colour(message.sender), message.text)
    words = _WORD.findall(query)
    if words:
        start = len(clock) + len(author) + 3  # where the text begins in the line
        pattern = re.compile(r"\b(?:" + "|".join(re.escape(word) for word in words) + r")\b", re.IGNORECASE)
        for match in pattern.finditer(line.plain, start):
            line.stylize("bold reverse", match.start(), match.end())
    return _to_ansi(line, colour)


def quote_ansi(quoted: Message | None, reply_to: int, *, colour: bool, width: int = 72) -> str:
    """The line above a reply in the chat: ``  ↪ bob: the first line of the message it answers…``; the id
    alone when that message is not known here."""
    from rich.text import Text

    if quoted is None:
        return _to_ansi(Text(f"  ↪ reply to message #{reply_to}", style="dim"), colour)
    first = safe_text(quoted.text).split("\n", 1)[0]
    room = max(10, width - len(quoted.sender) - 6)
    shown = first if len(first) <= room and "\n" not in quoted.text else first[:room].rstrip() + "…"
    return _to_ansi(Text(f"  ↪ {safe_text(quoted.sender)}: {shown}", style="dim"), colour)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one of our messages."""

    status: str  # a protocol.Status: delivered, stored or refused
    reason: str | None = None
    ts: str | None = None


def own_message_ansi(me: str, text: str, outcome: Outcome, *, colour: bool, to: str | None = None) -> str:
    """Our message once the server answered: ``HH:MM me: text  ✓ delivered`` or ``✗ refused (offline)``;
    ``me → to:`` when it went to another conversation than the one on screen."""
    line = _chat_line(_clock(outcome.ts), me if to is None else f"{me} → {to}", "white", text)
    if outcome.status == Status.REFUSED:
        line.append(f"  ✗ refused ({safe_text(outcome.reason or 'no reason')})", style="bold red")
    else:
        line.append(f"  ✓ {outcome.status}", style="green")
    return _to_ansi(line, colour)


def receipt_ansi(me: str, text: str, ts: str | None, *, colour: bool) -> str:
    """One of our messages once the peer has read it: ``HH:MM me: text  ✓✓ read`` (its first line)."""
    line = _chat_line(_clock(ts), me, "white", text.split("\n", 1)[0])
    line.append("  ✓✓ read", style="bold green")
    return _to_ansi(line, colour)


def inbox_line(conversation: Conversation, *, colour: bool) -> str:
    """A line of ``chatcli inbox`` and ``/inbox``: ``bob  2 unread  YYYY-MM-DD HH:MM  bob: preview``."""
    from rich.text import Text

    line = Text()
    line.append(f"{safe_text(conversation.peer):<16}", style=f"bold {author_colour(conversation.peer)}")
    unread = f"{conversation.unread} unread" if conversation.unread else "read"
    line.append(f" {unread:>10}  ", style="bold yellow" if conversation.unread else "dim")
    line.append(_clock(conversation.last_ts, "%Y-%m-%d %H:%M") + "  ", style="dim")
    preview = safe_text(conversation.preview).replace("\n", " ")
    line.append(f"{safe_text(conversation.last_from)}: {preview}")
    return _to_ansi(line, colour)


def notice_ansi(text: str, *, colour: bool) -> str:
    """A line from chatcli itself (help, errors), set apart from messages."""
    from rich.text import Text

    return _to_ansi(Text("-- " + safe_text(text), style="dim italic"), colour)


class ConnectionState(StrEnum):
    """The chat's connection, as the status line names it; the last two are final (the chat stops connecting)."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    AUTH_REFUSED = "authentication refused"
    CERTIFICATE_UNTRUSTED = "TLS certificate not trusted"


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything the status line shows."""

    state: ConnectionState
    url: str
    me: str
    #: The conversation on screen; None while the chat shows the inbox.
    peer: str | None
    retry_in: float | None = None
    pending: tuple[str, ...] = ()
    #: Whether PEER has a session open; None while unknown (not connected, or no presence on this server).
    peer_online: bool | None = None
    #: The server does not show PEER's presence to ME (``serve --presence contacts``, nothing exchanged yet).
    peer_hidden: bool = False
    #: PEER is typing (a typing event came in the last few seconds).
    peer_typing: bool = False
    #: Unread messages of the other conversations, (peer, count), the most recent first (a hotlist).
    unread: tuple[tuple[str, int], ...] = ()


_STATE_STYLES: Final = {
    ConnectionState.CONNECTING: "bold yellow",
    ConnectionState.CONNECTED: "bold green",
    ConnectionState.RECONNECTING: "bold yellow",
    ConnectionState.AUTH_REFUSED: "bold red",
    ConnectionState.CERTIFICATE_UNTRUSTED: "bold red",
}


def status_text(view: StatusView) -> str:
    """The status line as plain text (tests and non-colour terminals read the same words)."""
    return _status(view).plain


def status_ansi(view: StatusView, *, colour: bool, width: int = 10_000) -> str:
    return _to_ansi(_status(view), colour, width)


def _status(view: StatusView) -> Text:
    from rich.text import Text

    state = str(view.state)
    if view.state is ConnectionState.RECONNECTING and view.retry_in is not None:
        state = f"reconnecting in {max(0, round(view.retry_in))} s"
    line = Text()
    line.append(f"● {state}", style=_STATE_STYLES[view.state])
    line.append(f"  {view.me} → {view.peer or 'inbox'}", style="bold")
    if view.peer is None:
        pass
    elif view.peer_hidden:
        line.append(f"  {view.peer}'s presence hidden until you exchange a message", style="dim")
    elif view.peer_online is not None:
        # Each state has its own style, so a terminal redraw rewrites the whole segment.
        line.append(f"  {view.peer} online" if view.peer_online else f"  {view.peer} offline",
                    style="bold green" if view.peer_online else "dim")
    if view.peer_typing:
        line.append(f"  {view.peer} is typing…", style="italic cyan")
    if view.unread:
        total = sum(count for _, count in view.unread)
        hotlist = ", ".join(f"{safe_text(peer)} {count}" for peer, count in view.unread[:5])
        more = ", …" if len(view.unread) > 5 else ""
        line.append(f"  [{total} unread: {hotlist}{more}]", style="bold yellow")
    if view.pending:
        line.append(f"  {len(view.pending)} pending", style="yellow")
    # The URL last: a narrow terminal cuts the line's end, and the unread counts matter more.
    line.append(f"  {view.url}", style="dim")
    if view.pending:
        for text in view.pending[-3:]:
            first_line = safe_text(text).split("\n", 1)[0]
            line.append(f"\n  … {first_line[:70]}", style="yellow")
    return line

