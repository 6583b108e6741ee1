"""What the commands read from their arguments and stdin: ``listen --since`` and the texts ``send`` sends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TextIO

from chatcli.client.reconnect import ResumePoint
from chatcli.errors import UsageError
from chatcli.protocol import format_ts
from chatcli.units import parse_duration

__all__ = ["parse_since", "read_texts"]


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


def read_texts(text: str | None, *, lines: bool, stdin: TextIO, stdin_isatty: bool) -> Iterator[str]:
    """The messages ``send`` should send: the argument, all of stdin, or one per stdin line."""
    if text is not None and text != "-":
        if lines:
            raise UsageError("--lines reads stdin: give no TEXT (or '-')")
        return iter([_non_empty(text)])
    if stdin_isatty:
        raise UsageError("no TEXT given and stdin is a terminal: pass TEXT, or pipe the message in")
    if lines:
        return _stdin_lines(stdin)
    whole = stdin.read()
    return iter([_non_empty(whole[:-1] if whole.endswith("\n") else whole)])


def _non_empty(text: str) -> str:
    text = text[:-1] if text.endswith("\r") else text
    if not text:
        raise UsageError("the message is empty")
    return text


def _stdin_lines(stdin: TextIO) -> Iterator[str]:
    """Each non-empty line, read as it comes (so ``tail -f log | chatcli send --lines`` streams)."""
    sent = 0
    for line in iter(stdin.readline, ""):
        line = line.rstrip("\r\n")
        if line:
            sent += 1
            yield line
    if not sent:
        raise UsageError("stdin held no non-empty line to send")
