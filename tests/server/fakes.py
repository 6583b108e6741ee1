"""Fakes for in-process server tests: a session as the relay sees it, recording what it is sent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from chatcli import protocol as p
from chatcli.server.codecs import NATIVE, Codec

__all__ = ["RecordingSession"]


@dataclass(eq=False)
class RecordingSession:
    """A session of ``user`` speaking ``codec``'s protocol; ``sent`` holds every frame it was sent, in order."""

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
