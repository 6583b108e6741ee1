"""In-process stand-ins for what the relay talks to: sessions that record what they are sent, and
engines built on real SQLite files (their storage calls run inline, on the test's thread)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatcli import protocol as p
from chatcli.server.engine.base import Engine, StoredMessage
from chatcli.server.engine.memory import MemoryEngine
from chatcli.server.engine.options import Fsync
from chatcli.server.engine.sqlite import SQLiteEngine
from chatcli.server.storage_thread import InlineStorage

__all__ = ["ENGINES", "RecordingListener", "RecordingSession", "make_engine"]

#: Every engine the contract suite and the in-process relay tests run against.
ENGINES = ("memory", "sqlite")


def make_engine(kind: str, tmp_path: Path) -> Engine:
    """A fresh engine of ``kind``; the SQLite one in ``tmp_path/chat.db``, reopened if it exists."""
    if kind == "memory":
        return MemoryEngine()
    if kind == "sqlite":
        return SQLiteEngine.open(tmp_path / "chat.db", Fsync.normal, InlineStorage())
    raise ValueError(kind)


@dataclass(eq=False)
class RecordingSession:
    """A session as the relay sees it; what it was sent is kept."""

    user: str
    legacy: bool = False
    authenticated: bool = False
    written_upto: int = 0
    sent: list[str] = field(default_factory=list)
    closed: tuple[int, str] | None = None

    def send_text(self, text: str) -> None:
        self.sent.append(text)

    def written(self, msg_id: int) -> None:
        self.written_upto = msg_id

    def auth_failed(self) -> None:
        pass

    @property
    def is_open(self) -> bool:
        return self.closed is None

    def when_drained(self, callback: Callable[[], None]) -> None:
        callback()

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def frames(self) -> list[p.ServerFrame]:
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

    def message_committed_elsewhere(self, message: StoredMessage) -> None:
        self.messages.append(message)

    def presence_changed(self, user: str, online: bool) -> None:
        self.presence.append((user, online))
