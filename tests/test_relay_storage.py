"""The relay's commit path in-process, with its storage run inline on a real SQLite file.

Only what the network cannot reach any more is tested here: a session whose user id is
invalid (issue 8, item 1: a refused handshake used to leave ``user=""``). Everything a
client can do is tested against a real server in test_storage_failures.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatcli import protocol as p
from chatcli.server.config import ServerConfig
from chatcli.server.metrics import Metrics
from chatcli.server.relay import Relay
from chatcli.server.storage import SQLiteStore


@dataclass(eq=False)
class RecordingSession:
    """A session as the relay sees it; what it was sent is kept."""

    user: str
    legacy: bool = False
    authenticated: bool = False
    written_upto: int = 0
    sent: list[str] = field(default_factory=list)

    def send_text(self, text: str) -> None:
        self.sent.append(text)

    def written(self, msg_id: int) -> None:
        self.written_upto = msg_id

    def auth_failed(self) -> None:
        pass

    def allow_send(self) -> bool:
        return True

    @property
    def is_open(self) -> bool:
        return True

    def when_drained(self, callback: Callable[[], None]) -> None:
        callback()

    def close(self, code: int, reason: str) -> None:
        pass

    def frames(self) -> list[p.ServerFrame]:
        return [p.parse_server_frame(text) for text in self.sent]


def test_a_sender_with_an_invalid_id_fails_alone_in_its_batch(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ticks: list[Callable[[], None]] = []
    with SQLiteStore(tmp_path / "chat.db") as store:
        relay = Relay(ServerConfig(), Metrics(), store, schedule=ticks.append)
        bob, alice, nobody = RecordingSession("bob"), RecordingSession("alice"), RecordingSession("")
        relay.open_session(bob)
        for sender in (alice, nobody):
            relay.open_session(sender, receive=False)  # registered, as the transport does before any frame
        relay.submit(nobody, "n1", "bob", "from nobody")  # the same tick: one batch
        relay.submit(alice, "a1", "bob", "from alice")
        with caplog.at_level(logging.ERROR, "chatcli.server"):
            ticks.pop()()  # the commit
    (nobody_ack,) = nobody.frames()
    (alice_ack,) = alice.frames()
    assert isinstance(nobody_ack, p.Ack) and nobody_ack.status == p.Status.STORED  # stored, so not refused
    assert isinstance(alice_ack, p.Ack) and alice_ack.status == p.Status.DELIVERED
    assert [f.text for f in bob.frames() if isinstance(f, p.Message)] == ["from alice"]
    assert "cannot deliver stored message" in caplog.text
