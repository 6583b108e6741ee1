"""Backlog pages and history answers, bounded in count and bytes; shared by the engines that store.

Pure reading over a ``MessageLog`` (what a store offers to read): no threads, no
loop. An engine runs these where its reads may wait (the SQLite engine: on the
storage thread). Rows are read one at a time and reading stops once the byte
budget is used, so a page of large messages is never held whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Final, Protocol

from chatcli import protocol as p
from chatcli.errors import ChatcliError
from chatcli.server.engine.base import BacklogPage, Encoder, StoredMessage

__all__ = ["HISTORY_ANSWER_BYTES", "REPLAY_PAGE", "REPLAY_PAGE_BYTES", "MessageLog", "SearchScan", "SearchableLog",
           "message_frame", "read_backlog_page", "read_history_answer", "read_search_answer", "utf8_len"]

log = logging.getLogger("chatcli.server")

#: Stored messages sent to a connecting session per page, so a long backlog never stalls others.
REPLAY_PAGE: Final = 500
#: ... and at most this many bytes of frames per page (one message always fits, even a larger one).
#: A native frame can be 6 times its text (control characters become \u00XX escapes).
REPLAY_PAGE_BYTES: Final = 256 * 1024
#: The most bytes of messages in one history answer; a cut answer says ``"more": true``.
HISTORY_ANSWER_BYTES: Final = 512 * 1024


class MessageLog(Protocol):
    """The reads a storing engine's store offers (``SQLiteStore`` is one)."""

    def cursor(self, user: str) -> int: ...

    def first_id_since(self, since_ts: float) -> int | None: ...

    def iter_messages_to(self, user: str, after_id: int = 0, limit: int = 1000) -> Iterator[StoredMessage]: ...

    def iter_history(self, user: str, peer: str, limit: int = 50,
                     before_id: int | None = None) -> Iterator[StoredMessage]: ...


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8; free for ASCII (``isascii`` is O(1))."""
    return len(text) if text.isascii() else len(text.encode())


def message_frame(stored: StoredMessage) -> p.Message:
    """The chatcli.v1 frame of a stored message; raises ChatcliError for a row that breaks the protocol."""
    return p.Message(stored.id, stored.sender, stored.recipient, stored.text, p.format_ts(stored.ts), stored.reply_to)


def read_backlog_page(store: MessageLog, user: str, encode: Encoder, after: int | None,
                      since_ts: float | None) -> BacklogPage:
    """One page of ``user``'s backlog, at most ``REPLAY_PAGE`` messages and ``REPLAY_PAGE_BYTES``.

    Without a start point the page starts after the user's cursor. A row the encoder rejects
    (e.g. an invalid sender stored by an older, exploitable server) is logged and skipped.
    """
    start = store.cursor(user) if after is None and since_ts is None else after or 0
    if since_ts is not None:
        first = store.first_id_since(since_ts)  # O(log n), no scan of the inbox
        if first is None:
            return BacklogPage([], start, True)
        start = max(start, first - 1)
    frames: list[tuple[int, str]] = []
    size = read = 0
    for message in store.iter_messages_to(user, start, REPLAY_PAGE):
        try:
            frame = encode(message)
        except ChatcliError as exc:
            log.error("skipping stored message %d to %s: %s", message.id, user, exc,
                      extra={"event": "bad-stored-message", "msg_id": message.id})
            frame = ""
        if frame and frames and size + utf8_len(frame) > REPLAY_PAGE_BYTES:
            return BacklogPage(frames, start, False)
        read += 1
        start = message.id
        if frame:
            frames.append((message.id, frame))
            size += utf8_len(frame)
    return BacklogPage(frames, start, read < REPLAY_PAGE)


def read_history_answer(store: MessageLog, user: str, request: p.HistoryRequest) -> str:
    """The encoded answer to ``request``: newest messages first until ``limit`` or ``HISTORY_ANSWER_BYTES``.
    An answer cut by the byte cap says ``more``; one message always fits."""
    messages, more = _bounded_frames(store.iter_history(user, request.peer, request.limit, request.before),
                                     "a history answer")
    messages.reverse()
    return p.encode(p.History(request.id, request.peer, tuple(messages), more=more))


def _bounded_frames(rows: Iterator[StoredMessage], what: str) -> tuple[list[p.Message], bool]:
    """The frames of ``rows`` until ``HISTORY_ANSWER_BYTES`` (one always fits); True if that cut them."""
    messages: list[p.Message] = []
    size = 0
    for stored in rows:
        try:
            message = message_frame(stored)
            cost = utf8_len(p.encode(message))
        except ChatcliError as exc:
            log.error("skipping stored message %d in %s: %s", stored.id, what, exc,
                      extra={"event": "bad-stored-message", "msg_id": stored.id})
            continue
        if messages and size + cost > HISTORY_ANSWER_BYTES:
            return messages, True
        messages.append(message)
        size += cost
    return messages, False


class SearchScan:
    """How a search's reading went: ``cut`` once it stopped at its bound of work (older matches may exist)."""

    __slots__ = ("cut",)

    def __init__(self) -> None:
        self.cut = False


class SearchableLog(Protocol):
    """A store with a text index (``SQLiteStore``): what ``read_search_answer`` reads."""

    def iter_search(self, user: str, text: str, scan: SearchScan, peer: str | None = None,
                    since_ts: float | None = None, before_id: int | None = None,
                    limit: int = 20) -> Iterator[StoredMessage]: ...


def read_search_answer(store: SearchableLog, user: str, request: p.SearchRequest) -> str:
    """The encoded answer to a search: newest first, capped like a history answer (``more`` when the
    bytes or the index reading, not ``limit``, cut it short)."""
    scan = SearchScan()
    since_ts = p.parse_ts(request.since) if request.since is not None else None
    rows = store.iter_search(user, request.text, scan, request.peer, since_ts, request.before, request.limit)
    messages, more = _bounded_frames(rows, "a search answer")
    return p.encode(p.Search(request.id, tuple(messages), more=more or scan.cut))
