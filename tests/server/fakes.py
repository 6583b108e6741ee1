"""In-process stand-ins for what the relay talks to: sessions that record what they are sent, and
engines built on real SQLite files (their storage calls run inline, on the test's thread) or on a real
redis-server (``BlockingRedisEngine``: each call returns once its work is done)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence, Set
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatcli import protocol as p
from chatcli.server.accounts import AccountStore
from chatcli.server.codecs import NATIVE, Codec
from chatcli.server.engine.base import Engine, StoredMessage
from chatcli.server.engine.memory import MemoryEngine
from chatcli.server.engine.options import Fsync
from chatcli.server.engine.redis_accounts import RedisAccountStore
from chatcli.server.engine.redis_engine import RedisEngine
from chatcli.server.engine.sqlite import SQLiteEngine
from chatcli.server.storage_thread import InlineStorage
from tests.support.redis_server import redis_cli, shared_redis

__all__ = ["ENGINES", "BlockingRedisEngine", "RecordingListener", "RecordingSession", "account_admin",
           "make_engine"]

#: Every engine the contract suite and the in-process relay tests run against.
ENGINES = ("memory", "sqlite", "redis")

T = TypeVar("T")

#: The tmp_path each Redis store belongs to: a new tmp_path starts from an empty Redis.
_redis_owner: list[Path] = []


def make_engine(kind: str, tmp_path: Path) -> Engine:
    """A fresh engine of ``kind``; the SQLite one in ``tmp_path/chat.db``, reopened if it exists; the Redis
    one on the test run's redis-server, emptied the first time ``tmp_path`` asks."""
    if kind == "memory":
        return MemoryEngine()
    if kind == "sqlite":
        return SQLiteEngine.open(tmp_path / "chat.db", Fsync.normal, InlineStorage())
    if kind == "redis":
        if _redis_owner != [tmp_path]:
            assert redis_cli(shared_redis(), "FLUSHALL") == "OK"
            _redis_owner[:] = [tmp_path]
        return BlockingRedisEngine(shared_redis().url)
    raise ValueError(kind)


def account_admin(engine: Engine, tmp_path: Path) -> AccountStore | RedisAccountStore:
    """What `chatcli user add` would open, from another process, for ``engine``'s accounts."""
    if isinstance(engine, BlockingRedisEngine):
        return RedisAccountStore(engine.url)
    return AccountStore(tmp_path / "chat.db")


class BlockingRedisEngine:
    """A ``RedisEngine`` on its own event loop in a thread; every call returns once the engine settled,
    so that a test reads it like the inline engines (``done`` has run when the call returns)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._engine: RedisEngine = self._run(RedisEngine.open(url, strict=True))
        self.presence = _BlockingPresence(self)

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(30)

    def call(self, action: Callable[[RedisEngine], object]) -> None:
        """Run ``action`` on the engine's loop, then wait until everything it started has finished (at once
        when called from a ``done`` callback, which runs on that loop already)."""
        if threading.current_thread() is self._thread:
            action(self._engine)
            return

        async def act() -> None:
            action(self._engine)
            await self._engine.settle()

        self._run(act())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def presence_now(self) -> Any:
        return self._engine.presence

    def append(self, *args: Any) -> None:
        self.call(lambda engine: engine.append(*args))

    def read_backlog(self, *args: Any) -> None:
        self.call(lambda engine: engine.read_backlog(*args))

    def read_history(self, *args: Any) -> None:
        self.call(lambda engine: engine.read_history(*args))

    def read_search(self, *args: Any) -> None:
        self.call(lambda engine: engine.read_search(*args))

    def mark_read(self, *args: Any) -> None:
        self.call(lambda engine: engine.mark_read(*args))

    def read_inbox(self, *args: Any) -> None:
        self.call(lambda engine: engine.read_inbox(*args))

    def pass_on(self, *args: Any) -> None:
        self.call(lambda engine: engine.pass_on(*args))

    async def prune(self, older_than_ts: float, limit: int) -> int:
        future: Future[int] = asyncio.run_coroutine_threadsafe(self._engine.prune(older_than_ts, limit), self._loop)
        return await asyncio.wrap_future(future)

    async def settle(self) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._engine.settle(), self._loop))

    def close(self) -> None:
        if self._loop.is_closed():  # closed by the test already
            return
        self._run(self._engine.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class _BlockingPresence:
    def __init__(self, owner: BlockingRedisEngine) -> None:
        self._owner = owner

    def joined(self, user: str) -> None:
        self._owner.call(lambda engine: engine.presence.joined(user))

    def left(self, user: str) -> None:
        self._owner.call(lambda engine: engine.presence.left(user))

    def is_online(self, user: str) -> bool:
        return self._owner.presence_now().is_online(user)

    def online(self) -> Set[str]:
        return self._owner.presence_now().online()


@dataclass(eq=False)
class RecordingSession:
    """A session of ``user`` speaking ``codec``'s protocol, as the relay sees it; ``sent`` holds every frame
    it was sent, in order."""

    user: str
    codec: Codec = NATIVE
    authenticated: bool = False
    written_upto: int = 0
    sent: list[str] = field(default_factory=list)
    auth_failures: int = 0
    closed: tuple[int, str] | None = None

    def send_text(self, text: str) -> None:
        self.sent.append(text)

    def written(self, msg_id: int) -> None:
        self.written_upto = msg_id

    def auth_failed(self) -> None:
        self.auth_failures += 1

    @property
    def is_open(self) -> bool:
        return self.closed is None

    def when_drained(self, callback: Callable[[], None]) -> None:
        callback()

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def frames(self) -> list[p.ServerFrame]:
        """What a native session was sent, parsed."""
        return [p.parse_server_frame(text) for text in self.sent]

    def texts(self) -> list[str]:
        """The texts of the messages it received."""
        return [frame.text for frame in self.frames() if isinstance(frame, p.Message)]

    def acks(self) -> list[p.Ack]:
        return [frame for frame in self.frames() if isinstance(frame, p.Ack)]


@dataclass
class RecordingListener:
    """An ``EngineListener`` that keeps what the engine told it."""

    messages: list[StoredMessage] = field(default_factory=list)
    presence: list[tuple[str, bool]] = field(default_factory=list)
    live: list[tuple[str, str]] = field(default_factory=list)

    def messages_committed_elsewhere(self, user: str, messages: Sequence[StoredMessage]) -> None:
        assert all(message.recipient == user for message in messages)
        self.messages.extend(messages)

    def live_event(self, user: str, frame: str) -> None:
        self.live.append((user, frame))

    def presence_changed(self, user: str, online: bool) -> None:
        self.presence.append((user, online))
