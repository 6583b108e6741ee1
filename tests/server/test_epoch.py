"""A client's cursor never meets a different message store silently (issue 8, item 7).

Every store has an epoch, announced in ``hello``; a client resumes with ``Chatcli-After`` and
``Chatcli-Epoch``. A cursor from another store (another epoch, or an id the store never gave
out) gets ``"reset":true`` and the store from its beginning, never a silent skip. Real
``chatcli serve`` processes, each on its own SQLite file unless a test shares one.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from chatcli import protocol as p
from tests.support.processes import Chatcli, ChatcliProcess, RunningServer, StartServer
from tests.support.wsclients import RawClient, native, recv_frame, send_native

OTHER_EPOCH = "0123456789abcdef0123456789abcdef"  # valid, and no store's: 128 random bits never repeat
STORE_CHANGED = "the server's message store changed (a new, wiped or restored database): starting from its beginning"
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


# ---------------------------------------------------------------------------
# listen: in memory and in --cursor-file
# ---------------------------------------------------------------------------


def printed(listener: ChatcliProcess) -> list[tuple[int, str]]:
    return [(line["id"], line["text"]) for line in map(json.loads, listener.out)]


def listen_once(chatcli: Chatcli, server: RunningServer, *args: str) -> ChatcliProcess:
    run = chatcli("listen", "bob", "--url", server.ws_url, "--timeout", "1", *args)
    assert run.wait() == 0, run.err
    return run


def test_listen_prints_the_new_stores_first_message_and_warns_when_the_server_is_replaced(
        chatcli: Chatcli, start_server: StartServer, tmp_path: Path) -> None:
    """The reproduction of issue 8, item 7: listen runs; the server comes back with a fresh database."""
    first = start_server("--db", str(tmp_path / "old.db"))
    ivan = chatcli("listen", "ivan", "--url", first.ws_url)
    ivan.wait_stderr("listening as ivan")
    send_to(first, "ivan", "from the old store")
    ivan.wait_stdout_lines(1)
    first.stop()
    ivan.wait_stderr("reconnecting in")
    replaced = start_server("--ws-port", str(first.ws_port), "--db", str(tmp_path / "new.db"))
    ivan.wait_stderr("reconnected as ivan", timeout=20)
    ivan.wait_stderr(STORE_CHANGED)
    (ack,) = send_to(replaced, "ivan", "the new store's first message")
    assert (ack.status, ack.msg_id) == (p.Status.DELIVERED, 1)
    ivan.wait_stdout_lines(2)
    assert printed(ivan) == [(1, "from the old store"), (1, "the new store's first message")]
    assert any(line.endswith(f"{STORE_CHANGED} instead of after message 1") for line in ivan.err)


def test_a_cursor_file_from_another_store_restarts_with_a_warning_and_skips_nothing(
        chatcli: Chatcli, start_server: StartServer, tmp_path: Path) -> None:
    cursor = tmp_path / "bob.cursor"
    old = start_server("--db", str(tmp_path / "old.db"))
    send_to(old, "bob", "o1", "o2", "o3")
    assert [text for _, text in printed(listen_once(chatcli, old, "--cursor-file", str(cursor)))] == ["o1", "o2", "o3"]
    assert cursor.read_text() == f"3 {epoch_of(old)}\n"
    old.stop()

    new = start_server("--db", str(tmp_path / "new.db"))
    send_to(new, "bob", "n1", "n2")  # ids 1 and 2: below the file's 3, so once skipped without a word
    run = listen_once(chatcli, new, "--cursor-file", str(cursor))
    assert printed(run) == [(1, "n1"), (2, "n2")]
    assert sum(STORE_CHANGED in line for line in run.err) == 1
    assert cursor.read_text() == f"2 {epoch_of(new)}\n"
    again = listen_once(chatcli, new, "--cursor-file", str(cursor))  # now in step: no warning, no repeat
    assert printed(again) == [] and not any(STORE_CHANGED in line for line in again.err)


def test_a_reset_with_nothing_to_print_still_moves_the_cursor_file_to_the_new_store(
        chatcli: Chatcli, server: RunningServer, tmp_path: Path) -> None:
    cursor = tmp_path / "bob.cursor"
    cursor.write_text(f"7 {OTHER_EPOCH}\n")
    run = listen_once(chatcli, server, "--cursor-file", str(cursor))
    assert printed(run) == [] and any(STORE_CHANGED in line for line in run.err)
    assert cursor.read_text() == f"0 {epoch_of(server)}\n"  # the next run starts at the beginning, silently
    send_to(server, "bob", "first")
    later = listen_once(chatcli, server, "--cursor-file", str(cursor))
    assert printed(later) == [(1, "first")] and not any(STORE_CHANGED in line for line in later.err)


def test_an_old_cursor_file_with_only_an_id_still_loads(chatcli: Chatcli, server: RunningServer,
                                                        tmp_path: Path) -> None:
    cursor = tmp_path / "bob.cursor"
    cursor.write_text("1\n")  # as chatcli wrote it before epochs
    send_to(server, "bob", "m1", "m2", "m3")
    run = listen_once(chatcli, server, "--cursor-file", str(cursor))
    assert printed(run) == [(2, "m2"), (3, "m3")] and not any(STORE_CHANGED in line for line in run.err)
    assert cursor.read_text() == f"3 {epoch_of(server)}\n"  # rewritten in the new format


def test_matching_epochs_resume_across_a_server_restart_with_no_warning(chatcli: Chatcli, start_server: StartServer,
                                                                        tmp_path: Path) -> None:
    cursor = tmp_path / "bob.cursor"
    first = start_server()
    send_to(first, "bob", "before")
    assert printed(listen_once(chatcli, first, "--from", "alice", "--cursor-file", str(cursor))) == [(1, "before")]
    first.stop()
    second = start_server()  # the same database file: the same store
    send_to(second, "bob", "after")
    run = listen_once(chatcli, second, "--from", "alice", "--cursor-file", str(cursor))
    assert printed(run) == [(2, "after")] and not any(STORE_CHANGED in line for line in run.err)


def test_a_cursor_file_with_a_bad_epoch_is_a_usage_error(chatcli: Chatcli, server: RunningServer,
                                                        tmp_path: Path) -> None:
    cursor = tmp_path / "bob.cursor"
    cursor.write_text("5 not/an epoch\n")
    run = chatcli("listen", "bob", "--url", server.ws_url, "--cursor-file", str(cursor))
    assert run.wait() == 2
    assert "is corrupt" in run.err[-1] and not any("Traceback" in line for line in run.err)
