"""A client's cursor never meets a different message store silently (issue 8, item 7).

Every store has an epoch, announced in ``hello``; a client resumes with ``Chatcli-After`` and
``Chatcli-Epoch``. A cursor from another store (another epoch, or an id the store never gave
out) gets ``"reset":true`` and the store from its beginning, never a silent skip. Real
``chatcli serve`` processes, each on its own SQLite file unless a test shares one.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from chatcli import protocol as p
from tests.conftest import RunningServer
from tests.wsclients import RawClient, native, recv_frame, send_native

StartServer = Callable[..., RunningServer]

OTHER_EPOCH = "0123456789abcdef0123456789abcdef"  # valid, and no store's: 128 random bits never repeat
#: A sending session that gets no backlog of its own (it only sends).
SEND_ONLY = {p.RECEIVE_HEADER: "none"}


def epoch_of(server: RunningServer) -> str:
    ws, hello = native(server.ws_url, "observer", headers=SEND_ONLY)
    ws.close()
    assert hello.epoch is not None
    return hello.epoch


def send_to(server: RunningServer, to: str, *texts: str) -> list[p.Ack]:
    alice, _ = native(server.ws_url, "alice", headers=SEND_ONLY)
    acks = [send_native(alice, to, text) for text in texts]
    alice.close()
    assert all(ack.accepted for ack in acks), acks
    return acks


def texts_until(ws, last: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The texts of the messages that arrive, up to and including ``last`` (a marker sent after the replay)."""
    out: list[str] = []
    while not out or out[-1] != last:
        frame = recv_frame(ws)
        assert isinstance(frame, p.Message), frame
        out.append(frame.text)
    return out


def resume(server: RunningServer, user: str, after: int, epoch: str | None = None) -> tuple[object, p.Hello]:
    headers = {p.RESUME_AFTER_HEADER: str(after), **({p.EPOCH_HEADER: epoch} if epoch is not None else {})}
    return native(server.ws_url, user, headers=headers)


# ---------------------------------------------------------------------------
# The server: epochs in hello, resets at the handshake
# ---------------------------------------------------------------------------


def test_every_store_has_its_own_epoch_and_keeps_it_across_restarts(start_server: StartServer,
                                                                     tmp_path: Path) -> None:
    first = start_server("--db", str(tmp_path / "a.db"))
    epoch = epoch_of(first)
    assert re.fullmatch(r"[0-9a-f]{32}", epoch)
    first.stop()
    assert epoch_of(start_server("--db", str(tmp_path / "a.db"))) == epoch  # same file: same store
    assert epoch_of(start_server("--db", str(tmp_path / "b.db"))) != epoch  # a fresh file: another store
    # An ephemeral server's store is its memory: a new epoch with every run.
    once, twice = epoch_of(start_server("--ephemeral")), epoch_of(start_server("--ephemeral"))
    assert re.fullmatch(r"[0-9a-f]{32}", once) and once != twice


def test_resuming_in_the_same_store_replays_after_the_id_without_a_reset(server: RunningServer) -> None:
    acks = send_to(server, "bob", "m1", "m2", "m3")
    for epoch in (epoch_of(server), None):  # None: a client from before epochs, trusted on its id alone
        bob, hello = resume(server, "bob", acks[0].msg_id or 0, epoch)
        assert hello.reset is False
        send_to(server, "bob", "marker")
        assert texts_until(bob, "marker") == ["m2", "m3", "marker"]
        bob.close()  # type: ignore[attr-defined]


def test_a_cursor_from_another_store_gets_a_reset_and_the_store_from_its_beginning(server: RunningServer) -> None:
    acks = send_to(server, "bob", "new 1", "new 2")
    bob, hello = resume(server, "bob", acks[0].msg_id or 0, OTHER_EPOCH)
    assert hello.reset is True and hello.epoch == epoch_of(server)
    send_to(server, "bob", "marker")
    assert texts_until(bob, "marker") == ["new 1", "new 2", "marker"]  # "after new 1" would have skipped it


def test_an_id_the_store_never_gave_out_is_a_reset_even_with_its_epoch(start_server: StartServer,
                                                                       tmp_path: Path) -> None:
    """A restored backup: same epoch, but the client has read past the end of the copy."""
    live, backup = tmp_path / "live.db", tmp_path / "backup.db"
    server = start_server("--db", str(live))
    epoch = epoch_of(server)
    send_to(server, "bob", "b1", "b2")
    with sqlite3.connect(live) as source, sqlite3.connect(backup) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    seen = send_to(server, "bob", "lost with the disk")[0].msg_id or 0
    server.stop()
    restored = start_server("--db", str(backup))
    assert epoch_of(restored) == epoch
    bob, hello = resume(restored, "bob", seen, epoch)
    assert hello.reset is True
    acks = send_to(restored, "bob", "after the restore")
    assert acks[0].msg_id == seen  # the restored store gives that id out again, to another message
    assert texts_until(bob, "after the restore") == ["b1", "b2", "after the restore"]


def test_an_ephemeral_server_announces_its_epoch_and_says_when_a_cursor_is_not_its_own(
        start_server: StartServer) -> None:
    server = start_server("--ephemeral")
    _, hello = resume(server, "bob", 5, OTHER_EPOCH)
    assert hello.epoch is not None and hello.reset is True
    _, hello = resume(server, "bob", 0, hello.epoch)
    assert hello.reset is False


@pytest.mark.parametrize("value", ["", "has space", "x" * 65, "é"])
def test_a_bad_epoch_header_is_refused_at_the_handshake(server: RunningServer, value: str) -> None:
    raw = RawClient(server.ws_port, "/bob", {"Sec-WebSocket-Protocol": p.SUBPROTOCOL, p.RESUME_AFTER_HEADER: "1",
                                             "Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}",
                                             p.EPOCH_HEADER: value})
    assert raw.status == 400
    assert raw.response_body() == f"{p.EPOCH_HEADER} must be the epoch of a hello: {p.EPOCH_RULE}\n"
    assert send_to(server, "bob", "still up")[0].status == p.Status.STORED  # nothing else changed
