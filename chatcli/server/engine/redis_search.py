"""Search on a cluster (``Capability.SEARCH`` of the Redis engine): a bounded scan, newest first.

Redis keeps no text index here (RediSearch is a module that a plain Redis has not), so a search
reads the user's messages back from the newest, in the streams that hold them: the messages the
user received (``{u:ME}:in``, or ``{u:ME}:p:PEER`` for one conversation) and the ones they sent
(``{u:PEER}:p:ME`` per contact). The streams are merged by message id (their entry ids), each read a
page at a time (about ``PAGE_BYTES`` of texts, from ``PAGE_MIN`` to ``PAGE_MAX`` entries by the sizes
seen so far) and only when it holds the newest message not yet looked at; their newest ids come
first from a script that sends no texts (``LAST_IDS``), so a user with many contacts costs one id
each, not a page each.

Bounds, like the SQLite engine's ``SEARCH_MAX_STEPS``: at most ``SCAN_MAX_ENTRIES`` entries and
``SCAN_MAX_BYTES`` of texts read per search (a page may pass the byte bound by one page); a search cut
by them answers ``more``, and the client pages on with ``before``. Words match as SQLite's FTS5
``unicode61 remove_diacritics 2`` tokenizer matches them: letters and digits, case and accents folded,
whole words (not prefixes), every word of the query in any order. A text is tokenised only if its
lower-cased form holds every word as a substring: the common rejection costs a ``str.lower``.
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
from chatcli.server.engine.redis_lua import entry_number

__all__ = ["PAGE_BYTES", "PAGE_MAX", "PAGE_MIN", "SCAN_MAX_BYTES", "SCAN_MAX_ENTRIES", "Stream", "matches",
           "query_words", "scan_streams", "text_words"]

#: Entries one search may read at most (20,000 short messages: ~20 ms of Redis, in pages).
SCAN_MAX_ENTRIES: Final = 20_000
#: ... and bytes of text: a search over large messages stops sooner.
SCAN_MAX_BYTES: Final = 8 * 1024 * 1024
#: Texts read from one stream at once, about (a page of large messages is a few entries, of short ones many:
#: 20,000 short messages take ~20 round trips, not 300).
PAGE_BYTES: Final = 256 * 1024
PAGE_MIN: Final = 16
PAGE_MAX: Final = 1024

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


def matches(words: frozenset[str], text: str) -> bool:
    """Whether ``text`` holds every one of ``words`` (folded) as a whole word."""
    if text.isascii():  # most texts: reject on substrings first, at C speed
        lowered = text.lower()
        if not all(word in lowered for word in words):
            return False
    return words <= text_words(text)


#: (message id, recipient, stream entry fields) -> the message.
ToMessage = Callable[[int, str, dict[bytes, bytes]], StoredMessage]
#: (stream, newest entry id to read (inclusive), how many at most) -> entries, newest first, with their texts
#: (an entry without one, a message pruned meanwhile, is passed over).
ReadPage = Callable[[Stream, int, int], Awaitable[list[Any]]]


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
            count = min(PAGE_MAX, max(PAGE_MIN, PAGE_BYTES * entries // size)) if size else PAGE_MIN * 4
            page = pages[at] = deque(await read_page(streams[at], -upper, count))
            entries += len(page)
            size += sum(len(fields.get(b"t", b"")) for _, fields in page)
            if len(page) < count:
                ended.add(at)
            if page:
                heapq.heappush(heap, (-entry_number(page[0][0]), at))
            continue
        floor = -heap[0][0] if heap else 0  # no other stream holds a message newer than this
        recipient = streams[at].recipient
        while page:  # this stream's entries down to the floor, without a heap operation each
            entry_id, fields = page[0]
            msg_id = entry_number(entry_id)
            if msg_id < floor:
                break
            page.popleft()
            if not fields:
                continue
            if since_ts is not None and float(fields[b"ts"]) < since_ts:
                page.clear()  # accept times grow with ids: the rest of this stream is older still
                ended.add(at)
                break
            if matches(words, fields[b"t"].decode()):
                found.append(to_message(msg_id, recipient, fields))
                if len(found) == limit:
                    return found, False
        if page:
            heapq.heappush(heap, (-msg_id, at))
        elif at not in ended and msg_id > 1:
            heapq.heappush(heap, (-(msg_id - 1), at))
    return found, False
