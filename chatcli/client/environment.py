"""The process's standard streams, as one object the commands are given (httpie's ``Environment``).

Commands read stdin, write stdout and stderr, and ask whether each is a terminal only
through an ``Environment``, so a test substitutes the streams (``io.StringIO``) and says
whether they are terminals, without a pty. ``from_process()`` is the real one.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from typing import TextIO, cast

__all__ = ["Environment", "point_at_devnull"]


class Environment:
    """Standard streams, whether each is a terminal, and whether the user asked for no colour.

    A plain class, not a dataclass: every command builds one, and ``chatcli send --help``
    would otherwise pay for importing ``dataclasses``.
    """

    __slots__ = ("no_color", "stderr", "stderr_isatty", "stdin", "stdin_isatty", "stdout", "stdout_isatty")

    def __init__(self, stdin: TextIO, stdout: TextIO, stderr: TextIO, *, stdin_isatty: bool = False,
                 stdout_isatty: bool = False, stderr_isatty: bool = False, no_color: bool = False) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.stdin_isatty, self.stdout_isatty, self.stderr_isatty = stdin_isatty, stdout_isatty, stderr_isatty
        #: ``NO_COLOR`` is set to a non-empty value (https://no-color.org).
        self.no_color = no_color

    @classmethod
    def from_process(cls) -> Environment:
        """This process's ``sys.stdin``, ``sys.stdout`` and ``sys.stderr``, and ``$NO_COLOR``."""
        stdout = sys.stdout if sys.stdout is not None else cast(TextIO, _ClosedStdout())  # None: started with >&-
        stdin = sys.stdin if sys.stdin is not None else io.StringIO()  # started with <&-: nothing to read
        # Started with 2>&-: notices go nowhere (print(file=None) would put them among stdout's JSON lines).
        stderr = sys.stderr if sys.stderr is not None else open(os.devnull, "w")  # noqa: SIM115 - for the process
        return cls(stdin, stdout, stderr, stdin_isatty=_isatty(sys.stdin),
                   stdout_isatty=_isatty(sys.stdout), stderr_isatty=_isatty(sys.stderr),
                   no_color=bool(os.environ.get("NO_COLOR")))

    @property
    def colour(self) -> bool:
        """Colour on stdout: only on a terminal, and never with ``NO_COLOR``."""
        return self.stdout_isatty and not self.no_color

    def write_line(self, line: str, flush: bool = True) -> None:
        """Write one line to stdout, flushed at once unless the caller flushes a batch (``flush()``).

        If the reader has gone (``| head -1``), stdout is pointed at /dev/null and
        ``BrokenPipeError`` is re-raised for the caller to stop.
        """
        try:
            self.stdout.write(line + "\n")
            if flush:
                self.stdout.flush()
        except BrokenPipeError:
            raise _reader_gone(self.stdout) from None

    def flush(self) -> None:
        """Flush stdout (see ``write_line``)."""
        try:
            self.stdout.flush()
        except BrokenPipeError:
            raise _reader_gone(self.stdout) from None

    def reader_gone(self) -> bool:
        """Whether stdout is a pipe that nobody reads any more (``| head -1`` has exited): then stdout is
        pointed at /dev/null, as after a failed write. False for a terminal, a file, or no descriptor."""
        try:
            descriptor = self.stdout.fileno()
            if not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
                return False
        except (OSError, ValueError):  # io.UnsupportedOperation is both
            return False
        import select  # only for a listen into a pipe

        poller = select.poll()
        poller.register(descriptor, 0)  # no events asked: a pipe's closed reader is reported all the same
        if not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return False
        point_at_devnull(self.stdout)
        return True

    def notice(self, text: str) -> None:
        """A line from chatcli itself on stderr: ``chatcli: text``."""
        print(f"chatcli: {text}", file=self.stderr, flush=True)


class _ClosedStdout(io.TextIOBase):
    """The stdout of a process started with it closed: writing says so instead of failing on ``None``."""

    def write(self, text: str) -> int:
        from chatcli.errors import ClientError

        raise ClientError("cannot write the output: stdout is closed")


def _reader_gone(stdout: TextIO) -> BrokenPipeError:
    """The error for a write nobody reads, with stdout pointed at /dev/null.

    Without an errno: Click's ``main`` turns an ``EPIPE`` into exit 1 before chatcli sees it, and a
    reader that leaves early (``history | head -1``) is a success here.
    """
    point_at_devnull(stdout)
    return BrokenPipeError("the reader of stdout went away")


def point_at_devnull(stream: TextIO) -> None:
    """The reader of ``stream`` went away: send the rest to /dev/null.

    Without this the interpreter's final flush at exit fails again and prints a
    traceback after chatcli has already exited quietly. Streams without a file
    descriptor (a test's ``StringIO``) are left alone.
    """
    try:
        descriptor = stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def _isatty(stream: TextIO | None) -> bool:
    """Whether ``stream`` is a terminal; a closed or missing stream (``sys.stdin`` can be None) is not."""
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False
