"""The memory engine (``--ephemeral``): ids in process memory, nothing stored.

A message is committed only if its recipient is online at commit time; otherwise it
is refused as ``offline``. There is no backlog, no history, no search, no cursor, no
contacts, no read positions or inbox, and no accounts, and the relay asks ``capabilities``
before using any of those. Replies are checked (``Capability.REPLIES``) against the
conversations of the last ``REPLY_MEMORY`` messages: their two users, never their texts,
so memory stays bounded. The epoch is made at start, so every restart is a new store: a
client's cursor from before is reset, never trusted.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any

from chatcli import protocol as p
from chatcli.errors import StorageError
from chatcli.server.engine.base import (
    Accounts,
    Appended,
    BacklogPage,
    Capability,
    Encoder,
    EngineListener,
    InboxPage,
    NewMessage,
    ReadMarks,
)
from chatcli.server.engine.presence import LocalPresence

__all__ = ["REPLY_MEMORY", "MemoryEngine"]

_NOTHING_STORED = "this server stores no messages (--ephemeral)"
#: Messages whose (sender, recipient) are kept to check replies: about 5 MiB at most (64-character ids),
#: about 2 MiB with ordinary ones.
REPLY_MEMORY = 16384


class MemoryEngine:
    """``Engine`` that keeps nothing: ids count up in this process, offline recipients are refused."""

    name = "ephemeral"
    capabilities: frozenset[Capability] = frozenset({Capability.REPLIES})
    newest_ts = 0.0
    accounts: Accounts | None = None

    def __init__(self) -> None:
        #: This process's memory is the store: a new identity per start.
        self.epoch = secrets.token_hex(16)
        self.presence = LocalPresence()
        self._last_id = 0
        #: id -> (sender, recipient) of the last REPLY_MEMORY messages, oldest first.
        self._conversations: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._listener: EngineListener | None = None  # one process: nothing happens elsewhere

    def attach(self, listener: EngineListener) -> None:
        self._listener = listener

    def highest_id(self) -> int:
        return self._last_id

    def append(self, batch: Sequence[NewMessage], cursors: Mapping[str, int],
               done: Callable[[Appended | StorageError], None]) -> None:
        """Give an id to each message whose recipient is online; the others are ``offline``. At once."""
        online = self.presence.online()
        ids: list[int] = []
        offline: set[int] = set()
        bad_replies: set[int] = set()
        conversations = self._conversations
        for position, message in enumerate(batch):
            if message.reply_to is not None and not self._in_conversation(message):
                ids.append(0)
                bad_replies.add(position)
            elif message.recipient in online:
                self._last_id += 1
                ids.append(self._last_id)
                conversations[self._last_id] = (message.sender, message.recipient)
                if len(conversations) > REPLY_MEMORY:
                    conversations.popitem(last=False)
            else:
                ids.append(0)
                offline.add(position)
        done(Appended(ids, frozenset(), frozenset(offline), frozenset(bad_replies)))

    def _in_conversation(self, message: NewMessage) -> bool:
        pair = self._conversations.get(message.reply_to)  # type: ignore[arg-type]  # not None: checked
        return pair is not None and {*pair} == {message.sender, message.recipient}

    def read_backlog(self, user: str, after: int | None, since_ts: float | None, encode: Encoder,
                     done: Callable[[BacklogPage | StorageError], None]) -> None:
        done(BacklogPage([], after or 0, True))  # nothing is ever kept for anyone

    def read_history(self, user: str, request: p.HistoryRequest, done: Callable[[str | StorageError], None]) -> None:
        done(StorageError(f"{_NOTHING_STORED}: no history"))

    def read_search(self, user: str, request: p.SearchRequest, done: Callable[[str | StorageError], None]) -> None:
        done(StorageError(f"{_NOTHING_STORED}: no search"))

    def contacts_among(self, user: str, candidates: Set[str]) -> set[str]:
        return set()  # no message is kept, so nobody is known to have talked to anybody

    def mark_read(self, marks: ReadMarks, done: Callable[[dict[tuple[str, str], int] | StorageError], None]) -> None:
        done(StorageError(f"{_NOTHING_STORED}: no read positions"))

    def read_inbox(self, user: str, limit: int, done: Callable[[InboxPage | StorageError], None]) -> None:
        done(StorageError(f"{_NOTHING_STORED}: no inbox"))

    def pass_on(self, user: str, frame: str) -> None:
        return None  # one process: the relay told every session there is

    async def prune(self, older_than_ts: float, limit: int) -> int:
        return 0

    async def settle(self) -> None:
        return None  # every call finished before it returned

    def health(self) -> dict[str, Any]:
        return {"mode": self.name, "ok": True}

    def close(self) -> None:
        return None

    def prometheus_lines(self) -> list[str]:
        return []
