"""The Engine seam: what the relay needs of storage, routing beyond this process, presence and accounts.

The relay owns what is tied to this process's sockets (the sessions, their replays
and watches, the rate limits); an ``Engine`` owns everything that would be shared
by several server processes: message ids and their commit, each user's backlog and
cursor, history, contacts, who is online, and accounts. One process with SQLite
(``sqlite.py``) or with nothing stored (``memory.py``) implements it today; the Redis engine
(``redis_engine.py``) lets several server processes (nodes) share one store.

Threading: every method is called on the event loop. Work that may wait (a
commit, a page read) is started there and its ``done`` callback comes back on
the loop, in the order the work was started, so a page read after a commit sees
that commit. A result is the value or the ``StorageError`` that prevented it;
callbacks never raise into the engine.

Delivery "wherever the recipient's sessions are": the relay delivers a committed
message to this process's sessions itself. An engine whose messages can also be
committed elsewhere (another node) hands them to the relay through the
``EngineListener`` given to ``attach`` (``messages_committed_elsewhere``), and
presence changes the same way (``presence_changed``). Single-process engines
never call the listener. An engine whose ``highest_id`` cannot be known without waiting
(another node may have just given out a higher one) returns ``p.MAX_INT`` once it has
any message (a client's id is trusted within its epoch) and changes its epoch when it
finds the store lost messages.

What an engine can do is announced in ``capabilities``; the relay asks them
instead of testing which engine it has.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, NamedTuple, Protocol

from chatcli import protocol as p
from chatcli.errors import StorageError

__all__ = [
    "Accounts",
    "Appended",
    "BacklogPage",
    "Capability",
    "ConversationSummary",
    "Encoder",
    "Engine",
    "EngineListener",
    "InboxPage",
    "NewMessage",
    "Presence",
    "ReadMarks",
    "StoredMessage",
]


class NewMessage(NamedTuple):
    """A message accepted by the relay, not committed yet.

    A tuple so that a batch goes to ``executemany`` as it is, with no per-row copy.
    """

    sender: str
    recipient: str
    text: str
    ts: float  # epoch seconds when the server accepted it
    client_id: str | None = None  # the sender's idempotency key, if it gave one
    reply_to: int | None = None  # the message this one answers (Capability.REPLIES), checked by ``append``


class StoredMessage(NamedTuple):
    """A committed message. A NamedTuple, like NewMessage: one is built per message per commit,
    and a tuple costs a third of a frozen dataclass there (measured in benchmarks/storage_bench.py)."""

    id: int  # increasing, never reused within one epoch: a delivery cursor
    sender: str
    recipient: str
    text: str
    ts: float
    client_id: str | None
    reply_to: int | None = None  # the message this one answers, or None


class Appended(NamedTuple):
    """What a commit did with a batch.

    ``ids`` has one id per message, in batch order: for a retried (sender,
    client_id), the ORIGINAL message's id, and its position is in ``duplicates``
    (nothing was stored for it). An engine that stores nothing refuses a message
    whose recipient is not online: its position is in ``offline`` (and its id is 0). A message whose
    ``reply_to`` is not a message of its own conversation is not stored: its position is in
    ``bad_replies`` (and its id is 0).
    Ids, not records: the relay already holds the messages, and building a record
    per message was a measurable cost per commit.
    """

    ids: Sequence[int]
    duplicates: frozenset[int]
    offline: frozenset[int] = frozenset()
    bad_replies: frozenset[int] = frozenset()


class BacklogPage(NamedTuple):
    """One page of a user's backlog: (id, encoded frame) to send, where the next page starts, and
    whether the backlog ended in this page."""

    frames: list[tuple[int, str]]
    after: int
    complete: bool


class Capability(enum.Enum):
    """What an engine can do; the relay asks these instead of testing which engine it has."""

    #: Messages to recipients with no open session are kept for them (acks may say "stored");
    #: a retried client id is answered with the original (idempotency).
    STORE = enum.auto()
    #: Each user's backlog can be read after an id or since a time, and cursors move with ``received``.
    RESUME = enum.auto()
    #: Conversations can be read back (the "history" request).
    HISTORY = enum.auto()
    #: ``contacts_among`` knows who exchanged messages with whom (``--presence contacts``).
    CONTACTS = enum.auto()
    #: Per-user accounts can exist (``accounts`` is not None).
    ACCOUNTS = enum.auto()
    #: Read positions per user and conversation are kept (``mark_read``), and ``read_inbox`` answers.
    READS = enum.auto()
    #: ``append`` checks each message's ``reply_to`` (issue 13): the referenced message must exist and be
    #: between the same two users (either direction), else the message is refused (``bad_replies``).
    REPLIES = enum.auto()
    #: ``read_search`` answers from an index of message texts (issue 13).
    SEARCH = enum.auto()


class ConversationSummary(NamedTuple):
    """One of a user's conversations, for the inbox: how far the user has read it, how many of the peer's
    messages lie beyond that, and the newest message either way."""

    peer: str
    unread: int
    read: int
    last: StoredMessage
    #: How far the peer has read it, if their last read allowed a receipt (else None).
    peer_read: int | None = None


#: Read positions to move at once: (user, peer) -> (message id, whether the peer may learn it).
ReadMarks = Mapping[tuple[str, str], tuple[int, bool]]


class InboxPage(NamedTuple):
    """A user's conversations, the most recent (highest last message id) first; ``more`` when the limit cut
    the list."""

    conversations: list[ConversationSummary]
    more: bool


#: A stored message's frame for one session's wire protocol; raises ChatcliError for a row that breaks it.
Encoder = Callable[[StoredMessage], str]


class Accounts(Protocol):
    """Per-user tokens (``chatcli user add``). Read per handshake, so a change made by another process
    takes effect at once; ``generation`` tells a running server that open sessions may need closing.

    A token's id is what the store keeps of it (its salted hash): equal ids, same token. Every method
    raises StorageError when the accounts cannot be read.
    """

    def verified_token_id(self, name: str, token: str) -> bytes | None:
        """The id of ``name``'s current token if ``token`` is it, else None: what a session proved."""
        ...

    def current_token_ids(self, names: Iterable[str]) -> dict[str, bytes]:
        """The id of each named user's current token, in as few reads as the store allows; names without
        an account are left out."""
        ...

    def generation(self) -> int:
        """A number that changes whenever an account is added, rotated or removed, by any process (it may
        change at other times too): one cheap read, polled by the server."""
        ...

    def any_accounts(self) -> bool:
        """Whether at least one account exists (tokens are then required); raises StorageError."""
        ...


class Presence(Protocol):
    """Who is online: users with at least one receiving session (on this node, or, for a multi-node
    engine, on any node). The relay reports its own sessions; the engine answers for everyone."""

    def joined(self, user: str) -> None:
        """``user``'s first receiving session on this node opened."""
        ...

    def left(self, user: str) -> None:
        """``user``'s last receiving session on this node closed."""
        ...

    def is_online(self, user: str) -> bool: ...

    def online(self) -> Set[str]:
        """Every online user; a set view, so membership tests stay O(1) with many online."""
        ...


class EngineListener(Protocol):
    """How an engine hands the relay what happened elsewhere (implemented by ``Relay``)."""

    def messages_committed_elsewhere(self, user: str, messages: Sequence[StoredMessage]) -> None:
        """Messages committed by another node for ``user``, in order, for this node's sessions of theirs (a
        run at a time, as they arrive together: the relay's work per message is then a loop step, not a call)."""
        ...

    def presence_changed(self, user: str, online: bool) -> None:
        """``user`` came online or went offline on another node."""
        ...

    def store_reset(self) -> None:
        """The shared store was wiped or replaced (a new ``epoch``): sessions must start again from it."""
        ...

    def live_event(self, user: str, frame: str) -> None:
        """A live event (an encoded typing, receipt or read-position frame) another node passed on
        (``Engine.pass_on``), for this node's sessions of ``user``."""
        ...


class Engine(Protocol):
    """Storage, cross-process routing, presence and accounts, as the relay sees them."""

    @property
    def name(self) -> str:
        """What /healthz calls this engine ("sqlite", "ephemeral")."""
        ...

    @property
    def capabilities(self) -> frozenset[Capability]: ...

    @property
    def epoch(self) -> str:
        """This store's identity, announced in every hello: made with the store, never changed,
        different for every other store (a client's cursor from another epoch is no position here)."""
        ...

    @property
    def newest_ts(self) -> float:
        """The newest accept time at start: new accept times continue from it, so times grow with ids."""
        ...

    @property
    def accounts(self) -> Accounts | None:
        """None when this engine keeps no accounts."""
        ...

    @property
    def presence(self) -> Presence: ...

    def attach(self, listener: EngineListener) -> None:
        """Give the engine the relay to tell about messages and presence from elsewhere."""
        ...

    def highest_id(self) -> int:
        """The highest message id this store ever gave out, known without waiting (no storage read)."""
        ...

    def append(self, batch: Sequence[NewMessage], cursors: Mapping[str, int],
               done: Callable[[Appended | StorageError], None]) -> None:
        """Commit a tick's batch and cursor moves together; then ``done`` with the ids in batch order.

        A (sender, client_id) already committed is not committed again (``Appended.duplicates``).
        With ``Capability.REPLIES``, a message whose ``reply_to`` names no message between its sender and
        recipient (unknown, pruned, another conversation's) is not committed (``Appended.bad_replies``).
        The reply lookup is part of the commit, not a call of its own: checked in the same transaction,
        the referenced message cannot be pruned in between, and a reply keeps its place among its
        sender's messages (a lookup before the commit would let later sends overtake it).
        On error nothing of the batch is committed: ``done`` gets the StorageError.
        """
        ...

    def read_backlog(self, user: str, after: int | None, since_ts: float | None, encode: Encoder,
                     done: Callable[[BacklogPage | StorageError], None]) -> None:
        """One page of ``user``'s backlog, bounded in count and bytes (one message always fits).

        Without ``after``/``since_ts``, after the user's cursor; ``since_ts`` starts at the first
        message accepted at or after it. Rows the encoder rejects are logged and skipped.
        """
        ...

    def read_history(self, user: str, request: p.HistoryRequest, done: Callable[[str | StorageError], None]) -> None:
        """The encoded answer to ``user``'s history request: the newest messages of the conversation,
        bounded in count and bytes, ``more`` when the byte bound cut it (one message always fits)."""
        ...

    def read_search(self, user: str, request: p.SearchRequest, done: Callable[[str | StorageError], None]) -> None:
        """The encoded answer to ``user``'s search (``Capability.SEARCH``): messages sent or received by
        ``user`` whose text holds every word of ``request.text``, newest first, bounded in count, bytes
        and index entries read (``more`` when a bound other than ``limit`` cut it). Without the
        capability, ``done`` gets a StorageError saying why."""
        ...

    def contacts_among(self, user: str, candidates: Set[str]) -> set[str]:
        """Those of ``candidates`` who exchanged a message with ``user`` either way; raises StorageError.

        Answered at once (the relay's watch and who answers depend on it within the frame).
        """
        ...

    # -- read positions and the inbox (issue 12): engines with Capability.READS --------------------
    # Without READS, both answer ``done`` with a StorageError saying nothing is kept.

    def mark_read(self, marks: ReadMarks, done: Callable[[dict[tuple[str, str], int] | StorageError], None]) -> None:
        """Move read positions, a tick's worth at once (one transaction: a flood of ``read`` frames costs
        one commit per tick, as ``received`` does). For each (user, peer): the user's position in the
        conversation with peer moves up to the id (never down), apart from the delivery cursor and shared
        by every session (every node) of the user; the flag (kept with it, latest wins) says whether
        peer's inbox may show it (``ConversationSummary.peer_read``). Then ``done`` with the position
        now kept for each (user, peer); on error nothing moved."""
        ...

    def pass_on(self, user: str, frame: str) -> None:
        """Hand a live event (an encoded typing, receipt or read-position frame; never stored) to ``user``'s
        sessions on other nodes; the relay has told this node's own. Nothing to do for a single process."""
        ...

    def read_inbox(self, user: str, limit: int, done: Callable[[InboxPage | StorageError], None]) -> None:
        """``user``'s conversations (peers they exchanged a stored message with), the most recent first, at
        most ``limit``: each with its read position, the count of the peer's messages above it, and the
        newest message. Counting must not read the conversation's history: use an index on
        (recipient, sender, id), so that it costs the unread messages, not all of them."""
        ...

    async def prune(self, older_than_ts: float, limit: int) -> int:
        """Delete at most ``limit`` of the oldest messages accepted before ``older_than_ts``; how many.
        Raises StorageError."""
        ...

    async def settle(self) -> None:
        """Wait until every call made so far has finished and its ``done`` has run."""
        ...

    def health(self) -> dict[str, Any]:
        """For /healthz: ``mode``, ``ok`` (false while storage is failing or damaged), ``error`` if any,
        and engine figures (``db_bytes``). A failure is reported until a later storage call succeeds;
        a damaged file, until a restart."""
        ...

    def close(self) -> None:
        """Release the store; call once nothing is submitted any more (after ``settle``)."""
        ...

    def prometheus_lines(self) -> list[str]:
        """The engine's own /metrics families (Prometheus text lines), if it has any."""
        ...
