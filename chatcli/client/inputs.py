"""What the commands read from their arguments and stdin: ``listen --since`` and the texts ``send`` sends."""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import asyncio

    from chatcli.client.commands import TextBatches
from chatcli.client.reconnect import ResumePoint
from chatcli.errors import LocalProtocolError, UsageError
from chatcli.protocol import format_ts, parse_ts
from chatcli.units import parse_duration

__all__ = ["parse_search_since", "parse_since", "read_text", "read_texts"]


def parse_since(value: str, now: float | None = None) -> ResumePoint:
    """``listen --since``: a message id (digits only), ``all``, or a duration with a unit (``1h``, ``2d``)."""
    value = value.strip()
    if value.lower() == "all":
        return ResumePoint(after=0)
    if value.isascii() and value.isdigit():
        return ResumePoint(after=int(value))
    try:
        if not value[-1:].isalpha():  # a bare number is an id: a duration needs its unit
            raise ValueError(value)
        seconds = parse_duration(value)
    except ValueError:
        raise UsageError(f"invalid --since {value!r}: use a message id (e.g. 42), a duration with a unit "
                         "(e.g. 30m, 1h, 2d) or 'all'") from None
    return ResumePoint(since=format_ts((time.time() if now is None else now) - seconds))


def parse_search_since(value: str, now: float | None = None) -> str:
    """``search --since``: a duration back from now (``30m``, ``2d``) or an ISO 8601 time with a zone."""
    value = value.strip()
    try:
        return format_ts(parse_ts(value))
    except LocalProtocolError:
        pass
    try:
        if not value[-1:].isalpha():
            raise ValueError(value)
        seconds = parse_duration(value)
    except ValueError:
        raise UsageError(f"invalid --since {value!r}: use a duration with a unit (e.g. 30m, 1h, 2d) or an "
                         "ISO 8601 time with a zone (e.g. 2026-11-25T10:00:00Z)") from None
    return format_ts((time.time() if now is None else now) - seconds)


def read_texts(text: str | None, *, lines: bool, stdin: TextIO, stdin_isatty: bool) -> TextBatches:
    """The messages ``send`` should send, numbered by input line: the argument, all of stdin, or one per
    stdin line (as they come)."""
    if lines:
        if text is not None and text != "-":
            raise UsageError("--lines reads stdin: give no TEXT (or '-')")
        if stdin_isatty:
            raise UsageError(_NO_TEXT)
        return _stdin_lines(stdin)
    return [[(1, read_text(text, stdin=stdin, stdin_isatty=stdin_isatty))]]


_NO_TEXT = "no TEXT given and stdin is a terminal: pass TEXT, or pipe the message in"


def read_text(text: str | None, *, stdin: TextIO, stdin_isatty: bool) -> str:
    """The one message of a ``send`` without ``--lines``: the argument, else all of stdin."""
    if text is not None and text != "-":
        return _non_empty(text)
    if stdin_isatty:
        raise UsageError(_NO_TEXT)
    whole = stdin.read()
    return _non_empty(whole[:-1] if whole.endswith("\n") else whole)


def _non_empty(text: str) -> str:
    text = text[:-1] if text.endswith("\r") else text
    if not text:
        raise UsageError("the message is empty")
    return _valid_utf8(text)


def _valid_utf8(text: str) -> str:
    """Bytes that are not UTF-8 reach us from argv or stdin as lone surrogates (Python's surrogateescape):
    name the byte, rather than let the protocol's check speak of surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UsageError(f"the message is not valid UTF-8 text: {what} at character {exc.start + 1}") from None
    return text


async def _stdin_lines(stdin: TextIO) -> AsyncIterator[list[tuple[int, str]]]:
    """Each non-empty line with its line number, in batches of what one read returned.

    One read of the file descriptor per batch, in a worker thread: a 100k-line file costs a
    few dozen thread hops, not one per line, and a read returns as soon as anything arrived,
    so ``tail -f log | chatcli send --lines`` sends each line when it is written. Bytes that are
    not UTF-8 become U+FFFD rather than stopping the stream.
    """
    chunks = _fd_chunks(stdin) if _has_fd(stdin) else _text_chunks(stdin)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    number, sent, partial = 0, 0, ""
    async for chunk in chunks:
        text = partial + decoder.decode(chunk, final=not chunk)
        *complete, partial = text.split("\n") if chunk else [*text.split("\n"), ""]
        batch = []
        for line in complete:
            number += 1
            line = line.rstrip("\r")
            if line:
                batch.append((number, line))
        if batch:
            sent += len(batch)
            yield batch
        if not chunk:
            break
    if not sent:
        raise UsageError("stdin held no non-empty line to send")


READ_BYTES = 1 << 16


def _has_fd(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    return True


async def _fd_chunks(stdin: TextIO) -> AsyncIterator[bytes]:
    """Raw reads of stdin's descriptor until end of file (then one empty chunk).

    A pipe is read when the event loop says it is readable, never by a thread blocked in ``read``: such
    a thread would keep a Ctrl-C'd (or SIGINT'd) ``send --lines`` alive until its input wrote again, as
    ``asyncio.run`` waits for its threads. What the loop cannot watch (a regular file, /dev/null) never
    blocks for long, so it is read in a worker thread.
    """
    import asyncio  # here: a one-message send runs without asyncio

    loop, fd = asyncio.get_running_loop(), stdin.fileno()
    watchable = _can_watch(loop, fd)
    while chunk := await (_read_when_readable(loop, fd) if watchable
                          else loop.run_in_executor(None, os.read, fd, READ_BYTES)):
        yield chunk
    yield b""


def _can_watch(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    try:
        loop.add_reader(fd, lambda: None)
    except (OSError, ValueError):  # epoll refuses regular files and some devices
        return False
    loop.remove_reader(fd)
    return True


async def _read_when_readable(loop: asyncio.AbstractEventLoop, fd: int) -> bytes:
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():  # level-triggered: it may fire again before the reader is removed
            readable.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return os.read(fd, READ_BYTES)  # readable: returns at once with what is there (b"" at the end)


async def _text_chunks(stdin: TextIO) -> AsyncIterator[bytes]:
    """A stream without a descriptor (a substituted stdin in tests): its text, then end of file."""
    while text := stdin.read(READ_BYTES):
        yield text.encode()
    yield b""
