"""Routing: who is connected here, and what happens to each frame a session sends.

Transport-free: sessions are anything with ``user``, ``codec`` and
``send_text()``; the transport turns WebSocket frames into calls of
``on_legacy_text`` / ``on_native_text`` (through the session's codec) and writes
what sessions are given. What a session is sent comes from its codec
(``chatcli.server.codecs``), so routing never asks which protocol a session speaks.

The relay keeps what belongs to this process's sockets: the registry of open
sessions, their backlogs being sent (replays), their history queues and watches,
and the per-user rate limits. Everything else goes through an ``Engine``
(``chatcli.server.engine``): message ids and commits, backlogs, history, cursors,
contacts, who is online, accounts. What the engine can do is read from its
``capabilities`` (the memory engine of ``--ephemeral`` stores nothing: offline
recipients are refused and there is no history), never from which engine it is.

Every accepted message is committed before it is acknowledged or delivered.
Messages accepted during one event-loop tick are committed together
(``schedule`` runs ``commit`` once the tick's reads are done), so durability
costs one transaction per tick, not per message; while one batch is being
committed, the next ticks' messages gather into the next batch, so batches grow
with the load. Backlogs (replay) and history answers are read in pages bounded in
bytes, and the next page is read only once the session's outgoing buffer has drained.

Limits are per user, not per session: ``UserQuota`` counts a user's open sessions
(receiving or not) and holds the one token bucket all of them draw from.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence, Set
from typing import Protocol

from websockets.frames import CloseCode  # an enum only: the relay stays transport-free

from chatcli import protocol as p
from chatcli.errors import ChatcliError, EngineUnavailable, RemoteProtocolError, StorageError
from chatcli.server.chat_events import ChatEvents
from chatcli.server.codecs import Codec, Outcome
from chatcli.server.config import PresenceMode, ServerConfig
from chatcli.server.engine.base import Appended, BacklogPage, Capability, Engine, NewMessage, StoredMessage
from chatcli.server.limitlog import LimitLog
from chatcli.server.metrics import Metrics

__all__ = ["CLOSE_STORAGE_FAILED", "HELD_CHARS", "HELD_LIMIT", "HISTORY_QUEUE", "MAX_WATCHED_USERS", "PACING_QUANTUM",
           "SEARCH_BURST", "SEARCH_RATE", "Outcome", "Relay", "Session", "UserQuota"]

log = logging.getLogger("chatcli.server")

#: History requests a session may have waiting behind the one being answered.
HISTORY_QUEUE = 8
#: A user at their rate limit is read again once their bucket holds this many seconds' worth of requests.
PACING_QUANTUM = 0.01

#: Live messages held for a session still receiving its backlog; beyond this they are read back from storage.
HELD_LIMIT = 100
#: ... and at most this many characters of text (256 KiB of UTF-8 at most), so a few large messages cannot
#: pin megabytes per replaying session.
HELD_CHARS = 64 * 1024
#: The close code for a session whose backlog cannot be read (1011: the server hit an unexpected condition).
CLOSE_STORAGE_FAILED = CloseCode.INTERNAL_ERROR


#: Searches one user may start at once, then per second (all sessions together), beside the request bucket:
#: each may take the storage thread 10-20 ms (storage.SEARCH_MAX_STEPS), which commits wait behind.
SEARCH_BURST = 10
SEARCH_RATE = 2.0

#: Users one session may watch at once (a watch replaces the session's previous one).
MAX_WATCHED_USERS = 512


class Session(Protocol):
    """What routing needs of a connected session."""

    user: str
    #: What the session is sent is encoded by its protocol's codec, picked at the handshake.
    codec: Codec
    #: The session proved its user with a token at the handshake (accounts on).
    authenticated: bool

    def send_text(self, text: str) -> None: ...

    #: The highest message id written to this session: what it may acknowledge as received.
    written_upto: int

    def written(self, msg_id: int) -> None:
        """The session was sent message ``msg_id`` (seed clients: it counts as received once the bytes reach
        the kernel)."""
        ...

    def auth_failed(self) -> None:
        """A frame carried a wrong key (seed clients send it in every frame)."""
        ...

    @property
    def is_open(self) -> bool: ...

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, on the loop, when the outgoing buffer is low (never if the session closed)."""
        ...

    def close(self, code: int, reason: str) -> None: ...


class Replay:
    """A session receiving its backlog; live messages wait in ``held`` so that order is kept.

    Past ``HELD_LIMIT`` live messages or ``HELD_CHARS`` of their text, ``held`` is dropped and
    ``overflowed`` set: those messages are stored, so one more page read at the end of the backlog
    finds them.
    """

    __slots__ = ("after", "held", "held_chars", "overflowed", "since_ts")

    def __init__(self, after: int | None, since_ts: float | None) -> None:
        self.after = after
        self.since_ts = since_ts
        self.held: list[StoredMessage] = []
        self.held_chars = 0
        self.overflowed = False


class UserQuota:
    """One user's share of the server: their open sessions, and the token bucket they all draw from.

    The bucket is refilled lazily, only when it runs dry, so a request costs a subtraction and
    no clock read. Over any period it grants at most ``burst + rate * elapsed``.
    """

    __slots__ = ("refilled_at", "searches", "searches_at", "sessions", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.sessions = 0
        self.tokens = tokens
        self.refilled_at = now
        #: The search bucket (SEARCH_BURST, SEARCH_RATE); dropped with the quota, which is full again by then.
        self.searches = float(SEARCH_BURST)
        self.searches_at = now

    def take_search(self, now: float) -> bool:
        """Charge one search; False (charge nothing) when the user searched too often."""
        self.searches = min(float(SEARCH_BURST), self.searches + (now - self.searches_at) * SEARCH_RATE)
        self.searches_at = now
        if self.searches < 1.0:
            return False
        self.searches -= 1.0
        return True

    def tokens_at(self, now: float, rate: float) -> float:
        """What a refill at ``now`` would give, before the cap at ``burst``."""
        return self.tokens + (now - self.refilled_at) * rate


class Relay:
    """The registry of open sessions and the routing of sends between them; an ``EngineListener``."""

    def __init__(self, config: ServerConfig, metrics: Metrics, engine: Engine,
                 schedule: Callable[[Callable[[], None]], object] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.metrics = metrics
        #: Storage failures come in floods (every batch while Redis or the disk is away): one line per
        #: operation per 10 s, counting the rest.
        self.storage_failures = LimitLog("storage-error")
        self.engine = engine
        engine.attach(self)
        self.schedule = schedule or (lambda callback: callback())
        self.clock = clock
        self.monotonic = time.monotonic  # for token buckets: immune to wall-clock steps
        # user -> open sessions (receiving or not) and rate limit; kept after the last session closes
        # until the bucket would be full again, so reconnecting does not refill it.
        self.quotas: dict[str, UserQuota] = {}
        self.idle_quotas: set[str] = set()  # users in quotas with no open session
        self.open: set[Session] = set()  # every registered session, receiving or not
        self.committing = False  # a batch is with the engine; the next one waits in `pending`
        # Accept times never decrease with ids (first_id_since relies on it), across restarts too.
        self.last_ts = engine.newest_ts
        # A session's history requests, answered one at a time: the key exists while one is being answered.
        self.history_queues: dict[Session, deque[p.HistoryRequest | p.SearchRequest]] = {}
        # user -> that user's open sessions; a user may be connected several times.
        self.sessions: dict[str, list[Session]] = {}
        self.replays: dict[Session, Replay] = {}
        # Accepted this tick, committed together: (sender session, client id, recipient, text).
        self.pending: list[tuple[Session, str | None, str, str]] = []
        #: position in ``pending`` -> the message it replies to (issue 13; most batches hold none).
        self.pending_replies: dict[int, int] = {}
        self.cursor_updates: dict[str, int] = {}
        self.commit_scheduled = False
        self.batch_started = 0.0
        # Presence: who watches whom, both ways, so a closing session is forgotten in O(its watches).
        self.watchers: dict[str, set[Session]] = {}
        self.watching: dict[Session, tuple[str, ...]] = {}
        # --presence contacts: (watcher's user, watched user) -> the watcher's sessions told "hidden",
        # until the two exchange a message (see _reveal).
        self.hidden_watchers: dict[tuple[str, str], set[Session]] = {}
        # Read positions, receipts, typing and the inbox (issue 12).
        self.chat = ChatEvents(self)

    @property
    def features(self) -> tuple[str, ...]:
        """What hellos announce: the engine's capabilities as features, and presence unless it is off."""
        can = self.engine.capabilities
        stored = tuple(feature for capability, feature in _FEATURES if capability in can)
        presence = (p.Feature.PRESENCE,) if self.config.presence != "off" else ()
        return (*stored, *presence, *self.chat.features())

    @property
    def epoch(self) -> str:
        """The store identity announced in every hello."""
        return self.engine.epoch

    # -- registry -----------------------------------------------------------

    def open_session(self, session: Session, after: int | None = None, since_ts: float | None = None,
                     receive: bool = True) -> None:
        """Register a session whose greeting was sent, and start sending it its stored messages.

        Without ``after``/``since_ts`` it gets what its user has not acknowledged yet. A session
        with ``receive=False`` only sends or asks: it is not a recipient and not "online", but it
        counts towards its user's session limit and draws on the user's rate limit.
        """
        self._count_open(session)
        if not receive:
            return
        mine = self.sessions.setdefault(session.user, [])
        mine.append(session)
        if len(mine) == 1:
            self.engine.presence.joined(session.user)
            self._announce(session.user, online=True)
        if Capability.RESUME in self.engine.capabilities:
            self.replays[session] = Replay(after, since_ts)
            self._request_page(session)

    def resume_after(self, user: str, after: int | None, epoch: str | None) -> tuple[int | None, bool]:
        """Where a session resuming after message ``after`` of store ``epoch`` starts; True if that is a reset.

        An id from another store (another epoch), or above every id this store gave out (a restored
        backup, or a client whose epoch is unknown), is no position here: skipping up to it would
        drop this store's messages, so the backlog starts at this store's beginning instead.
        """
        if after is None or ((epoch is None or epoch == self.engine.epoch) and after <= self.engine.highest_id()):
            return after, False
        log.info("%s resumes after message %d of another store (epoch %s): replaying from the beginning",
                 user, after, epoch or "unknown", extra={"event": "cursor-reset", "user": user})
        return 0, True

    def close_session(self, session: Session) -> None:
        """Remove exactly this session; the user's other sessions stay reachable."""
        self.replays.pop(session, None)
        self.history_queues.pop(session, None)
        self.chat.forget(session)
        self._unwatch(session)
        if session not in self.open:
            return
        self.open.discard(session)
        self._release_quota(session.user)
        mine = self.sessions.get(session.user)
        if mine is None:
            return
        try:
            mine.remove(session)
        except ValueError:
            return
        if not mine:
            del self.sessions[session.user]
            self.engine.presence.left(session.user)
            self._announce(session.user, online=self.engine.presence.is_online(session.user))  # other nodes

    def _count_open(self, session: Session) -> None:
        if session in self.open:
            return
        self.open.add(session)
        quota = self.quotas.get(session.user)
        if quota is None:
            quota = self.quotas[session.user] = UserQuota(float(self.config.burst), self.monotonic())
        quota.sessions += 1
        self.idle_quotas.discard(session.user)

    def _release_quota(self, user: str) -> None:
        quota = self.quotas[user]
        quota.sessions -= 1
        if quota.sessions == 0:
            self.idle_quotas.add(user)  # forgotten by forget_refilled_quotas once its bucket is full

    def forget_refilled_quotas(self) -> None:
        """Drop the quotas of users without sessions whose bucket has refilled: a new one is the same.

        Call periodically (the heartbeat does): memory stays bounded by the users seen in the last
        ``burst / rate`` seconds.
        """
        now, rate, burst = self.monotonic(), self.config.rate, self.config.burst
        for user in [u for u in self.idle_quotas if self.quotas[u].tokens_at(now, rate) >= burst]:
            del self.quotas[user]
            self.idle_quotas.discard(user)

    def allowance(self, user: str) -> float:
        """Requests ``user`` may make now (refilled if the bucket looks dry); infinite without a quota.

        A connection checks it before acting on a frame: over the limit it stops reading and waits
        ``token_wait`` (the transport's pacing), so a faster stream is slowed, in order, not refused.
        """
        quota = self.quotas.get(user)
        if quota is None:
            return math.inf  # no open session: take_token refuses, as it always did
        if quota.tokens < 1.0:
            now = self.monotonic()
            quota.tokens = min(float(self.config.burst), quota.tokens_at(now, self.config.rate))
            quota.refilled_at = now
        return quota.tokens

    def token_wait(self, user: str) -> float:
        """Seconds a paced connection of ``user``'s waits: until the bucket holds PACING_QUANTUM's worth of
        requests (at least one), so that a user held at the limit costs ~100 wake-ups a second, not one
        a request (and never a timer shorter than the loop's clock can tell)."""
        rate = self.config.rate
        wanted = min(float(self.config.burst), max(1.0, rate * PACING_QUANTUM))
        return max(PACING_QUANTUM / 10, (wanted - self.allowance(user)) / rate)

    def take_token(self, user: str) -> bool:
        """Charge one request to ``user``'s bucket; False (charge nothing) when it is empty."""
        quota = self.quotas.get(user)
        if quota is None:  # no open session: nothing it sends is acted on
            return False
        if quota.tokens < 1.0:
            now = self.monotonic()
            quota.tokens = min(float(self.config.burst), quota.tokens_at(now, self.config.rate))
            quota.refilled_at = now
            if quota.tokens < 1.0:
                return False
        quota.tokens -= 1.0
        return True

    def _unwatch(self, session: Session) -> None:
        for user in self.watching.pop(session, ()):
            watchers = self.watchers.get(user)
            if watchers is not None and session in watchers:
                watchers.discard(session)
                if not watchers:
                    del self.watchers[user]
                continue
            key = (session.user, user)
            hidden = self.hidden_watchers.get(key)
            if hidden is not None:
                hidden.discard(session)
                if not hidden:
                    del self.hidden_watchers[key]

    def sessions_of(self, user: str) -> int:
        """Open sessions of ``user``, receiving or not (the per-user session limit counts these)."""
        quota = self.quotas.get(user)
        return quota.sessions if quota is not None else 0

    def _announce(self, user: str, online: bool) -> None:
        watchers = self.watchers.get(user)
        if watchers:
            frame = p.encode(p.Presence(user, online))
            for watcher in watchers:
                watcher.send_text(frame)

    def online_users(self) -> list[str]:
        return sorted(self.engine.presence.online())

    # -- what the engine tells (EngineListener) -------------------------------------------

    def messages_committed_elsewhere(self, user: str, messages: Sequence[StoredMessage]) -> None:
        """Messages another node committed for ``user``: deliver them to this node's sessions of theirs."""
        recipients = self.sessions.get(user)
        if recipients is not None:
            self._deliver_run(messages, recipients)

    def presence_changed(self, user: str, online: bool) -> None:
        """``user`` came or went on another node: tell this node's watchers."""
        self._announce(user, online)

    def live_event(self, user: str, frame: str) -> None:
        """Another node's typing, receipt or read position for ``user``: to this node's native sessions."""
        self.chat.arrived(user, frame)

    def store_reset(self) -> None:
        """The shared store is another one now: close every session (1012), so that each client reconnects,
        is told of the reset in its hello and starts again from the new store's beginning."""
        for session in list(self.open):
            session.close(CloseCode.SERVICE_RESTART, "the message store was reset: reconnect")

    @property
    def session_count(self) -> int:
        return sum(len(s) for s in self.sessions.values())

    # -- legacy (seed Flutter) sessions ---------------------------------------

    def on_legacy_text(self, session: Session, text: str) -> None:
        """Handle one frame from a seed client; every outcome gets the ack the app understands."""
        try:
            command = p.parse_legacy_frame(text)
        except RemoteProtocolError:
            self.metrics.error("bad-frame")
            session.send_text(p.LEGACY_SEND_ERROR)
            return
        if command.cmd != "send":
            self.metrics.error("unknown-cmd")
            session.send_text(p.legacy_error(command.cmd))
            return
        if not session.authenticated and not hmac.compare_digest((command.auth or "").encode("utf-8", "surrogatepass"),
                                                                  self.config.auth_key.encode()):
            self.refuse(session, None, p.Reason.BAD_AUTH)
            session.auth_failed()
            return
        if command.userid is None or command.msgtext is None:
            self.metrics.error("bad-frame")
            session.send_text(p.LEGACY_SEND_ERROR)
            return
        self.submit(session, None, command.userid, command.msgtext)

    # -- native (chatcli.v1) sessions -----------------------------------------

    def on_native_text(self, session: Session, text: str) -> None:
        try:
            frame = p.read_client_frame(text)  # a well-formed send comes as its fields, no Send built
        except RemoteProtocolError as exc:
            self.metrics.error(exc.code)
            session.send_text(p.encode(p.Error(exc.code, exc.message)))
            return
        if isinstance(frame, tuple):
            self.submit(session, *frame)  # charged there, refused with an ack
        elif isinstance(frame, p.Send):
            self.submit(session, frame.id, frame.to, frame.text, frame.reply_to)
        elif not self.take_token(session.user):
            self._rate_limited(session, frame)
        elif isinstance(frame, p.Received):
            # Never past what this session was sent: a cursor beyond it would skip messages not yet delivered.
            self.confirm_received(session.user, min(frame.id, session.written_upto))
        elif isinstance(frame, p.HistoryRequest):
            self._history(session, frame)
        elif isinstance(frame, p.WhoRequest):
            self._who(session, frame)
        elif isinstance(frame, p.SearchRequest):
            self._search(session, frame)
        elif isinstance(frame, p.Watch):
            self._watch(session, frame.users)
        else:
            self.chat.handle(session, frame)

    def _rate_limited(self, session: Session, frame: p.ClientFrame) -> None:
        """A request over the user's rate limit: an error naming it; a ``received`` is just dropped
        (a later one advances the cursor as far); so are ``read`` and ``typing``.

        The WebSocket transport paces users instead (it acts on a frame only while ``allowance`` is at
        least one), so its sessions never get here: this is the relay's own bound, whoever feeds it."""
        self.metrics.error(p.ErrorCode.RATE_LIMITED)
        if isinstance(frame, p.Received | p.MarkRead | p.Typing):
            return
        details = ({"id": frame.id} if isinstance(frame, p.HistoryRequest | p.WhoRequest | p.InboxRequest
                                                          | p.SearchRequest) else {})
        session.send_text(p.encode(p.Error(
            p.ErrorCode.RATE_LIMITED, f"too many requests: {session.user} may make {self.config.rate:g} per "
            f"second (bursts of {self.config.burst}) over all sessions; ask again later", details)))

    # -- presence --------------------------------------------------------------------

    def presence_mode(self, session: Session) -> PresenceMode:
        """Whose presence ``session`` sees: ``--presence``, else contacts only once tokens prove who asks."""
        mode = self.config.presence
        if mode is None:
            mode = "contacts" if session.authenticated else "all"
        return "all" if mode == "contacts" and Capability.CONTACTS not in self.engine.capabilities else mode

    def _presence_off(self, session: Session) -> None:
        session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                           "this server does not show who is online (--presence off)")))

    def _visible(self, session: Session, users: Set[str]) -> set[str] | None:
        """Which of ``users`` (online or not) ``session`` may see under --presence contacts: its own
        user and those it exchanged a message with. None (after telling the session) if unreadable."""
        me = session.user
        try:
            visible = self.engine.contacts_among(me, users)
        except StorageError as exc:
            log.error("could not read the contacts of %s: %s", me, exc, extra={"event": "storage-error"})
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE, "presence is unavailable right now")))
            return None
        if me in users:
            visible.add(me)
        return visible

    def _who(self, session: Session, request: p.WhoRequest) -> None:
        mode = self.presence_mode(session)
        if mode == "off":
            self._presence_off(session)
            return
        online: Set[str] = self.engine.presence.online()
        if mode == "contacts":
            visible = self._visible(session, online)
            if visible is None:
                return
            online = visible
        session.send_text(p.encode(p.Who(request.id, tuple(sorted(online)))))

    def _watch(self, session: Session, users: tuple[str, ...]) -> None:
        """Start telling ``session`` about ``users`` coming and going, beginning with where they are now.

        Under --presence contacts, a user it may not see is reported ``hidden`` (offline) once, and
        for real as soon as the two exchange a message.
        """
        self._unwatch(session)
        mode = self.presence_mode(session)
        if mode == "off":
            self._presence_off(session)
            return
        users = tuple(dict.fromkeys(users))  # a user named twice is still one subscription
        if len(users) > MAX_WATCHED_USERS:  # each costs an entry per session for as long as it is open
            self.metrics.error(p.ErrorCode.BAD_FRAME)
            session.send_text(p.encode(p.Error(p.ErrorCode.BAD_FRAME,
                                               f"watch at most {MAX_WATCHED_USERS} users at once")))
            return
        visible: set[str] | None = None  # None: every user is visible
        if mode == "contacts" and users:
            visible = self._visible(session, set(users))
            if visible is None:
                return
        self.watching[session] = users
        for user in users:
            if visible is None or user in visible:
                self.watchers.setdefault(user, set()).add(session)
                session.send_text(p.encode(p.Presence(user, self.engine.presence.is_online(user))))
            else:
                self.hidden_watchers.setdefault((session.user, user), set()).add(session)
                session.send_text(p.encode(p.Presence(user, False, hidden=True)))

    def _reveal(self, rows: list[NewMessage]) -> None:
        """Messages were stored: whoever watched their other party hidden may see it now."""
        hidden, presence = self.hidden_watchers, self.engine.presence
        for row in rows:
            for watcher, watched in ((row.sender, row.recipient), (row.recipient, row.sender)):
                sessions = hidden.pop((watcher, watched), None)
                if sessions:
                    self.watchers.setdefault(watched, set()).update(sessions)
                    frame = p.encode(p.Presence(watched, presence.is_online(watched)))
                    for session in sessions:
                        session.send_text(frame)

    def on_binary(self, session: Session) -> None:
        self.metrics.error(p.ErrorCode.BINARY_UNSUPPORTED)
        session.send_text(session.codec.error(p.ErrorCode.BINARY_UNSUPPORTED,
                                              "binary frames are not supported: send JSON text frames"))

    def confirm_received(self, user: str, msg_id: int) -> None:
        """``user`` has every message up to ``msg_id``: advance its cursor with the next commit."""
        if msg_id > self.cursor_updates.get(user, 0) and Capability.RESUME in self.engine.capabilities:
            self.cursor_updates[user] = msg_id
            self._schedule_commit()

    def _history(self, session: Session, request: p.HistoryRequest | p.SearchRequest) -> None:
        """Answer history requests one at a time: the next is read once the previous answer has drained."""
        if Capability.HISTORY not in self.engine.capabilities:
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                               "this server stores no messages (--ephemeral): no history")))
            return
        queue = self.history_queues.get(session)
        if queue is None:
            self.history_queues[session] = deque()
            self._read_history(session, request)
        elif len(queue) < HISTORY_QUEUE:
            queue.append(request)
        else:
            details = {"id": request.id} if isinstance(request, p.SearchRequest) else {}  # searches share the queue
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE, (
                f"too many history requests at once (at most {HISTORY_QUEUE} waiting): "
                "read the answers, then ask again"), details)))

    def _search(self, session: Session, request: p.SearchRequest) -> None:
        """Answer a search like a history request: through the same queue, one answer at a time."""
        if Capability.SEARCH not in self.engine.capabilities:
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE, "this server keeps no message texts "
                                               "(--ephemeral): no search", {"id": request.id})))
            return
        quota = self.quotas.get(session.user)
        if quota is not None and not quota.take_search(self.monotonic()):
            self.metrics.error(p.ErrorCode.RATE_LIMITED)
            session.send_text(p.encode(p.Error(p.ErrorCode.RATE_LIMITED, (
                f"too many searches: {session.user} may search {SEARCH_BURST} times at once, then "
                f"{SEARCH_RATE:g} times per second; ask again later"), {"id": request.id})))
            return
        self._history(session, request)  # queued and answered alike

    def _read_history(self, session: Session, request: p.HistoryRequest | p.SearchRequest) -> None:
        answer = functools.partial(self._answer_history, session, type(request).TYPE)
        if isinstance(request, p.SearchRequest):
            self.engine.read_search(session.user, request, answer)
        else:
            self.engine.read_history(session.user, request, answer)

    def _log_storage_failure(self, operation: str, what: str, exc: StorageError) -> None:
        """The operator's line, at most one per ``operation`` ("store", "read") per interval; the engine
        reports the failure in /healthz itself."""
        self.storage_failures.bit(operation, logging.ERROR, f"{what}: {exc}")

    def _answer_history(self, session: Session, what: str, answer: str | StorageError) -> None:
        if isinstance(answer, StorageError):
            self._log_storage_failure("read", f"could not read {what} for {session.user}", answer)
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                               f"{what} is unavailable right now: the server's storage failed")))
        else:
            session.send_text(answer)
        if session in self.history_queues:
            session.when_drained(lambda: self._next_history(session))

    def _next_history(self, session: Session) -> None:
        queue = self.history_queues.get(session)
        if queue is None:
            return
        if queue:
            self._read_history(session, queue.popleft())
        else:
            del self.history_queues[session]

    # -- accepting a message ---------------------------------------------------------

    def submit(self, session: Session, client_id: str | None, to: str, text: str,
               reply_to: int | None = None) -> None:
        """Accept a message for ``to`` or refuse it; either way the sender gets exactly one ack.

        A reply (``reply_to``) is checked by the engine as part of the commit (``Capability.REPLIES``).
        """
        reason = (p.check_text(text, self.config.max_text_bytes) if self.take_token(session.user)
                  else p.Reason.RATE_LIMITED)
        if (reason is None and to not in self.sessions and not self.engine.presence.is_online(to)
                and not p.is_valid_user_id(to)):  # ids online here or on another node are valid
            reason = p.Reason.BAD_RECIPIENT
        if reason is None and reply_to is not None and Capability.REPLIES not in self.engine.capabilities:
            reason = p.Reason.BAD_REPLY
        if reason is not None:
            self.refuse(session, client_id, reason)
            return
        if not self.pending:
            self.batch_started = self.clock()
        if reply_to is not None:
            self.pending_replies[len(self.pending)] = reply_to
        self.pending.append((session, client_id, to, text))
        self._schedule_commit()

    def refuse(self, session: Session, client_id: str | None, reason: str) -> None:
        self.metrics.refused(reason)
        session.send_text(session.codec.refusal(client_id, reason))

    def _schedule_commit(self) -> None:
        if not self.commit_scheduled:
            self.commit_scheduled = True
            self.schedule(self.commit)

    def commit(self) -> None:
        """Hand this tick's messages and cursor moves to the engine as one batch.

        While a batch is being committed the next ticks' messages wait: ``_committed`` sends them on
        as the next batch. Acks and deliveries happen only once their batch is committed.
        """
        self.commit_scheduled = False
        if self.committing or not (self.pending or self.cursor_updates):
            return
        batch, self.pending = self.pending, []
        updates, self.cursor_updates = self.cursor_updates, {}
        # One accept time per batch, never before the previous one: ids and times grow together.
        now = self.last_ts = max(self.last_ts, self.clock())
        # tuple.__new__, not NewMessage(...): a NamedTuple's constructor is a Python function, ~0.2 us more a row.
        rows = [_tuple_new(NewMessage, (session.user, to, text, now, client_id, None))
                for session, client_id, to, text in batch]
        if self.pending_replies:
            rows = _with_replies(rows, self.pending_replies)
            self.pending_replies = {}
        self.committing = True
        started = self.batch_started  # the next batch's first message may arrive before this one is done
        self.engine.append(rows, updates, lambda done: self._committed(batch, rows, started, done))

    def _committed(self, batch: list[tuple[Session, str | None, str, str]], rows: list[NewMessage],
                   started: float, appended: Appended | StorageError) -> None:
        """Acknowledge and deliver a committed batch, in order; then send on what gathered meanwhile."""
        self.committing = False
        if isinstance(appended, StorageError):
            self._log_storage_failure("store", f"could not store {len(batch)} message(s)", appended)
            reason = p.Reason.UNAVAILABLE if isinstance(appended, EngineUnavailable) else p.Reason.STORAGE_FAILED
            for session, client_id, _, _ in batch:
                self.refuse(session, client_id, reason)
        else:
            if batch:
                self.metrics.ack_latency.observe(self.clock() - started, len(batch))
            if self.hidden_watchers:  # rare: someone watches a user they have not talked to yet
                self._reveal(rows)
            self._acknowledge(batch, rows, appended)
        # Lost cursor updates only cost a repeat delivery later, never a loss.
        self.commit()

    def _acknowledge(self, batch: list[tuple[Session, str | None, str, str]], rows: list[NewMessage],
                     appended: Appended) -> None:
        """Deliver each message, then ack it, in batch order. (The whole batch's deliveries before any ack was
        tried: a client sending and receiving in one process then sent in smaller bursts, commits came 2-4x
        as often, and each message cost ~1.5 us more; docs/performance.md.)"""
        unusual = appended.duplicates or appended.offline or appended.bad_replies  # all empty as a rule
        offline = Outcome.OFFLINE  # looked up once, not per message
        for position, (msg_id, row, (session, client_id, _, _)) in enumerate(zip(appended.ids, rows, batch,
                                                                                 strict=True)):
            message = _tuple_new(StoredMessage, (msg_id, *row))  # as in commit: no Python-level constructor
            if unusual and position in appended.bad_replies:
                self.refuse(session, client_id, p.Reason.BAD_REPLY)
                continue
            outcome = self._settled(position, appended) if unusual else None
            if outcome is None:
                outcome = self._dispatch(message)
            if outcome is offline:
                self.refuse(session, client_id, p.Reason.OFFLINE)
            else:
                session.send_text(session.codec.ack(client_id, message, outcome))

    def _settled(self, position: int, appended: Appended) -> Outcome | None:
        """The outcome the engine already decided for a message (a retry, an offline recipient), or None."""
        if position in appended.duplicates:
            self.metrics.error("duplicate")
            return Outcome.DUPLICATE
        return Outcome.OFFLINE if position in appended.offline else None

    def _dispatch(self, message: StoredMessage) -> Outcome:
        """Deliver a committed message to the recipient's sessions here."""
        recipients = self.sessions.get(message.recipient)
        if recipients is not None and self._delivered(message, recipients):
            return Outcome.DELIVERED
        if recipients is None and self.engine.presence.is_online(message.recipient):
            return Outcome.DELIVERED  # online on another node (a multi-node engine), which delivers it
        self.metrics.stored += 1
        return Outcome.STORED

    def _delivered(self, message: StoredMessage, recipients: list[Session]) -> bool:
        """Deliver a stored message; False (logged) for one that cannot be encoded, which fails alone."""
        try:
            self._deliver(message, recipients)
        except ChatcliError as exc:
            _log_undeliverable(message, exc)
            return False
        return True

    def _deliver_run(self, messages: Sequence[StoredMessage], recipients: list[Session]) -> None:
        """``_delivered`` for each of one recipient's messages, in order, as one loop per session (the messages
        another node committed come a run at a time: ~0.3 us a message less than a call chain each)."""
        self.metrics.routed += len(messages)
        for recipient in recipients:
            replay = self.replays.get(recipient) if self.replays else None
            upto = recipient.written_upto
            for message in messages:
                if replay is not None:
                    self._hold(replay, message)
                elif message.id > upto:  # else sent already (see _deliver)
                    try:
                        frame = recipient.codec.message(message)
                    except ChatcliError as exc:
                        _log_undeliverable(message, exc)
                        continue
                    recipient.send_text(frame)
                    upto = message.id
            if upto != recipient.written_upto:
                recipient.written(upto)

    # -- delivering ----------------------------------------------------------------------

    def _deliver(self, message: StoredMessage, recipients: list[Session]) -> None:
        """Send ``message`` to each recipient (encoded once per protocol: the codecs cache it), or hold it
        for those still receiving their backlog. Raises ChatcliError when it cannot be encoded."""
        self.metrics.routed += 1
        for recipient in recipients:
            if self.replays and recipient in self.replays:
                self._hold(self.replays[recipient], message)
            elif message.id > recipient.written_upto:  # else sent already (below)
                recipient.send_text(recipient.codec.message(message))
                recipient.written(message.id)
        # A session is sent its messages in id order, so a lower id was sent already: with several nodes, a
        # backlog page read as a message was committed has it, and the node may hand it on live after the
        # page (seen: the first message to a session that just opened, twice, in ~1 run in 4 of
        # benchmarks/redis_cluster.py).

    @staticmethod
    def _hold(replay: Replay, message: StoredMessage) -> None:
        """Keep a live message until the backlog is sent; past HELD_LIMIT, storage has them (read once more)."""
        if replay.overflowed:
            return
        replay.held_chars += len(message.text)
        if len(replay.held) < HELD_LIMIT and replay.held_chars <= HELD_CHARS:
            replay.held.append(message)
        else:
            replay.held.clear()
            replay.overflowed = True

    def _send_stored(self, session: Session, messages: Iterable[StoredMessage]) -> None:
        for message in messages:
            try:
                frame = session.codec.message(message)
            except ChatcliError as exc:
                log.error("skipping stored message %d to %s: %s", message.id, session.user, exc,
                          extra={"event": "bad-stored-message", "msg_id": message.id})
                continue
            session.send_text(frame)
            session.written(message.id)

    # -- replaying a backlog ------------------------------------------------------------

    def _request_page(self, session: Session) -> None:
        """Ask the engine for the next page of ``session``'s backlog."""
        replay = self.replays.get(session)
        if replay is None or not session.is_open:
            return
        # The engine may encode on another thread: the codec's uncached encoder, not its loop-only cache.
        self.engine.read_backlog(session.user, replay.after, replay.since_ts, session.codec.encode_message,
                                 lambda page: self._send_page(session, page))

    def _send_page(self, session: Session, page: BacklogPage | StorageError) -> None:
        """Send a page; ask for the next once it has drained, or end the replay and send what was held."""
        replay = self.replays.get(session)
        if replay is None:  # closed meanwhile
            return
        if isinstance(page, StorageError):
            self._log_storage_failure("read", f"could not read stored messages for {session.user}", page)
            del self.replays[session]
            session.close(CLOSE_STORAGE_FAILED, "cannot read your stored messages: storage failed; try again later")
            return
        for msg_id, frame in page.frames:
            session.send_text(frame)
            session.written(msg_id)
        replay.after, replay.since_ts = page.after, None
        if not page.complete or replay.overflowed:
            replay.overflowed = False
            session.when_drained(lambda: self._request_page(session))
            return
        del self.replays[session]
        self._send_stored(session, (m for m in replay.held if m.id > page.after))


#: Builds a NamedTuple from a tuple of all its fields, without its Python-level constructor.
_tuple_new = tuple.__new__

#: Engine capabilities announced as hello features, in the order hellos list them.
_FEATURES = ((Capability.STORE, p.Feature.STORE), (Capability.RESUME, p.Feature.RESUME),
             (Capability.HISTORY, p.Feature.HISTORY), (Capability.REPLIES, p.Feature.REPLIES),
             (Capability.SEARCH, p.Feature.SEARCH))


def _with_replies(rows: list[NewMessage], replies: dict[int, int]) -> list[NewMessage]:
    """The batch's rows with each reply's ``reply_to`` set (positions in the batch)."""
    return [row._replace(reply_to=replies[position]) if position in replies else row
            for position, row in enumerate(rows)]


def _log_undeliverable(message: StoredMessage, exc: ChatcliError) -> None:
    """The operator's line for a stored message that cannot be encoded: it fails alone, the rest go on."""
    log.error("cannot deliver stored message %d: %s", message.id, exc,
              extra={"event": "bad-stored-message", "msg_id": message.id})
