"""The Redis engine (``chatcli serve --redis URL``): any number of nodes on one Redis act as one server.

Modelled on Centrifugo's Redis engine. Each message is committed by one Lua script
(``redis_lua.COMMIT``) that also appends it to its recipient's inbox stream and
publishes it on the recipient's own channel; a tick's messages go to Redis as one
pipeline, and the relay acks them only once Redis answered.

Delivery to the sessions on this node that another node's messages are for: the
node subscribes to the channel of every user with a session here (and unsubscribes
when their last session leaves) and tracks, per user, the inbox sequence it has handed
to the relay. A message with the next sequence is delivered; an older one is a
duplicate and dropped; a newer one means some were missed (the subscription dropped,
Redis restarted, a slow subscriber was cut off), so the gap is read from the stream.
Every ``REFRESH_S`` the node also compares each user's sequence in Redis with its own,
which catches a subscription that went deaf without an error.

Everything that moves those sequences (this node's commits, messages from the
channels, gap reads) runs in one queue, in order (the "lane"), so a message is never
handed to the relay twice nor before an older one, whichever connection brought it.

If Redis goes away, sends are refused at once (``EngineUnavailable``), sessions stay
open, and the node retries with backoff; once back, every user's gap is filled.

The chat's read positions and inbox (issue 12) live in each user's read hash (``redis_lua.MARK_READ``,
``UNREAD``, ``LAST_IDS``); its live events (typing, receipts, read positions) cross nodes on each
user's events channel (``pass_on``), never stored. Replies are checked inside the commit script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import redis as sync_redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatcli import protocol as p
from chatcli.errors import EngineUnavailable, StorageError
from chatcli.server.engine.base import (
    Appended,
    BacklogPage,
    Capability,
    ConversationSummary,
    Encoder,
    EngineListener,
    InboxPage,
    NewMessage,
    ReadMarks,
    StoredMessage,
)
from chatcli.server.engine.pages import (
    REPLAY_PAGE,
    SearchScan,
    read_backlog_page,
    read_history_answer,
    read_search_answer,
)
from chatcli.server.engine.redis_accounts import RedisAccountStore
from chatcli.server.engine.redis_lua import (
    COMMIT,
    CURSOR,
    EPOCH_KEY,
    IDEMPOTENCY_TTL_S,
    IDS_KEY,
    LAST_IDS,
    MARK_READ,
    NEWEST_KEY,
    PRUNE_RUNS,
    UNREAD,
    UNREAD_COUNT_MAX,
    USERS_KEY,
    channel,
    channel_user,
    contacts_key,
    counts_key,
    entry_number,
    events_channel,
    events_user,
    inbox_key,
    meta_key,
    peer_key,
    published_records,
    reads_key,
    run_ids,
)
from chatcli.server.engine.redis_presence import (
    PRESENCE_CHANNEL,
    PRESENCE_KEY,
    PRESENCE_TTL_S,
    REFRESH_S,
    ClusterPresence,
)
from chatcli.server.engine.redis_search import Stream, query_words, scan_streams
from chatcli.server.engine.redis_setup import Guarantee, check_guarantee, redact
from chatcli.server.metrics import Histogram

__all__ = ["RedisEngine"]

log = logging.getLogger("chatcli.server")

#: A command waits this long for Redis before the node counts it as gone (not the Pub/Sub connection,
#: which waits for messages for ever: ``socket_timeout=None`` there).
COMMAND_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 2.0
#: Reconnection backoff: from the first to the longest wait.
BACKOFF_S: Final = (0.05, 2.0)
#: Published payloads held waiting for the lane at most (beyond, the streams have them: ``_published``).
LANE_BYTES: Final = 16 * 1024 * 1024
#: A session's backlog read waits this long for its user's subscription to be in place.
SUBSCRIBE_WAIT_S: Final = 5.0
#: The round-trip buckets (seconds) of /metrics' chatcli_redis_roundtrip_seconds.
ROUNDTRIP_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
#: Cursor moves committed without a message wait this long at most, gathered (a message commit takes them
#: along at once): a node delivering to seed apps moves cursors on nearly every tick, and every commit is
#: an fsync in Redis under appendfsync always (measured: ~1 us of CPU per message, and stalls).
CURSOR_DELAY_S: Final = 0.05
#: Contacts the inbox looks at, at most (as the SQLite engine): each costs two stream lookups in Redis.
INBOX_CONTACTS_MAX: Final = 10_000
#: Streams whose newest id one LAST_IDS call reads: Redis runs each call at once, so a user with thousands
#: of contacts takes it in slices of ~100 µs, not one long stall; and the newest entries a call copies
#: into Lua (texts included, never sent) stay within 64 texts.
LAST_IDS_KEYS: Final = 64

#: Lane jobs: done at once (None) or a coroutine the lane awaits before the next job.
_Job = Callable[[], Awaitable[None] | None]


class _Packed(NamedTuple):
    """Command arguments already in RESP, ``arg_count`` of them: what ``_commit_args`` makes."""

    arg_count: int
    data: bytes


#: A script call for ``_run_scripts``: (script name in ``_SCRIPTS``, keys, arguments).
_Call = tuple[str, list[str], list[Any] | _Packed]


@dataclass(slots=True)
class _Track:
    """What this node handed the relay of one user's inbox: the sequence and the id of the last one."""

    seq: int | None = None  # None until read once the subscription is in place
    top: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class RedisEngine:
    """``Engine`` of one node of a cluster sharing a Redis."""

    name = "redis"
    capabilities: frozenset[Capability] = frozenset(Capability)

    def __init__(self, url: str, client: aioredis.Redis, epoch: str, newest_ts: float, highest_id: int,
                 guarantee: Guarantee) -> None:
        self.url = url
        self.epoch = epoch
        self.newest_ts = newest_ts
        self.guarantee = guarantee
        self.accounts = RedisAccountStore(url)
        #: For the answers the relay needs within a frame (contacts), like the accounts' handshake checks.
        self._blocking: Any = sync_redis.Redis.from_url(url, socket_timeout=CONNECT_TIMEOUT_S,
                                                        socket_connect_timeout=CONNECT_TIMEOUT_S)
        self.node = secrets.token_hex(6)
        self._node_bytes = self.node.encode()
        self.presence = ClusterPresence(self.node, self._presence_changed, self._local_presence)
        #: redis-py's command types are too loose to check replies against (bytes | str | None): Any.
        self._redis: Any = client
        self._highest_id = highest_id
        self._listener: EngineListener | None = None
        self._tracks: dict[str, _Track] = {}
        self._lane: asyncio.Queue[_Job] = asyncio.Queue()
        self._lane_busy = False  # a job is running (it may be waiting for Redis)
        self._lane_bytes = 0  # published payloads waiting in the lane
        self._lane_full = False
        self._reads: set[asyncio.Task[Any]] = set()
        self._pubsub: aioredis.connection.AbstractConnection | None = None
        self._available = True
        self._error: str | None = None
        self._shas: dict[str, str] = {}
        self.roundtrip = Histogram(ROUNDTRIP_BUCKETS, [0] * (len(ROUNDTRIP_BUCKETS) + 1))
        self.batch_sizes = Histogram(BATCH_BUCKETS, [0] * (len(BATCH_BUCKETS) + 1))
        self.reconnects = 0
        self._used_memory = 0  # Redis's used_memory, as of the last look (start-up, then every REFRESH_S)
        self.gaps_filled = 0
        self._cursors: dict[str, int] = {}  # cursor moves waiting for CURSOR_DELAY_S or a message commit
        self._cursor_timer: asyncio.TimerHandle | None = None
        #: Set by ``close``: the background loops stop on it too, not only on cancellation, which redis-py
        #: can swallow (a transaction pipeline did, in ~1 close in 8 of the contract tests: close hung).
        self._closed = False
        self._tasks = [asyncio.get_running_loop().create_task(job()) for job in
                       (self._run_lane, self._listen_forever, self._keep_forever)]

    @classmethod
    async def open(cls, url: str, strict: bool) -> RedisEngine:
        """Connect, check what Redis promises (``redis_setup``), and join the store (making its epoch if new).
        Raises StorageError (with the reason) when the node must not start."""
        client: Any = aioredis.Redis.from_url(url, socket_timeout=COMMAND_TIMEOUT_S,
                                              socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
                                              protocol=2)
        try:
            guarantee = await check_guarantee(client, strict)
            await client.set(EPOCH_KEY, secrets.token_hex(16), nx=True)
            epoch, ids, newest = await client.mget(EPOCH_KEY, IDS_KEY, NEWEST_KEY)
            memory = await client.info("memory")
        except RedisError as exc:
            await client.aclose()
            raise StorageError(f"cannot use Redis at {redact(url)}: {exc}") from exc
        except BaseException:
            await client.aclose()
            raise
        engine = cls(url, client, epoch.decode(), float(newest or 0), int(ids or 0), guarantee)
        engine._used_memory = int(memory.get("used_memory", 0))
        return engine

    def attach(self, listener: EngineListener) -> None:
        self._listener = listener

    def highest_id(self) -> int:
        """The highest id known here; another node may have given out higher ones a moment ago, so a
        handshake cannot tell a future id from a lost one: see ``_check_store`` for the loss."""
        return p.MAX_INT if self._highest_id else 0

    # -- commit ------------------------------------------------------------------------------------

    def append(self, batch: Sequence[NewMessage], cursors: Mapping[str, int],
               done: Callable[[Appended | StorageError], None]) -> None:
        if not self._available:  # refused at once: nothing is acked that is not stored
            done(self._unavailable())
            return
        if not batch:  # nothing to ack: the moves wait (a lost move only costs a repeat delivery, never a loss)
            for user, upto in cursors.items():
                self._cursors[user] = max(upto, self._cursors.get(user, 0))
            if self._cursors and self._cursor_timer is None:
                self._cursor_timer = asyncio.get_running_loop().call_later(CURSOR_DELAY_S, self._write_cursors)
            done(Appended([], frozenset()))
            return
        moves = self._take_cursors()
        for user, upto in cursors.items():
            moves[user] = max(upto, moves.get(user, 0))
        self._lane.put_nowait(lambda: self._commit(list(batch), moves, done))

    def _take_cursors(self) -> dict[str, int]:
        moves, self._cursors = self._cursors, {}
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
            self._cursor_timer = None
        return moves

    def _write_cursors(self) -> None:
        """Commit the cursor moves waiting (after CURSOR_DELAY_S, a user's last session here closing, settle)."""
        moves = self._take_cursors()
        if moves:
            self._lane.put_nowait(lambda: self._commit([], moves, lambda _: None))  # failures: _went_down logs

    async def _commit(self, batch: list[NewMessage], cursors: dict[str, int],
                      done: Callable[[Appended | StorageError], None]) -> None:
        """Commit, then answer ``done`` whatever happened: a batch left unanswered would have its senders
        wait for acks for ever, and the relay's later batches behind it."""
        try:
            outcome = await self._committed(batch, cursors)
        except Exception as exc:  # a bug, not Redis: refuse this batch, keep the node serving
            log.exception("redis engine: a commit failed", extra={"event": "redis-error"})
            outcome = StorageError(f"internal error: {exc}")
        done(outcome)

    async def _committed(self, batch: list[NewMessage], cursors: dict[str, int]) -> Appended | StorageError:
        calls: list[_Call] = []
        if batch:
            calls.append(("commit", [EPOCH_KEY, IDS_KEY, USERS_KEY, NEWEST_KEY], _commit_args(self.epoch, batch)))
        if cursors:
            calls.append(("cursor", [meta_key(user) for user in cursors], list(cursors.values())))
        started = time.monotonic()
        try:
            results = await self._run_scripts(calls)
        except RedisError as exc:
            return self._went_down(exc)
        self.roundtrip.observe(time.monotonic() - started)
        if batch:
            self.batch_sizes.observe(len(batch))
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            return StorageError(f"Redis refused the commit: {failed}")
        return await self._settle_commit(batch, results[0]) if batch else Appended([], frozenset())

    async def _settle_commit(self, batch: list[NewMessage], answer: list[Any]) -> Appended | StorageError:
        """What the relay acks: each message's id (``redis_lua.COMMIT`` answers per batch: the new messages
        took the ids after ``before`` in batch order, and each recipient's sequences after its own). First this
        node's tracks are brought up to the batch (a gap before it is read and handed on first), so that the
        relay's own delivery of it comes in order."""
        if answer == [-1]:
            await self._store_replaced("a commit found another store")
            return EngineUnavailable("the message store was reset (a new epoch): send again")
        before, duplicates, sequences, refused = answer
        originals = dict(zip(duplicates[0::2], duplicates[1::2], strict=True))
        bad_replies = frozenset(refused)
        ids = _new_ids(before, len(batch), originals, bad_replies)
        for recipient, seq_before in zip(sequences[0::2], sequences[1::2], strict=True):
            user = recipient.decode()
            track = self._tracks.get(user)
            if track is not None and track.seq is not None:  # a recipient with a session on this node
                theirs = [ids[at] for at, message in enumerate(batch)
                          if message.recipient == user and at not in originals and at not in bad_replies]
                if seq_before > track.seq:
                    await self._catch_up(user, before=theirs[0])
                track.seq, track.top = max(track.seq, seq_before + len(theirs)), max(track.top, theirs[-1])
        self._highest_id = max(self._highest_id, before + len(batch) - len(originals) - len(bad_replies))
        return Appended(ids, frozenset(originals), bad_replies=bad_replies)

    async def _run_scripts(self, calls: list[_Call]) -> list[Any]:
        """Run (script, keys, args) calls as one pipeline; scripts Redis forgot (a restart) are loaded
        and the calls it refused for that run again, in order. Raises RedisError if Redis is out of reach."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            packed = b"".join(_evalsha(self._shas.get(calls[i][0], _NO_SHA), *calls[i][1:]) for i in todo)
            answers = await self._exchange(packed, len(todo))
            for i, answer in zip(todo, answers, strict=True):
                results[i] = answer
            todo = [i for i in todo if isinstance(results[i], NoScriptError)]
            if not todo:
                break
            for script in {calls[i][0] for i in todo}:
                self._shas[script] = await self._redis.script_load(_SCRIPTS[script])
        return results

    async def _exchange(self, packed: bytes, replies: int) -> list[Any]:
        """Send packed commands on one connection of the pool and read their replies (an error reply is
        returned, not raised). redis-py's pipeline encodes every argument in Python, which cost more
        than the rest of a commit (profiled); the commands here are packed by ``_pack``."""
        pool = self._redis.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(packed, check_health=False)
            answers: list[Any] = []
            for _ in range(replies):
                try:
                    answers.append(await connection.read_response())
                except ResponseError as exc:  # the stream stays aligned: one reply per command
                    answers.append(exc)
            return answers
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    # -- the lane: everything that moves a user's delivered sequence, in order ---------------------------

    async def _run_lane(self) -> None:
        while not self._closed:
            job = await self._lane.get()
            self._lane_busy = True
            try:
                pending = job()
                if pending is not None:
                    await pending
            except RedisError as exc:
                self._went_down(exc)
            except Exception:  # a bug must not stop delivery for everyone
                log.exception("redis engine: a delivery step failed", extra={"event": "redis-error"})
            finally:
                self._lane_busy = False

    def _in_lane(self, job: _Job) -> None:
        """Run ``job`` now if the lane is idle (the common case for a message from a channel: no queue hop),
        else after what is queued; what it leaves to wait for goes to the lane."""
        if self._lane_busy or not self._lane.empty():
            self._lane.put_nowait(job)
            return
        try:
            pending = job()
        except Exception:
            log.exception("redis engine: a delivery step failed", extra={"event": "redis-error"})
            return
        if pending is not None:
            self._lane.put_nowait(lambda: pending)

    def _on_published(self, user: str, payload: bytes) -> Awaitable[None] | None:
        """Messages from ``user``'s channel: the next one is handed on, an older one dropped, a newer one
        means a gap: it and the rest are read from the stream."""
        track, listener = self._tracks.get(user), self._listener
        if track is None or track.seq is None or listener is None:
            return None  # not subscribed any more, or the track's first read is still to come
        run: list[StoredMessage] = []  # handed on together: the relay delivers a run in one loop
        seq, top = track.seq, track.top  # kept in locals, written back once: this runs for every message
        try:
            for msg_id, next_seq, ts, sender, reply_to, text in published_records(payload):
                if next_seq <= seq:
                    continue
                if next_seq > seq + 1:
                    return self._catch_up(user)
                seq, top = next_seq, msg_id
                # tuple.__new__: StoredMessage(...) is a Python-level constructor, ~0.2 us more per message
                run.append(tuple.__new__(StoredMessage, (msg_id, sender, user, text, ts, None, reply_to)))
        finally:  # what came before a gap or a bad record is handed on first, the gap's read after it
            track.seq, track.top = seq, top
            self._highest_id = max(self._highest_id, top)
            if run:
                listener.messages_committed_elsewhere(user, run)
        return None

    async def _catch_up(self, user: str, before: int | None = None) -> None:
        """Hand on what ``user``'s inbox has after the track's last (and before ``before``)."""
        track = self._tracks.get(user)
        if track is None or track.seq is None:
            return
        end = "+" if before is None else f"({before}-0"
        while True:
            entries = await self._redis.xrange(inbox_key(user), f"({track.top}-0", end, count=REPLAY_PAGE)
            run: list[StoredMessage] = []
            try:
                for entry_id, fields in entries:
                    seq = int(fields[b"s"])
                    if seq > track.seq:
                        self.gaps_filled += 1
                        track.seq, track.top = seq, entry_number(entry_id)
                        run.append(_stored(track.top, user, fields))
            finally:  # a page at a time (what came before an unreadable entry too)
                if run and self._listener is not None:
                    self._listener.messages_committed_elsewhere(user, run)
            if len(entries) < REPLAY_PAGE:
                return

    async def _start_track(self, user: str) -> None:
        """The subscription is in place: where ``user``'s inbox is now (older messages are the backlog's),
        or, for a track that had started, whatever came meanwhile."""
        track = self._tracks.get(user)
        if track is None:
            return
        if track.seq is not None:
            await self._catch_up(user)
            return
        pipe = self._redis.pipeline(transaction=True)  # the sequence and the newest entry, at one instant
        pipe.hget(meta_key(user), "s")
        pipe.xrevrange(inbox_key(user), "+", "-", count=1)
        seq, newest = await pipe.execute()
        track.seq, track.top = int(seq or 0), entry_number(newest[0][0]) if newest else 0
        track.ready.set()

    # -- subscriptions and presence ------------------------------------------------------------------

    def _local_presence(self, user: str, joined: bool) -> None:
        """The relay's first session of ``user`` opened here, or its last closed."""
        if joined:
            self._tracks[user] = _Track()
        else:
            self._tracks.pop(user, None)
            if user in self._cursors:  # where they reconnect (any node) resumes from there: written now
                self._write_cursors()
        self._background(self._announce(user, joined))

    async def _announce(self, user: str, joined: bool) -> None:
        member = self.presence.member(user)
        command = "SUBSCRIBE" if joined else "UNSUBSCRIBE"
        if self._pubsub is not None:
            await self._pubsub.send_command(command, channel(user), events_channel(user), check_health=False)
        pipe = self._redis.pipeline(transaction=False)
        if joined:
            pipe.zadd(PRESENCE_KEY, {member: time.time() + PRESENCE_TTL_S})
        else:
            pipe.zrem(PRESENCE_KEY, member)
        pipe.publish(PRESENCE_CHANNEL, ("+" if joined else "-") + member)
        await pipe.execute()

    def _presence_changed(self, user: str, online: bool) -> None:
        if self._listener is not None:
            self._listener.presence_changed(user, online)

    async def _listen_forever(self) -> None:
        """Keep one Pub/Sub connection subscribed to this node's users' channels; reconnect with backoff."""
        # RESP2: its subscription replies are plain replies (RESP3 makes them pushes, read elsewhere).
        pool = aioredis.ConnectionPool.from_url(self.url, socket_timeout=None, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                                protocol=2)
        wait = 0.0
        while not self._closed:
            await asyncio.sleep(wait)
            connection = pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.connect()
            except (RedisError, OSError) as exc:  # Redis itself is out of reach
                self._went_down(exc)
                wait = min(max(wait * 2, BACKOFF_S[0]), BACKOFF_S[1])
                continue
            try:
                # The confirmations start each user's track, or fill what it missed (_start_track).
                users = list(self._tracks)
                await connection.send_command("SUBSCRIBE", PRESENCE_CHANNEL, *map(channel, users),
                                              *map(events_channel, users), check_health=False)
                self._pubsub, wait = connection, 0.0
                while not self._closed:
                    self._on_pubsub(await connection.read_response(timeout=math.inf))  # wait for ever
            except (RedisError, OSError) as exc:  # dropped (or killed, CLIENT KILL): subscribe again at once
                log.warning("the Pub/Sub connection to Redis dropped (%s): subscribing again", exc,
                            extra={"event": "redis-pubsub-lost"})
                self.reconnects += 1
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await connection.disconnect()

    def _on_pubsub(self, response: Any) -> None:
        kind, name, data = response[0], response[1], response[2]
        if kind == b"message":
            if name == _PRESENCE_CHANNEL_BYTES:
                self.presence.on_event(data)
            elif (user := events_user(name)) is not None:
                self._live_event(user, data)
            else:
                self._published(channel_user(name), data)
        elif kind == b"subscribe" and name != _PRESENCE_CHANNEL_BYTES and events_user(name) is None:
            user = channel_user(name)
            self._lane.put_nowait(lambda: self._start_track(user))

    def _published(self, user: str, data: bytes) -> None:
        """Hand a published batch to the lane. While the lane is behind by ``LANE_BYTES`` (Redis slow to
        answer a commit under load), the batch is dropped instead of held: it is in the stream, and the
        next check of the user's sequence (within ``REFRESH_S``) reads it from there."""
        if self._lane_bytes + len(data) > LANE_BYTES:
            if not self._lane_full:
                log.warning("delivery from Redis is %d bytes behind: reading the rest from the streams",
                            self._lane_bytes, extra={"event": "redis-lane-full"})
            self._lane_full = True
            return
        self._lane_full = False
        self._lane_bytes += len(data)

        def job() -> Awaitable[None] | None:
            self._lane_bytes -= len(data)
            return self._on_published(user, data)

        self._in_lane(job)

    def _live_event(self, user: str, data: bytes) -> None:
        """Another node's live event for ``user`` ("NODE\nFRAME"): handed on in the lane, behind the messages
        that came before it. Held within ``LANE_BYTES`` like messages; past it dropped (never stored anyway)."""
        node, _, frame = data.partition(b"\n")
        if node == self._node_bytes or self._lane_bytes + len(data) > LANE_BYTES:
            return  # our own (this node told its sessions itself), or no room
        self._lane_bytes += len(data)
        text = frame.decode(errors="replace")  # written by a node from a frame: UTF-8 unless Redis was tampered with

        def job() -> None:
            self._lane_bytes -= len(data)
            if self._listener is not None:
                self._listener.live_event(user, text)

        self._in_lane(job)

    # -- the keeper: presence heartbeat, deaf subscriptions, the store's identity, Redis coming back -----

    async def _keep_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(REFRESH_S if self._available else BACKOFF_S[0] * 4)
            try:
                await self._keep()
            except RedisError as exc:
                self._went_down(exc)

    async def _keep(self) -> None:
        now, seen = time.time(), self._highest_id  # ids handed on while waiting are not Redis's past
        watched = [user for user, track in self._tracks.items() if track.seq is not None]
        pipe = self._redis.pipeline(transaction=False)
        pipe.mget(EPOCH_KEY, IDS_KEY)
        pipe.info("memory")
        if self.presence.local:
            pipe.zadd(PRESENCE_KEY, {self.presence.member(u): now + PRESENCE_TTL_S for u in self.presence.local})
        pipe.zremrangebyscore(PRESENCE_KEY, "-inf", now - 60)  # entries of nodes long gone
        pipe.zrangebyscore(PRESENCE_KEY, now, "+inf")
        for user in watched:
            pipe.hget(meta_key(user), "s")
        answers = await pipe.execute()
        (epoch, ids), memory = answers[0], answers[1]
        live, tops = answers[-1 - len(watched)], answers[len(answers) - len(watched):]
        self._used_memory = int(memory.get("used_memory", 0))
        if not self._available:
            self._came_back()
        if await self._check_store(epoch, ids, seen):
            return
        self.presence.replace_remote(live)
        for user, top in zip(watched, tops, strict=True):
            track = self._tracks.get(user)
            if track is not None and track.seq is not None and int(top or 0) > track.seq:
                self._lane.put_nowait(lambda user=user: self._catch_up(user))  # type: ignore[misc]

    async def _check_store(self, epoch: bytes | None, ids: bytes | None, seen: int) -> bool:
        """True (after adopting the new store) if Redis holds another store than the one this node joined:
        wiped (FLUSHALL), replaced, or restored to a point before ids this node saw (messages lost)."""
        if epoch is not None and epoch.decode() == self.epoch and int(ids or 0) >= seen:
            return False
        why = "the store was wiped or replaced" if epoch is None or epoch.decode() != self.epoch else (
            f"Redis lost messages: its last id is {int(ids or 0)}, this node saw {seen}")
        if epoch is not None and epoch.decode() == self.epoch:  # same identity, fewer messages: make it another
            await self._redis.set(EPOCH_KEY, secrets.token_hex(16))
        await self._store_replaced(why)
        return True

    async def _store_replaced(self, why: str) -> None:
        """Join the store Redis holds now and tell every session: clients resume from its beginning."""
        await self._redis.set(EPOCH_KEY, secrets.token_hex(16), nx=True)
        epoch, ids = await self._redis.mget(EPOCH_KEY, IDS_KEY)
        log.warning("the message store in Redis changed (%s): new epoch %s; closing every session so that "
                    "clients start again from its beginning", why, epoch.decode(),
                    extra={"event": "store-reset", "epoch": epoch.decode()})
        self.epoch, self._highest_id = epoch.decode(), int(ids or 0)
        for track in self._tracks.values():
            track.seq, track.top = None, 0
            track.ready.clear()
        for user in list(self._tracks):
            self._lane.put_nowait(lambda user=user: self._start_track(user))  # type: ignore[misc]
        if self._listener is not None:
            self._listener.store_reset()

    # -- Redis going and coming back -------------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> EngineUnavailable:
        if self._available:
            log.error("lost Redis at %s: %s; refusing sends until it is back", redact(self.url), exc,
                      extra={"event": "redis-down"})
        self._available, self._error = False, f"Redis is unreachable: {exc}"
        return self._unavailable()

    def _came_back(self) -> None:
        log.info("Redis at %s is back; catching up", redact(self.url), extra={"event": "redis-up"})
        self._available, self._error = True, None
        self.reconnects += 1
        for user in list(self._tracks):
            self._lane.put_nowait(lambda user=user: self._catch_up(user))  # type: ignore[misc]

    def _unavailable(self) -> EngineUnavailable:
        return EngineUnavailable(self._error or "Redis is unreachable")

    # -- reads -----------------------------------------------------------------------------------------

    def read_backlog(self, user: str, after: int | None, since_ts: float | None, encode: Encoder,
                     done: Callable[[BacklogPage | StorageError], None]) -> None:
        self._read(self._backlog_page(user, after, since_ts, encode), done)

    async def _backlog_page(self, user: str, after: int | None, since_ts: float | None,
                            encode: Encoder) -> BacklogPage:
        track = self._tracks.get(user)
        if track is not None:  # live messages must come by the channel once the backlog is read
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(track.ready.wait(), SUBSCRIBE_WAIT_S)
        if after is None and since_ts is None:
            after = max(int(await self._redis.hget(meta_key(user), "c") or 0), self._cursors.get(user, 0))
        start = after or 0
        entries = await self._redis.xrange(inbox_key(user), f"({start}-0", "+", count=REPLAY_PAGE)
        if since_ts is not None:
            entries = await self._since(user, entries, since_ts)
            if not entries:
                return BacklogPage([], start, True)
            start = max(start, entry_number(entries[0][0]) - 1)
        messages = [_stored(entry_number(entry_id), user, fields) for entry_id, fields in entries]
        return read_backlog_page(_Fetched(messages), user, encode, start, None)

    async def _since(self, user: str, entries: list[Any], since_ts: float) -> list[Any]:
        """The inbox from its first message accepted at or after ``since_ts`` (a scan: rarely asked)."""
        while entries:
            first = next((entry_id for entry_id, fields in entries if float(fields[b"ts"]) >= since_ts), None)
            if first is not None:  # a full page from there, so that the page can tell whether more follow
                return list(await self._redis.xrange(inbox_key(user), first, "+", count=REPLAY_PAGE))
            entries = await self._redis.xrange(inbox_key(user), f"({entries[-1][0].decode()}", "+", count=REPLAY_PAGE)
        return []

    def read_history(self, user: str, request: p.HistoryRequest, done: Callable[[str | StorageError], None]) -> None:
        self._read(self._history(user, request), done)

    async def _history(self, user: str, request: p.HistoryRequest) -> str:
        """The conversation's ids from its two streams (``{u:ID}:p:PEER`` both ways, runs of ids), the newest
        ``limit`` of them, then those messages from the two inboxes, which hold the texts (one copy per message)."""
        newest = f"({request.before}-0" if request.before is not None else "+"
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrevrange(peer_key(user, request.peer), newest, "-", count=request.limit)
        pipe.xrevrange(peer_key(request.peer, user), newest, "-", count=request.limit)
        received, sent = await pipe.execute()
        # Each run read has at least one id within the bound (its first), so ``limit`` runs each way suffice.
        before = request.before
        chosen = sorted([(msg_id, recipient) for runs, recipient in ((received, user), (sent, request.peer))
                         for entry_id, fields in runs for msg_id in run_ids(entry_id, fields)
                         if before is None or msg_id < before], reverse=True)
        del chosen[request.limit:]
        messages = []
        if chosen:
            pipe = self._redis.pipeline(transaction=False)
            for msg_id, recipient in chosen:
                pipe.xrange(inbox_key(recipient), f"{msg_id}-0", f"{msg_id}-0")
            found = await pipe.execute()
            messages = [_stored(msg_id, recipient, entries[0][1])
                        for (msg_id, recipient), entries in zip(chosen, found, strict=True) if entries]  # else pruned
        return read_history_answer(_Fetched(messages), user, request)

    def _read(self, work: Awaitable[Any], done: Callable[[Any], None]) -> None:
        async def run() -> None:
            try:
                result = await work
            except RedisError as exc:
                result = self._went_down(exc) if _is_connection_error(exc) else StorageError(f"Redis: {exc}")
            except Exception as exc:  # a bug: answered as a failure, else the session would wait for ever
                log.exception("redis engine: a read failed", extra={"event": "redis-error"})
                result = StorageError(f"the read failed: {exc!r}")
            done(result)

        task = asyncio.get_running_loop().create_task(run())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    def _background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except RedisError as exc:
                self._went_down(exc)

        self._read(run(), lambda _: None)

    # -- the rest of the seam --------------------------------------------------------------------------

    def contacts_among(self, user: str, candidates: AbstractSet[str]) -> set[str]:
        """One round trip on a blocking connection (``SMISMEMBER``): the relay answers who and watch within
        the frame, as it checks a token within the handshake. Raises StorageError if Redis is away."""
        if not candidates:
            return set()
        names = list(candidates)
        try:
            found = self._blocking.smismember(contacts_key(user), names)
        except sync_redis.RedisError as exc:
            raise StorageError(f"cannot read contacts from Redis: {exc}") from exc
        return {name for name, member in zip(names, found, strict=True) if member}

    def read_search(self, user: str, request: p.SearchRequest, done: Callable[[str | StorageError], None]) -> None:
        self._read(self._search(user, request), done)

    async def _search(self, user: str, request: p.SearchRequest) -> str:
        """A bounded scan of the streams of ``user``'s messages (``redis_search``): what they received, and
        what they sent to each contact (or to ``peer``)."""
        peer = request.peer
        if peer is not None:
            streams = [Stream(peer_key(user, peer), user)]
            if peer != user:
                streams.append(Stream(peer_key(peer, user), peer))
        else:  # a note to oneself is in the inbox already
            streams = [Stream(inbox_key(user), user), *(Stream(peer_key(contact, user), contact)
                                                         for contact in await self._contacts(user) if contact != user)]
        heads = await self._last_ids([stream.key for stream in streams])
        if request.before is not None:
            heads = [min(head, request.before - 1) for head in heads]
        since_ts = p.parse_ts(request.since) if request.since is not None else None
        found, cut = await scan_streams(streams, heads, query_words(request.text), request.limit, since_ts,
                                        self._search_page, _stored)
        return read_search_answer(_Found(found, cut), user, request)

    async def _search_page(self, stream: Stream, upto: int, count: int) -> list[Any]:
        """Up to ``count`` messages of ``stream`` from ``upto`` down (fewer: the stream ends), with their texts:
        a conversation stream keeps runs of ids, whose texts are read from the recipient's inbox (a message
        pruned meanwhile: no text). ``count`` runs hold ``count`` ids within the bound at least (their first);
        the next page reads a run cut here again, from below the last id taken."""
        entries = list(await self._redis.xrevrange(stream.key, f"{upto}-0", "-", count=count))
        if not entries or b"t" in entries[0][1]:
            return entries
        ids = [f"{msg_id}-0" for entry_id, fields in entries for msg_id in reversed(run_ids(entry_id, fields))
               if msg_id <= upto][:count]
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(inbox_key(stream.recipient), entry_id, entry_id)
        return [(entry_id.encode(), found[0][1] if found else {}) for entry_id, found in
                zip(ids, await pipe.execute(), strict=True)]

    # -- read positions, the inbox and live events (issue 12) ---------------------------------------------

    def mark_read(self, marks: ReadMarks, done: Callable[[dict[tuple[str, str], int] | StorageError], None]) -> None:
        self._read(self._mark_read(marks), done)

    async def _mark_read(self, marks: ReadMarks) -> dict[tuple[str, str], int]:
        """One MARK_READ call per user (its read hash, the id counter, its contacts), all in one pipeline."""
        by_user: dict[str, list[tuple[str, int, bool]]] = {}
        for (user, peer), (msg_id, receipt) in marks.items():
            by_user.setdefault(user, []).append((peer, msg_id, receipt))
        calls: list[_Call] = [
            ("read", [reads_key(user), IDS_KEY, contacts_key(user)],
             [arg for peer, msg_id, receipt in rows for arg in (peer, msg_id, int(receipt))])
            for user, rows in by_user.items()]
        answers = _checked(await self._run_scripts(calls))
        return {(user, peer): int(kept) for (user, rows), positions in zip(by_user.items(), answers, strict=True)
                for (peer, _, _), kept in zip(rows, positions, strict=True)}

    def read_inbox(self, user: str, limit: int, done: Callable[[InboxPage | StorageError], None]) -> None:
        self._read(self._inbox(user, limit), done)

    async def _inbox(self, user: str, limit: int) -> InboxPage:
        """Three round trips: the contacts, the newest id each way (LAST_IDS, no texts), then for the
        ``limit`` most recent the position and unread count (UNREAD), the peer's receipt, the newest message."""
        peers = await self._contacts(user)
        tops = await self._last_ids([key for peer in peers for key in (peer_key(user, peer), peer_key(peer, user))])
        pairs = zip(peers, tops[0::2], tops[1::2], strict=True)
        # (newest id, peer, whether the newest came from the peer); neither way: every message was pruned
        latest = sorted(((max(got, sent), peer, got > sent) for peer, got, sent in pairs if got or sent), reverse=True)
        return InboxPage(await self._summaries(user, latest[:limit]), len(latest) > limit)

    async def _last_ids(self, keys: list[str]) -> list[int]:
        """The newest message id in each stream (0 for an empty one), no texts read over the network."""
        calls: list[_Call] = [("last_ids", keys[at:at + LAST_IDS_KEYS], [])
                              for at in range(0, len(keys), LAST_IDS_KEYS)]
        return [int(newest or 0) for answer in _checked(await self._run_scripts(calls)) for newest in answer]

    async def _contacts(self, user: str) -> list[str]:
        peers: dict[str, None] = {}  # SSCAN may name one twice
        async for name in self._redis.sscan_iter(contacts_key(user), count=1000):
            peers[name.decode()] = None
            if len(peers) >= INBOX_CONTACTS_MAX:
                break
        return list(peers)

    async def _summaries(self, user: str, latest: list[tuple[int, str, bool]]) -> list[ConversationSummary]:
        if not latest:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for last, peer, received in latest:
            pipe.hget(reads_key(peer), user)
            pipe.xrange(inbox_key(user if received else peer), f"{last}-0", f"{last}-0")  # the recipient's
        counts, answers = await asyncio.gather(
            self._run_scripts([("unread", [peer_key(user, peer), reads_key(user), counts_key(user)],
                                [peer, UNREAD_COUNT_MAX])
                               for _, peer, _ in latest]),
            pipe.execute())
        summaries = []
        for (last, peer, received), (read, unread), peer_read, entries in zip(
                latest, _checked(counts), answers[0::2], answers[1::2], strict=True):
            if entries:  # else pruned meanwhile
                message = _stored(last, user if received else peer, entries[0][1])
                summaries.append(ConversationSummary(peer, int(unread), int(read), message, _receipted(peer_read)))
        return summaries

    def pass_on(self, user: str, frame: str) -> None:
        """Publish a live event on ``user``'s events channel when they are connected to another node."""
        if self.presence.elsewhere(user):
            self._background(self._redis.publish(events_channel(user), f"{self.node}\n{frame}"))

    async def prune(self, older_than_ts: float, limit: int) -> int:
        """Delete up to ``limit`` acknowledged messages accepted before ``older_than_ts`` (the unacknowledged
        are kept whatever their age), from inboxes and history alike."""
        deleted = 0
        try:
            async for name in self._redis.sscan_iter(USERS_KEY):
                deleted += await self._prune_inbox(name.decode(), older_than_ts, limit - deleted)
                if deleted >= limit:
                    break
        except RedisError as exc:
            raise StorageError(f"cannot prune in Redis: {exc}") from exc
        return deleted

    async def _prune_inbox(self, user: str, older_than_ts: float, limit: int) -> int:
        cursor = int(await self._redis.hget(meta_key(user), "c") or 0)
        entries = await self._redis.xrange(inbox_key(user), "-", f"{cursor}-0", count=limit)
        old = [(entry_id, fields[b"f"].decode()) for entry_id, fields in entries
               if float(fields[b"ts"]) < older_than_ts]
        if old:
            by_sender: dict[str, list[int]] = {}
            for entry_id, sender in old:
                by_sender.setdefault(sender, []).append(entry_number(entry_id))
            await self._redis.xdel(inbox_key(user), *(entry_id for entry_id, _ in old))
            _checked(await self._run_scripts([
                ("prune_runs", [peer_key(user, sender), counts_key(user), inbox_key(user)], [sender, *ids])
                for sender, ids in by_sender.items()]))
        return len(old)

    async def settle(self) -> None:
        self._write_cursors()
        finished = asyncio.get_running_loop().create_future()
        self._lane.put_nowait(lambda: finished.set_result(None))
        await finished
        while self._reads:
            await asyncio.gather(*self._reads, return_exceptions=True)

    def health(self) -> dict[str, Any]:
        state = {"url": redact(self.url), "state": "up" if self._available else "down",
                 "guarantee": self.guarantee.summary, "node": self.node}
        health: dict[str, Any] = {"mode": self.name, "ok": self._available and self._error is None,
                                  "db_bytes": self._used_memory, "redis": state}
        if self._error is not None:
            health["error"] = self._error
        return health

    def prometheus_lines(self) -> list[str]:
        from chatcli.server.metrics import histogram_lines  # the exposition format lives there

        return [
            "# HELP chatcli_redis_roundtrip_seconds One pipelined commit's round trip to Redis.",
            "# TYPE chatcli_redis_roundtrip_seconds histogram",
            *histogram_lines("chatcli_redis_roundtrip_seconds", self.roundtrip),
            "# HELP chatcli_redis_batch_messages Messages per pipelined commit.",
            "# TYPE chatcli_redis_batch_messages histogram",
            *histogram_lines("chatcli_redis_batch_messages", self.batch_sizes),
            "# HELP chatcli_redis_reconnects_total Times Redis came back after being unreachable.",
            "# TYPE chatcli_redis_reconnects_total counter",
            f"chatcli_redis_reconnects_total {self.reconnects}",
            "# HELP chatcli_redis_gap_messages_total Messages read from a stream because Pub/Sub missed them.",
            "# TYPE chatcli_redis_gap_messages_total counter",
            f"chatcli_redis_gap_messages_total {self.gaps_filled}",
            "# HELP chatcli_redis_up Whether Redis is reachable (sends are refused while it is not).",
            "# TYPE chatcli_redis_up gauge",
            f"chatcli_redis_up {int(self._available)}",
        ]

    def close(self) -> None:
        self._closed = True
        if self._cursor_timer is not None:  # moves still waiting are lost: settle() writes them first
            self._cursor_timer.cancel()
        for task in (*self._tasks, *self._reads):
            task.cancel()
        self.accounts.close()
        self._blocking.close()

    async def aclose(self) -> None:
        """``close``, then wait for the connections to be closed."""
        self.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()


_SCRIPTS: Final = {"commit": COMMIT, "cursor": CURSOR, "read": MARK_READ, "unread": UNREAD, "last_ids": LAST_IDS,
                   "prune_runs": PRUNE_RUNS}
_PRESENCE_CHANNEL_BYTES: Final = PRESENCE_CHANNEL.encode()


def _pack(command: tuple[Any, ...], packed: _Packed | None = None) -> bytes:
    """One command in the Redis protocol (RESP): ``*N`` then ``$len`` and the bytes of each argument, then
    the arguments already ``packed``."""
    parts = [b"*%d\r\n" % (len(command) + (packed.arg_count if packed else 0))]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    if packed:
        parts.append(packed.data)
    return b"".join(parts)


def _evalsha(sha: str, keys: list[str], args: list[Any] | _Packed) -> bytes:
    if isinstance(args, _Packed):
        return _pack(("EVALSHA", sha, len(keys), *keys), args)
    return _pack(("EVALSHA", sha, len(keys), *keys, *args))


def _commit_args(epoch: str, batch: Sequence[NewMessage]) -> _Packed:
    """``redis_lua.COMMIT``'s arguments, packed here: the generic ``_pack`` per argument cost ~3 us per
    message on the sending node, this under 1 (one string per message, encoded once for the batch; the
    batch's one accept time formatted once, user ids once; ASCII texts need no encoding to be measured)."""
    replies = " ".join(f"{at} {m.reply_to}" for at, m in enumerate(batch) if m.reply_to is not None)
    parts = [_bulk(epoch), _bulk(str(IDEMPOTENCY_TTL_S)), _bulk(replies)]
    last_ts, ts_bulk = None, ""
    for sender, recipient, text, ts, client_id, _ in batch:  # the replies go apart, above
        if ts != last_ts:
            last_ts, ts_bulk = ts, _bulk(repr(ts))
        size = len(text) if text.isascii() else len(text.encode())
        parts.append(f"{_user_bulk(sender)}{_user_bulk(recipient)}${size}\r\n{text}\r\n{ts_bulk}"
                     f"{_bulk(client_id) if client_id else _EMPTY_BULK}")
    return _Packed(3 + 5 * len(batch), "".join(parts).encode())


def _bulk(value: str) -> str:
    """``value`` as one RESP argument (as text: encoded with the rest of the command)."""
    return f"${len(value) if value.isascii() else len(value.encode())}\r\n{value}\r\n"


def _user_bulk(user: str) -> str:
    """A user id as a RESP argument, kept for the next batch (user ids are short and few per node)."""
    packed = _USER_BULKS.get(user)
    if packed is None:
        if len(_USER_BULKS) >= _USER_BULKS_MAX:
            _USER_BULKS.clear()
        packed = _USER_BULKS[user] = _bulk(user)
    return packed


_USER_BULKS: dict[str, str] = {}
#: User ids are at most 64 bytes: a few hundred kilobytes at most.
_USER_BULKS_MAX: Final = 4096
_EMPTY_BULK: Final = "$0\r\n\r\n"
_NO_SHA: Final = "0" * 40


def _new_ids(before: int, count: int, originals: dict[int, int], refused: AbstractSet[int]) -> list[int]:
    """Each message's id after a commit: the next ids in batch order, a duplicate's original id, a refused
    reply's 0."""
    if not originals and not refused:
        return list(range(before + 1, before + 1 + count))
    ids, next_id = [], before
    for position in range(count):
        if position in originals:
            ids.append(originals[position])
        elif position in refused:
            ids.append(0)
        else:
            next_id += 1
            ids.append(next_id)
    return ids


def _stored(msg_id: int, recipient: str, fields: dict[bytes, bytes]) -> StoredMessage:
    reply_to = fields.get(b"r")
    return StoredMessage(msg_id, fields[b"f"].decode(), recipient, fields[b"t"].decode(), float(fields[b"ts"]), None,
                         None if reply_to is None else int(reply_to))


def _checked(answers: list[Any]) -> list[Any]:
    """Script answers, or the first error Redis answered instead (``_run_scripts`` returns them)."""
    failed = next((answer for answer in answers if isinstance(answer, Exception)), None)
    if failed is not None:
        raise failed
    return answers


def _receipted(value: bytes | None) -> int | None:
    """The position in a read hash value (``ID:FLAG``) if its flag lets the peer learn it."""
    if value is None:
        return None
    position, _, receipt = value.partition(b":")
    return int(position) if receipt == b"1" else None


def _is_connection_error(exc: RedisError) -> bool:
    return isinstance(exc, RedisConnectionError | RedisTimeoutError)


class _Found:
    """A search's finds, offered to ``pages.read_search_answer`` as a ``SearchableLog``."""

    def __init__(self, messages: list[StoredMessage], cut: bool) -> None:
        self._messages = messages
        self._cut = cut

    def iter_search(self, user: str, text: str, scan: SearchScan, peer: str | None = None,
                    since_ts: float | None = None, before_id: int | None = None,
                    limit: int = 20) -> Iterator[StoredMessage]:
        scan.cut = self._cut
        return iter(self._messages[:limit])


class _Fetched:
    """Messages already read from Redis, offered to ``pages`` as a ``MessageLog`` (newest first for history)."""

    def __init__(self, messages: list[StoredMessage]) -> None:
        self._messages = messages

    def cursor(self, user: str) -> int:
        return 0

    def first_id_since(self, since_ts: float) -> int | None:
        return None

    def iter_messages_to(self, user: str, after_id: int = 0, limit: int = 1000) -> Iterator[StoredMessage]:
        return iter(self._messages[:limit])

    def iter_history(self, user: str, peer: str, limit: int = 50,
                     before_id: int | None = None) -> Iterator[StoredMessage]:
        return iter(self._messages[:limit])
