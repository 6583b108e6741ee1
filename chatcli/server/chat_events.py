"""The chat experience's requests (issue 12): read positions, receipts, typing and the inbox.

Beside the relay, which owns the sessions and hands these frames here once they were
charged to their user's rate limit. Read positions and the inbox go through the engine
(``Capability.READS``: a store keeps them); receipts and typing are passed on live, to
open native sessions only (legacy frames have no room for them), and only where the
presence setting would show the two users to each other (``--presence``). Live events go
to this node's sessions, and through the engine (``pass_on``) to the other nodes' (Redis).

Bounds: the ``read`` frames of a tick are kept in one transaction (the highest per user and
conversation), and the next tick's wait while it commits, as messages do; a session has at
most one inbox request being answered (a second is refused, not queued); typing is passed on
at most once per ``TYPING_INTERVAL_S`` per session, and never stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, NamedTuple

from chatcli import protocol as p
from chatcli.errors import StorageError
from chatcli.server.engine.base import Capability, ConversationSummary, InboxPage

if TYPE_CHECKING:
    from chatcli.server.relay import Relay, Session

__all__ = ["TYPING_INTERVAL_S", "ChatEvents", "conversation_frame"]

log = logging.getLogger("chatcli.server")

#: A session's typing events are passed on at most once per this many seconds; the rest are dropped.
TYPING_INTERVAL_S: Final = 2.0


class _Mark(NamedTuple):
    """A ``read`` waiting for its commit: the highest id asked this tick, the latest receipt choice, and the
    session that asked last (its user's other sessions are told)."""

    msg_id: int
    receipt: bool
    session: Session


def conversation_frame(summary: ConversationSummary, receipts: bool) -> p.Conversation:
    """An inbox line: the summary with its newest message's time and the start of its text; the peer's read
    position only where ``receipts`` are shown."""
    last = summary.last
    return p.Conversation(summary.peer, summary.unread, summary.read, last.id, last.sender, p.format_ts(last.ts),
                          last.text[:p.PREVIEW_MAX_CHARS], summary.peer_read if receipts else None)


class ChatEvents:
    """What the relay does with ``read``, ``typing`` and ``inbox`` frames."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        #: When each session last had a typing event passed on (monotonic seconds).
        self.typing_at: dict[Session, float] = {}
        #: Sessions with an inbox request being answered.
        self.inbox_waiting: set[Session] = set()
        #: Read positions asked for, by (user, peer), committed together; while a batch commits, the
        #: next gathers here.
        self.reads_waiting: dict[tuple[str, str], _Mark] = {}
        self.reads_committing = False
        self.reads_scheduled = False
        #: Inbox reads held until the read positions their user asked for before them are kept, so that an
        #: inbox asked right after a ``read`` shows it: those waiting for the batch being committed, and those
        #: waiting for the next one; the users with reads in either.
        self.inbox_after_batch: list[Callable[[], None]] = []
        self.inbox_after_next: list[Callable[[], None]] = []
        self.users_committing: set[str] = set()
        self.users_waiting: set[str] = set()

    def features(self) -> tuple[str, ...]:
        """What hellos announce for these: ``reads`` with an engine that keeps them; ``receipts`` and
        ``typing`` unless presence is off (they would tell who is there)."""
        reads = (p.Feature.READS,) if Capability.READS in self.relay.engine.capabilities else ()
        live = (p.Feature.RECEIPTS, p.Feature.TYPING) if self.relay.config.presence != "off" else ()
        return (*reads, *live)

    def forget(self, session: Session) -> None:
        self.typing_at.pop(session, None)
        self.inbox_waiting.discard(session)

    def handle(self, session: Session, frame: p.MarkRead | p.Typing | p.InboxRequest) -> None:
        if isinstance(frame, p.MarkRead):
            self.mark_read(session, frame)
        elif isinstance(frame, p.Typing):
            self.typing(session, frame)
        else:
            self.inbox(session, frame)

    # -- privacy -------------------------------------------------------------------------

    def _may_signal(self, session: Session, peer: str) -> bool:
        """Whether ``session``'s user may tell ``peer`` anything live: where presence would show them."""
        mode = self.relay.presence_mode(session)
        if mode == "off":
            return False
        if mode == "all" or peer == session.user:
            return True
        try:
            return peer in self.relay.engine.contacts_among(session.user, {peer})
        except StorageError as exc:
            log.error("could not read the contacts of %s: %s", session.user, exc, extra={"event": "storage-error"})
            return False

    @staticmethod
    def _send_native(sessions: Iterable[Session], text: str) -> None:
        for session in sessions:
            if session.codec.takes_chat_events:
                session.send_text(text)

    def _tell(self, user: str, text: str, but: Session | None = None) -> None:
        """A live event for ``user``'s sessions: this node's (but ``but``), then the other nodes' (the engine's)."""
        self._send_native((s for s in self.relay.sessions.get(user, ()) if s is not but), text)
        self.relay.engine.pass_on(user, text)

    def arrived(self, user: str, text: str) -> None:
        """A live event another node passed on (it checked privacy and limits): to ``user``'s sessions here."""
        self._send_native(self.relay.sessions.get(user, ()), text)

    # -- read positions and receipts -------------------------------------------------------

    def mark_read(self, session: Session, frame: p.MarkRead) -> None:
        """Keep the position (never past the highest id given out) with the tick's other reads, then tell the
        user's other sessions and, unless opted out, the peer."""
        engine = self.relay.engine
        position = min(frame.id, engine.highest_id())
        if Capability.READS not in engine.capabilities:  # nothing kept: receipts still go to the peer
            self._marked(_Mark(position, frame.receipt, session), frame.peer, position)
            return
        key = (session.user, frame.peer)
        self.users_waiting.add(session.user)
        earlier = self.reads_waiting.get(key)
        self.reads_waiting[key] = _Mark(max(position, earlier.msg_id if earlier else 0), frame.receipt, session)
        if not (self.reads_scheduled or self.reads_committing):
            self.reads_scheduled = True
            self.relay.schedule(self._commit_reads)

    def _commit_reads(self) -> None:
        self.reads_scheduled = False
        if self.reads_committing or not self.reads_waiting:
            return
        batch, self.reads_waiting = self.reads_waiting, {}
        self.reads_committing = True
        self.users_committing, self.users_waiting = self.users_waiting, set()
        self.inbox_after_batch, self.inbox_after_next = self.inbox_after_next, []
        marks = {key: (mark.msg_id, mark.receipt) for key, mark in batch.items()}
        self.relay.engine.mark_read(marks, lambda kept: self._reads_kept(batch, kept))

    def _reads_kept(self, batch: dict[tuple[str, str], _Mark], kept: dict[tuple[str, str], int] | StorageError
                    ) -> None:
        self.reads_committing = False
        self.users_committing = set()
        held, self.inbox_after_batch = self.inbox_after_batch, []
        for read in held:  # kept (or failed, and said so): the inbox may be read now
            read()
        if isinstance(kept, StorageError):
            log.error("could not keep %d read position(s): %s", len(batch), kept, extra={"event": "storage-error"})
            error = p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                     "your read position could not be kept: the server's storage failed"))
            self._send_native({mark.session for mark in batch.values()}, error)
        else:
            for (_, peer), mark in batch.items():
                self._marked(mark, peer, kept[(mark.session.user, peer)])
        if self.reads_waiting:  # gathered while this batch was committing
            self.reads_scheduled = True
            self.relay.schedule(self._commit_reads)

    def _marked(self, mark: _Mark, peer: str, kept: int) -> None:
        relay, session = self.relay, mark.session
        if Capability.READS in relay.engine.capabilities:
            self._tell(session.user, p.encode(p.ReadPosition(peer, kept)), but=session)
        if mark.receipt and peer != session.user and self._may_signal(session, peer):
            self._tell(peer, p.encode(p.Receipt(session.user, kept)))

    # -- typing ----------------------------------------------------------------------------

    def typing(self, session: Session, frame: p.Typing) -> None:
        """Pass it on to the recipient's open sessions (on any node), at most once per interval; never stored."""
        relay = self.relay
        now = relay.monotonic()
        last = self.typing_at.get(session)
        if last is not None and now - last < TYPING_INTERVAL_S:
            return
        if (frame.to == session.user or not relay.engine.presence.is_online(frame.to)
                or not self._may_signal(session, frame.to)):
            return
        self.typing_at[session] = now
        self._tell(frame.to, p.encode(p.PeerTyping(session.user)))

    # -- the inbox ---------------------------------------------------------------------------

    def inbox(self, session: Session, request: p.InboxRequest) -> None:
        engine = self.relay.engine
        if Capability.READS not in engine.capabilities:
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                               "this server stores no messages (--ephemeral): no inbox")))
            return
        if session in self.inbox_waiting:
            session.send_text(p.encode(p.Error(
                p.ErrorCode.UNAVAILABLE, "an inbox request is being answered: wait for its answer, then ask again",
                {"id": request.id})))
            return
        self.inbox_waiting.add(session)
        user = session.user

        def read() -> None:
            engine.read_inbox(user, request.limit, lambda page: self._answer_inbox(session, request, page))

        if user in self.users_waiting:
            self.inbox_after_next.append(read)
        elif user in self.users_committing:
            self.inbox_after_batch.append(read)
        else:
            read()

    def _answer_inbox(self, session: Session, request: p.InboxRequest, page: InboxPage | StorageError) -> None:
        if session not in self.inbox_waiting:  # closed meanwhile
            return
        self.inbox_waiting.discard(session)
        if isinstance(page, StorageError):
            log.error("could not read the inbox of %s: %s", session.user, page, extra={"event": "storage-error"})
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                               "the inbox is unavailable right now: the server's storage failed",
                                               {"id": request.id})))
            return
        receipts = self.relay.presence_mode(session) != "off"  # the inbox holds only contacts
        conversations = tuple(conversation_frame(summary, receipts) for summary in page.conversations)
        session.send_text(p.encode(p.Inbox(request.id, conversations, more=page.more)))
