"""Routing: who is connected, and what happens to each frame a session sends.

Transport-free: sessions are anything with ``user``, ``legacy`` and
``send_text()``; the transport turns WebSocket frames into calls of
``on_legacy_text`` / ``on_native_text`` and writes what sessions are given.

Two modes:

* durable (a ``MessageStore``): every accepted message is committed before it
  is acknowledged or delivered. Messages accepted during one event-loop tick
  are committed together (``schedule`` runs ``commit`` once the tick's reads
  are done), so durability costs one transaction per tick, not per message.
  A recipient with no open session gets the message when it connects.
* ephemeral (no store): delivered at once or refused as ``offline``.

Limits are per user, not per session: ``UserQuota`` counts a user's open sessions
(receiving or not) and holds the one token bucket all of them draw from.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable, Collection, Set
from typing import Final, Protocol

from chatcli import protocol as p
from chatcli.errors import RemoteProtocolError, StorageError
from chatcli.server.config import PresenceMode, ServerConfig
from chatcli.server.metrics import Metrics
from chatcli.server.storage import MessageStore, NewMessage, StoredMessage

log = logging.getLogger("chatcli.server")

#: The ack statuses, read off the enum once: on Python 3.11 ``EnumType.__getattr__`` makes each
#: ``p.Status.X`` look-up ~75 ns slower than a global, and acks are built once per message.
_DELIVERED: Final = p.Status.DELIVERED
_STORED: Final = p.Status.STORED
_REFUSED: Final = p.Status.REFUSED

#: Stored messages sent to a connecting session per loop tick, so a long backlog never stalls others.
REPLAY_PAGE = 500


class Session(Protocol):
    """What routing needs of a connected session."""

    user: str
    legacy: bool
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


class Replay:
    """A session receiving its backlog; live messages wait in ``held`` so that order is kept."""

    __slots__ = ("after", "held", "since_ts")

    def __init__(self, after: int | None, since_ts: float | None) -> None:
        self.after = after
        self.since_ts = since_ts
        self.held: list[StoredMessage] = []


class UserQuota:
    """One user's share of the server: their open sessions, and the token bucket they all draw from.

    The bucket is refilled lazily, only when it runs dry, so a request costs a subtraction and
    no clock read. Over any period it grants at most ``burst + rate * elapsed``.
    """

    __slots__ = ("refilled_at", "sessions", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.sessions = 0
        self.tokens = tokens
        self.refilled_at = now

    def tokens_at(self, now: float, rate: float) -> float:
        """What a refill at ``now`` would give, before the cap at ``burst``."""
        return self.tokens + (now - self.refilled_at) * rate


class Relay:
    """The registry of open sessions and the routing of sends between them."""

    def __init__(self, config: ServerConfig, metrics: Metrics, store: MessageStore | None = None,
                 schedule: Callable[[Callable[[], None]], object] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store
        self.schedule = schedule or (lambda callback: callback())
        self.clock = clock
        self.monotonic = time.monotonic  # for token buckets: immune to wall-clock steps
        # user -> open sessions (receiving or not) and rate limit; kept after the last session closes
        # until the bucket would be full again, so reconnecting does not refill it.
        self.quotas: dict[str, UserQuota] = {}
        self.idle_quotas: set[str] = set()  # users in quotas with no open session
        self.open: set[Session] = set()  # every registered session, receiving or not
        # user -> that user's open sessions; a user may be connected several times.
        self.sessions: dict[str, list[Session]] = {}
        self.replays: dict[Session, Replay] = {}
        self.last_msg_id = 0  # ephemeral mode's id counter
        # The identity announced in every hello: the store's, or this process's (its memory is the store).
        self.epoch = store.epoch if store is not None else secrets.token_hex(16)
        # Accepted this tick, committed together: (sender session, client id, recipient, text).
        self.pending: list[tuple[Session, str | None, str, str]] = []
        self.cursor_updates: dict[str, int] = {}
        self.commit_scheduled = False
        self.batch_started = 0.0
        # Presence: who watches whom, both ways, so a closing session is forgotten in O(its watches).
        self.watchers: dict[str, set[Session]] = {}
        self.watching: dict[Session, tuple[str, ...]] = {}
        # --presence contacts: (watcher's user, watched user) -> the watcher's sessions told "hidden",
        # until the two exchange a message (see _reveal).
        self.hidden_watchers: dict[tuple[str, str], set[Session]] = {}

    @property
    def features(self) -> tuple[str, ...]:
        stored = (p.Feature.STORE, p.Feature.RESUME, p.Feature.HISTORY) if self.store is not None else ()
        return (*stored, p.Feature.PRESENCE) if self.config.presence != "off" else stored

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
            self._announce(session.user, online=True)
        if self.store is not None:
            self.replays[session] = Replay(after, since_ts)
            self._replay_page(session)

    def resume_after(self, user: str, after: int | None, epoch: str | None) -> tuple[int | None, bool]:
        """Where a session resuming after message ``after`` of store ``epoch`` starts; True if that is a reset.

        An id from another store (another epoch), or above every id this store gave out (a restored
        backup, or a client whose epoch is unknown), is no position here: skipping up to it would
        drop this store's messages, so the backlog starts at this store's beginning instead.
        """
        if after is None or ((epoch is None or epoch == self.epoch) and after <= self._highest_id()):
            return after, False
        log.info("%s resumes after message %d of another store (epoch %s): replaying from the beginning",
                 user, after, epoch or "unknown", extra={"event": "cursor-reset", "user": user})
        return 0, True

    def _highest_id(self) -> int:
        if self.store is None:
            return self.last_msg_id
        try:
            return self.store.highest_id()
        except StorageError as exc:  # cannot tell: trust the client's id, as before epochs existed
            log.error("could not read the highest message id: %s", exc, extra={"event": "storage-error"})
            return p.MAX_INT

    def close_session(self, session: Session) -> None:
        """Remove exactly this session; the user's other sessions stay reachable."""
        self.replays.pop(session, None)
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
            self._announce(session.user, online=False)

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
        return sorted(self.sessions)

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
            frame = p.parse_client_frame(text)
        except RemoteProtocolError as exc:
            self.metrics.error(exc.code)
            session.send_text(p.encode(p.Error(exc.code, exc.message)))
            return
        if isinstance(frame, p.Send):
            self.submit(session, frame.id, frame.to, frame.text)  # charged there, refused with an ack
        elif not self.take_token(session.user):
            self._rate_limited(session, frame)
        elif isinstance(frame, p.Received):
            self._received(session, frame.id)
        elif isinstance(frame, p.HistoryRequest):
            self._history(session, frame)
        elif isinstance(frame, p.WhoRequest):
            self._who(session, frame)
        else:
            self._watch(session, frame.users)

    def _rate_limited(self, session: Session, frame: p.ClientFrame) -> None:
        """A request over the user's rate limit: an error naming it; a ``received`` is just dropped
        (a later one advances the cursor as far)."""
        self.metrics.error(p.ErrorCode.RATE_LIMITED)
        if isinstance(frame, p.Received):
            return
        details = {"id": frame.id} if isinstance(frame, p.HistoryRequest | p.WhoRequest) else {}
        session.send_text(p.encode(p.Error(
            p.ErrorCode.RATE_LIMITED, f"too many requests: {session.user} may make {self.config.rate:g} per "
            f"second (bursts of {self.config.burst}) over all sessions; ask again later", details)))

    # -- presence --------------------------------------------------------------------

    def presence_mode(self, session: Session) -> PresenceMode:
        """Whose presence ``session`` sees: ``--presence``, else contacts only once tokens prove who asks."""
        mode = self.config.presence
        if mode is None:
            mode = "contacts" if session.authenticated else "all"
        return "all" if mode == "contacts" and self.store is None else mode

    def _presence_off(self, session: Session) -> None:
        session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                           "this server does not show who is online (--presence off)")))

    def _visible(self, session: Session, users: Set[str]) -> set[str] | None:
        """Which of ``users`` (online or not) ``session`` may see under --presence contacts: its own
        user and those it exchanged a message with. None (after telling the session) if unreadable."""
        assert self.store is not None
        me = session.user
        try:
            visible = self.store.contacts_among(me, users)
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
        online: Collection[str] = self.sessions
        if mode == "contacts":
            visible = self._visible(session, self.sessions.keys())
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
        visible: set[str] | None = None  # None: every user is visible
        if mode == "contacts" and users:
            visible = self._visible(session, set(users))
            if visible is None:
                return
        self.watching[session] = users
        for user in users:
            if visible is None or user in visible:
                self.watchers.setdefault(user, set()).add(session)
                session.send_text(p.encode(p.Presence(user, user in self.sessions)))
            else:
                self.hidden_watchers.setdefault((session.user, user), set()).add(session)
                session.send_text(p.encode(p.Presence(user, False, hidden=True)))

    def _reveal(self, rows: list[NewMessage]) -> None:
        """Messages were stored: whoever watched their other party hidden may see it now."""
        hidden = self.hidden_watchers
        for row in rows:
            for watcher, watched in ((row.sender, row.recipient), (row.recipient, row.sender)):
                sessions = hidden.pop((watcher, watched), None)
                if sessions:
                    self.watchers.setdefault(watched, set()).update(sessions)
                    frame = p.encode(p.Presence(watched, watched in self.sessions))
                    for session in sessions:
                        session.send_text(frame)

    def on_binary(self, session: Session) -> None:
        self.metrics.error(p.ErrorCode.BINARY_UNSUPPORTED)
        if session.legacy:
            session.send_text(p.LEGACY_SEND_ERROR)
        else:
            session.send_text(p.encode(p.Error(p.ErrorCode.BINARY_UNSUPPORTED,
                                               "binary frames are not supported: send JSON text frames")))

    def _received(self, session: Session, msg_id: int) -> None:
        # Never past what this session was sent: a cursor beyond it would skip messages not yet delivered.
        self.confirm_received(session.user, min(msg_id, session.written_upto))

    def confirm_received(self, user: str, msg_id: int) -> None:
        """``user`` has every message up to ``msg_id``: advance its cursor with the next commit."""
        if self.store is not None and msg_id > self.cursor_updates.get(user, 0):
            self.cursor_updates[user] = msg_id
            self._schedule_commit()

    def _history(self, session: Session, request: p.HistoryRequest) -> None:
        if self.store is None:
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE,
                                               "this server stores no messages (--ephemeral): no history")))
            return
        try:
            stored = self.store.history(session.user, request.peer, request.limit, request.before)
        except StorageError as exc:
            log.error("could not read history for %s: %s", session.user, exc, extra={"event": "storage-error"})
            session.send_text(p.encode(p.Error(p.ErrorCode.UNAVAILABLE, "history is unavailable right now")))
            return
        messages = tuple(self._message(m) for m in stored)
        session.send_text(p.encode(p.History(request.id, request.peer, messages)))

    # -- accepting a message ---------------------------------------------------------

    def submit(self, session: Session, client_id: str | None, to: str, text: str) -> None:
        """Accept a message for ``to`` or refuse it; either way the sender gets exactly one ack."""
        reason = (p.check_text(text, self.config.max_text_bytes) if self.take_token(session.user)
                  else p.Reason.RATE_LIMITED)
        if reason is None and to not in self.sessions and not p.is_valid_user_id(to):  # online ids are valid
            reason = p.Reason.BAD_RECIPIENT
        if reason is not None:
            self.refuse(session, client_id, reason)
        elif self.store is not None:
            if not self.pending:
                self.batch_started = self.clock()
            self.pending.append((session, client_id, to, text))
            self._schedule_commit()
        else:
            self._route_ephemeral(session, client_id, to, text)

    def refuse(self, session: Session, client_id: str | None, reason: str) -> None:
        self.metrics.refused(reason)
        if session.legacy:
            session.send_text(p.LEGACY_SEND_ERROR)
        else:
            session.send_text(p.encode(p.Ack(client_id or "", _REFUSED, reason=reason)))

    def _route_ephemeral(self, session: Session, client_id: str | None, to: str, text: str) -> None:
        recipients = self.sessions.get(to)
        if recipients is None:
            self.refuse(session, client_id, p.Reason.OFFLINE)
            return
        self.last_msg_id += 1
        message = StoredMessage(self.last_msg_id, session.user, to, text, self.clock(), client_id)
        self._deliver(message, recipients)
        self._ack(session, client_id, message, _DELIVERED)
        self.metrics.ack_latency.observe(0.0)  # acknowledged while handling the frame

    def _schedule_commit(self) -> None:
        if not self.commit_scheduled:
            self.commit_scheduled = True
            self.schedule(self.commit)

    def commit(self) -> None:
        """Store this tick's messages in one transaction, then deliver and acknowledge each."""
        self.commit_scheduled = False
        store = self.store
        assert store is not None
        batch, self.pending = self.pending, []
        updates, self.cursor_updates = self.cursor_updates, {}
        now = self.clock()  # one accept time per tick: the batch is accepted together
        rows = [NewMessage(session.user, to, text, now, client_id) for session, client_id, to, text in batch]
        try:
            appended = store.append(rows, updates)
        except StorageError as exc:
            log.error("could not store %d message(s): %s", len(batch), exc, extra={"event": "storage-error"})
            for session, client_id, _, _ in batch:
                self.refuse(session, client_id, p.Reason.STORAGE_FAILED)
            return  # lost cursor updates only cost a repeat delivery later, never a loss
        if batch:
            self.metrics.ack_latency.observe(self.clock() - self.batch_started, len(batch))
        if self.hidden_watchers:  # rare: someone watches a user they have not talked to yet
            self._reveal(rows)
        duplicates = appended.duplicates
        for position, (msg_id, row, (session, client_id, _, _)) in enumerate(zip(appended.ids, rows, batch,
                                                                                 strict=True)):
            message = StoredMessage(msg_id, *row)
            if duplicates and position in duplicates:
                self.metrics.error("duplicate")
                self._ack(session, client_id, message, _STORED, duplicate=True)
            else:
                self._dispatch(session, client_id, message)

    def _dispatch(self, session: Session, client_id: str | None, message: StoredMessage) -> None:
        recipients = self.sessions.get(message.recipient)
        if recipients is None:
            self.metrics.stored += 1
            self._ack(session, client_id, message, _STORED)
        else:
            self._deliver(message, recipients)
            self._ack(session, client_id, message, _DELIVERED)

    def _ack(self, session: Session, client_id: str | None, message: StoredMessage, status: str,
             duplicate: bool = False) -> None:
        if session.legacy:
            session.send_text(p.LEGACY_SEND_SUCCESS)
        else:
            session.send_text(p.encode(p.Ack(client_id or "", status, msg_id=message.id,
                                             ts=p.format_ts(message.ts), duplicate=duplicate)))

    # -- delivering ----------------------------------------------------------------------

    def _deliver(self, message: StoredMessage, recipients: list[Session]) -> None:
        self.metrics.routed += 1
        legacy_frame = native_frame = None
        for recipient in recipients:
            if self.replays and recipient in self.replays:
                self.replays[recipient].held.append(message)
            elif recipient.legacy:
                if legacy_frame is None:
                    legacy_frame = p.encode_legacy_message(message.sender, message.text)
                recipient.send_text(legacy_frame)
                recipient.written(message.id)
            else:
                if native_frame is None:
                    native_frame = p.encode(self._message(message))
                recipient.send_text(native_frame)
                recipient.written(message.id)

    def _send_stored(self, session: Session, message: StoredMessage) -> None:
        if session.legacy:
            session.send_text(p.encode_legacy_message(message.sender, message.text))
            session.written(message.id)
        else:
            session.send_text(p.encode(self._message(message)))
            session.written(message.id)

    @staticmethod
    def _message(stored: StoredMessage) -> p.Message:
        return p.Message(stored.id, stored.sender, stored.recipient, stored.text, p.format_ts(stored.ts))

    def _replay_page(self, session: Session) -> None:
        """Send one page of the backlog; schedule the next, or release the messages held meanwhile."""
        replay = self.replays.get(session)
        if replay is None or self.store is None or not session.is_open:
            return
        try:
            if replay.since_ts is None and replay.after is None:
                page = self.store.pending(session.user, limit=REPLAY_PAGE)
            else:
                page = self.store.messages_to(session.user, replay.after, replay.since_ts, REPLAY_PAGE)
        except StorageError as exc:
            log.error("could not read stored messages for %s: %s", session.user, exc,
                      extra={"event": "storage-error"})
            page = []
        for message in page:
            self._send_stored(session, message)
        if page:
            replay.after = page[-1].id
        if len(page) == REPLAY_PAGE:
            self.schedule(lambda: self._replay_page(session))
            return
        del self.replays[session]
        last = replay.after or 0
        for message in replay.held:
            if message.id > last:  # a held message may also have come in the last page
                self._send_stored(session, message)
