"""Search on a cluster (``Capability.SEARCH`` of the Redis engine): a bounded scan, newest first.

Redis keeps no text index here (RediSearch is a module that a plain Redis has not), so a search
reads the user's messages back from the newest, in the streams that hold them: the messages the
user received (``{u:ME}:in``, or ``{u:ME}:p:PEER`` for one conversation) and the ones they sent
(``{u:PEER}:p:ME`` per contact). The streams are merged by message id (their entry ids), each read in
pages of ``PAGE`` and only when it holds the newest message not yet looked at; their newest ids come
first from a script that sends no texts (``LAST_IDS``), so a user with many contacts costs one id
each, not a page each.

Bounds, like the SQLite engine's ``SEARCH_MAX_STEPS``: at most ``SCAN_MAX_ENTRIES`` entries and
``SCAN_MAX_BYTES`` of texts read per search (a page may pass the byte bound by one page); a search cut
by them answers ``more``, and the client pages on with ``before``. Words match as SQLite's FTS5
``unicode61 remove_diacritics 2`` tokenizer matches them: letters and digits, case and accents folded,
whole words (not prefixes), every word of the query in any order.
"""

from __future__ import annotations

import functools
import heapq
import re
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple

from chatcli.server.engine.base import StoredMessage

__all__ = ["PAGE", "SCAN_MAX_BYTES", "SCAN_MAX_ENTRIES", "Stream", "query_words", "scan_streams", "text_words"]

#: Entries one search may read at most (20,000 short messages: ~20 ms of Redis, in pages).
SCAN_MAX_ENTRIES: Final = 20_000
#: ... and bytes of text: a search over large messages stops sooner.
SCAN_MAX_BYTES: Final = 8 * 1024 * 1024
#: Entries read from one stream at once.
PAGE: Final = 64

#: A word as FTS5's unicode61 sees one: letters and digits (the underscore separates, as punctuation does).
_WORD: Final = re.compile(r"[^\W_]+")


class Stream(NamedTuple):
    """A stream of a user's messages: its key, and the recipient of every message in it."""

    key: str
    recipient: str


@functools.lru_cache(maxsize=4096)
def _fold(word: str) -> str:
    """``word`` without case or accents (``Café`` -> ``cafe``)."""
    if word.isascii():
        return word.lower()
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c)).casefold()


def text_words(text: str) -> set[str]:
    """The folded words of ``text``."""
    return {_fold(word) for word in _WORD.findall(text)}


def query_words(text: str) -> frozenset[str]:
    """The words a search asks for; empty when ``text`` holds none (then nothing matches)."""
    return frozenset(text_words(text))


#: (message id, recipient, stream entry fields) -> the message.
ToMessage = Callable[[int, str, dict[bytes, bytes]], StoredMessage]
#: (stream key, newest entry id to read, inclusive) -> up to PAGE entries, newest first.
ReadPage = Callable[[str, int], Awaitable[list[Any]]]


async def scan_streams(streams: list[Stream], heads: list[int], words: frozenset[str], limit: int,
                       since_ts: float | None, read_page: ReadPage, to_message: ToMessage
                       ) -> tuple[list[StoredMessage], bool]:
    """The newest ``limit`` messages of ``streams`` whose texts hold every one of ``words``, newest first,
    and whether a bound cut the scan short. ``heads``: each stream's newest id to look at (0: none)."""
    if not words:
        return [], False
    # (-upper bound of the stream's next entry, stream): exact while a page of it is held in ``pages``.
    heap = [(-head, at) for at, head in enumerate(heads) if head > 0]
    heapq.heapify(heap)
    pages: dict[int, deque[Any]] = {}
    ended: set[int] = set()  # streams whose last page came short: nothing older
    found: list[StoredMessage] = []
    entries = size = 0
    while heap:
        upper, at = heapq.heappop(heap)
        page = pages.get(at)
        if not page:
            if entries >= SCAN_MAX_ENTRIES or size >= SCAN_MAX_BYTES:
                return found, True
            page = pages[at] = deque(await read_page(streams[at].key, -upper))
            entries += len(page)
            size += sum(len(fields.get(b"t", b"")) for _, fields in page)
            if len(page) < PAGE:
                ended.add(at)
            if page:
                heapq.heappush(heap, (-_entry_number(page[0][0]), at))
            continue
        entry_id, fields = page.popleft()
        msg_id = _entry_number(entry_id)
        if since_ts is not None and float(fields[b"ts"]) < since_ts:
            continue  # accept times grow with ids: the rest of this stream is older still
        if words <= text_words(fields[b"t"].decode()):
            found.append(to_message(msg_id, streams[at].recipient, fields))
            if len(found) == limit:
                return found, False
        if page:
            heapq.heappush(heap, (-_entry_number(page[0][0]), at))
        elif at not in ended and msg_id > 1:
            heapq.heappush(heap, (-(msg_id - 1), at))
    return found, False


def _entry_number(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])
