"""The client's pure parts: backoff, the message cursor, what ``send`` reads, URLs; and one live session."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatcli.client import render
from chatcli.client.commands import TextBatches, fetch_history, send_messages
from chatcli.client.inputs import parse_since, read_texts
from chatcli.client.reconnect import Backoff, MessageCursor, ResumePoint
from chatcli.client.session import open_session, user_url
from chatcli.client.settings import ClientSettings
from chatcli.errors import ConnectError, LocalProtocolError, RefusedError, UsageError
from chatcli.protocol import Ack, Conversation, Feature, Hello, Message, Send
from tests.support.processes import RunningServer
from tests.support.samples import NASTY_TEXTS


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    lowest = Backoff(first=0.5, cap=8, rng=lambda: 0.0)
    highest = Backoff(first=0.5, cap=8, rng=lambda: 0.999999)
    assert [lowest.next_delay() for _ in range(7)] == [0.25, 0.5, 1, 2, 4, 4, 4]
    assert [round(highest.next_delay(), 3) for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    highest.reset()
    assert round(highest.next_delay(), 3) == 0.5


def test_backoff_jitter_spreads_clients_apart() -> None:
    delays = {round(Backoff().next_delay(), 6) for _ in range(50)}
    assert len(delays) > 40 and all(0.25 <= d <= 0.5 for d in delays)


def message(msg_id: int) -> Message:
    return Message(msg_id, "alice", "bob", "hi", "2026-01-01T00:00:00.000Z")


def test_cursor_skips_repeats_only_from_servers_that_resume() -> None:
    cursor = MessageCursor()
    cursor.on_hello(Hello("bob", "s1", "chatcli", features=(Feature.RESUME,)))
    assert [cursor.is_new(message(i)) for i in (1, 2, 2, 1, 3)] == [True, True, False, False, True]
    cursor.on_hello(Hello("bob", "s2", "chatcli", features=(Feature.RESUME,)))
    assert not cursor.is_new(message(3)) and cursor.is_new(message(4))
    # An in-memory server restarts its ids at 1: nothing may be dropped.
    cursor.on_hello(Hello("bob", "s3", "chatcli"))
    assert cursor.is_new(message(1))


def test_cursor_restarts_when_the_server_says_its_store_changed() -> None:
    cursor = MessageCursor()
    assert cursor.on_hello(Hello("bob", "s1", "chatcli", features=(Feature.RESUME,), epoch="old")) is False
    assert cursor.is_new(message(5))
    assert cursor.resume_point(None) == ResumePoint(after=5, epoch="old")
    assert cursor.resume_point(None).headers() == {"Chatcli-After": "5", "Chatcli-Epoch": "old"}  # type: ignore[union-attr]
    assert cursor.on_hello(Hello("bob", "s2", "chatcli", features=(Feature.RESUME,), epoch="new", reset=True))
    assert cursor.is_new(message(1))  # the new store's message 1: not "already seen"
    assert cursor.resume_point(None) == ResumePoint(after=1, epoch="new")
    # A server without resume replays nothing and its ids restart anyway: nothing to warn about.
    assert cursor.on_hello(Hello("bob", "s3", "chatcli", epoch="run", reset=True)) is False


def numbered_texts(batches: TextBatches) -> list[tuple[int, str]]:
    """Every (line number, text) a text source gives, synchronous or not."""
    async def collect() -> list[tuple[int, str]]:
        if isinstance(batches, AsyncIterator):
            return [item async for batch in batches for item in batch]
        return [item for batch in batches for item in batch]

    return asyncio.run(collect())


def test_read_texts_argument_stdin_and_lines() -> None:
    def texts(text: str | None, lines: bool, stdin: str, isatty: bool = False) -> list[str]:
        batches = read_texts(text, lines=lines, stdin=io.StringIO(stdin), stdin_isatty=isatty)
        return [t for _, t in numbered_texts(batches)]

    assert texts("hi", False, "") == ["hi"]
    assert texts(None, False, "a\nb\n") == ["a\nb"]
    assert texts("-", False, "x\r\n") == ["x"]
    assert texts(None, True, "a\n\nb\r\nc") == ["a", "b", "c"]
    with pytest.raises(UsageError, match="--lines reads stdin"):
        texts("hi", True, "")
    with pytest.raises(UsageError, match="empty"):
        texts(None, False, "\n")
    with pytest.raises(UsageError, match="stdin is a terminal"):
        texts(None, False, "typed", isatty=True)
    with pytest.raises(UsageError, match="no non-empty line"):
        texts(None, True, "\n\n")


def test_lines_keep_their_input_line_numbers_and_survive_bad_utf8(tmp_path: Path) -> None:
    piped = tmp_path / "input"
    piped.write_bytes(b"one\n\nthr\xffee\r\n" + "é".encode() * 40000 + b"\nlast")  # é straddles reads
    with piped.open() as stdin:
        got = numbered_texts(read_texts(None, lines=True, stdin=stdin, stdin_isatty=False))
    assert got == [(1, "one"), (3, "thr\ufffdee"), (4, "é" * 40000), (5, "last")]


def test_user_url_percent_encodes_and_checks_the_id() -> None:
    assert user_url("ws://h:1/", "a@b.c") == "ws://h:1/a%40b.c"
    with pytest.raises(LocalProtocolError):
        user_url("ws://h:1", "../etc")


def test_session_sends_and_refuses_too_large_texts_locally(start_server: object) -> None:
    server: RunningServer = start_server("--max-text-bytes", "8")  # type: ignore[operator]
    settings = ClientSettings(url=server.ws_url, timeout=5)

    async def scenario() -> None:
        async with open_session(settings, "bob") as bob, open_session(settings, "alice") as alice:
            assert bob.hello.max_text_bytes == 8
            ack = await alice.send("bob", "12345678")
            assert ack.status == "delivered"
            with pytest.raises(RefusedError, match="at most 8 bytes") as refused:
                await alice.send("bob", "123456789")
            assert refused.value.reason == "too-large"

    asyncio.run(scenario())


def test_a_stopped_server_is_a_connect_error(server: RunningServer) -> None:
    url = server.ws_url
    server.stop()

    async def scenario() -> None:
        async with open_session(ClientSettings(url=url, timeout=2), "bob"):
            pass

    with pytest.raises(ConnectError, match="connection refused"):
        asyncio.run(scenario())


def test_a_frame_read_with_the_one_a_reader_waited_for_goes_to_the_next_reader(server: RunningServer) -> None:
    """What ``ask`` does: wait for the ack of its question, then read on for the answer. When the answer
    arrived in the same read as the ack (a slow client, a quick peer), it must not be lost with the batch."""
    settings = ClientSettings(url=server.ws_url, timeout=5)

    async def scenario() -> None:
        async with open_session(settings, "asker") as asker, open_session(settings, "oracle") as oracle:
            await asker.send_frame(Send(id="q1", to="oracle", text="deploy?"))
            question = await anext(f async for f in oracle.frames() if isinstance(f, Message))
            await oracle.send("asker", "yes")
            queued = asker._ws.recv_messages.frames  # wait until the ack and the answer are both read
            async with asyncio.timeout(5):
                while len(queued) < 2:
                    await asyncio.sleep(0.005)
            async for frame in asker.frames():
                if isinstance(frame, Ack):
                    break  # the answer came in the same batch, behind it
            async with asyncio.timeout(5):
                answer = await anext(aiter(asker.frames()))
            assert isinstance(answer, Message) and answer.text == "yes" and answer.id > question.id

    asyncio.run(scenario())


def test_a_resent_client_id_is_answered_as_duplicate_and_counts_as_sent(server: RunningServer) -> None:
    """What ``send`` relies on after a reconnect: the same id again is stored once and acknowledged."""
    settings = ClientSettings(url=server.ws_url, timeout=5)
    acks: list[Ack] = []

    async def send_twice() -> None:
        for _ in range(2):  # two runs that both use the id of the first attempt
            await send_messages(settings, "alice", "bob", [[(1, "only once")]], acks.append,
                                new_id=lambda: "retry-1")

    asyncio.run(send_twice())
    assert [(a.status, a.duplicate) for a in acks] == [("stored", False), ("stored", True)]
    assert acks[0].msg_id == acks[1].msg_id

    async def bob_history() -> tuple[Message, ...]:
        return await fetch_history(settings, "bob", "alice", 10)

    assert [m.text for m in asyncio.run(bob_history())] == ["only once"]


def test_since_values() -> None:
    assert parse_since("all") == ResumePoint(after=0)
    assert parse_since("42") == ResumePoint(after=42)
    assert parse_since("90m", now=86400.0) == ResumePoint(since="1970-01-01T22:30:00.000Z")
    for bad in ("", "x", "-1", "1y", "1.5"):
        with pytest.raises(UsageError, match="invalid --since"):
            parse_since(bad)


TERMINAL_CONTROLS = "\x7f\x9b\x9d\u2028\u2029\u202e\u2066"  # DEL, CSI, OSC, JS line breaks, bidi overrides


@pytest.mark.parametrize("text", [*NASTY_TEXTS, "\x7f", "\u2028", "tab\there", "é" * 3, "x" * 5000,
                                  "\x9b31mred", f"mixed {TERMINAL_CONTROLS} é"])
def test_a_listen_line_is_json_with_every_control_escaped(text: str) -> None:
    for reply_to in (None, 3):
        message = Message(7, "al.ice@example", "bob-1", text, "2026-01-01T00:00:00.000Z", reply_to)
        line = render.message_json(message)
        fields = {"id": 7, "from": "al.ice@example", "to": "bob-1", "text": text, "ts": "2026-01-01T00:00:00.000Z",
                  "reply_to": reply_to}
        assert json.loads(line) == fields
        # Printing the line is safe: C0 (json's own escapes) and C1 controls, DEL, bidi overrides all escaped.
        assert not any(c < " " or c in TERMINAL_CONTROLS for c in line)
        if not any(c in TERMINAL_CONTROLS for c in text):
            assert line == json.dumps(fields, ensure_ascii=False)  # otherwise the same bytes as json.dumps


def test_inbox_and_ack_lines_escape_terminal_controls_too() -> None:
    preview = f"look {TERMINAL_CONTROLS}"
    conversation = Conversation("bob", 1, 0, 5, "bob", "2026-01-01T00:00:00.000Z", preview)
    line = render.conversation_json(conversation)
    assert json.loads(line)["preview"] == preview and not any(c in TERMINAL_CONTROLS for c in line)
