"""Reconnection and cursors: backoff between attempts, and where the next session's stream starts.

No I/O but the cursor file: ``ResumePoint`` becomes handshake headers, ``MessageCursor`` keeps
the last message id seen and the store (epoch) it came from so a resumed stream neither repeats
nor skips, and ``CursorFile`` keeps that cursor between runs of ``listen --cursor-file``.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from chatcli.errors import ClientError, UsageError
from chatcli.protocol import (
    EPOCH_HEADER,
    EPOCH_RULE,
    RECEIVE_HEADER,
    REPLAY_SINCE_HEADER,
    RESUME_AFTER_HEADER,
    Feature,
    Hello,
    Message,
    is_valid_epoch,
)

__all__ = ["Backoff", "CursorFile", "MessageCursor", "ResumePoint", "SavedCursor", "store_changed"]


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a session's backlog starts; neither field set means "after the server-side cursor"."""

    #: Only messages with a greater id (``Chatcli-After``); 0 means every stored message.
    after: int | None = None
    #: The store ``after`` belongs to (``Chatcli-Epoch``, from a hello); None when unknown.
    epoch: str | None = None
    #: Only messages received since this ISO 8601 UTC time (``Chatcli-Since``).
    since: str | None = None
    #: False for sessions that only send or ask (``Chatcli-Receive: none``): they get no messages and
    #: do not make their user look online, so a message to ME is stored, not "delivered" to a `send`.
    receive: bool = True

    @classmethod
    def live_only(cls) -> ResumePoint:
        """For sessions that only send or ask for history: no backlog to skip over."""
        return cls(receive=False)

    def headers(self) -> dict[str, str]:
        out = {}
        if self.after is not None:
            out[RESUME_AFTER_HEADER] = str(self.after)
            if self.epoch is not None:
                out[EPOCH_HEADER] = self.epoch
        if self.since is not None:
            out[REPLAY_SINCE_HEADER] = self.since
        if not self.receive:
            out[RECEIVE_HEADER] = "none"
        return out


class Backoff:
    """Capped exponential backoff with jitter: delay n is uniform in [d/2, d], d = min(cap, first * 2**n)."""

    def __init__(self, first: float = 0.5, cap: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.first = first
        self.cap = cap
        self._rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling: float = min(self.cap, self.first * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return ceiling / 2 + self._rng() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0


class MessageCursor:
    """The last message id seen and the store it came from, so a resumed stream neither repeats nor skips."""

    def __init__(self) -> None:
        self.last_id: int | None = None
        #: The epoch of the server's store that ``last_id`` belongs to (None: an older server).
        self.epoch: str | None = None
        self.resumable = False
        self.sessions = 0  # opened so far: none means the server was never reached

    def on_hello(self, hello: Hello) -> bool:
        """Adopt the server's store; True when it says our resume point was from another store (a reset)."""
        self.sessions += 1
        self.resumable = Feature.RESUME in hello.features
        self.epoch = hello.epoch
        if not self.resumable:
            self.last_id = None  # ids of a server without resume restart after it does: forget ours
            return False
        if hello.reset:
            self.last_id = 0  # the server replays this store from its beginning: skip nothing of it
        return hello.reset

    def resume_point(self, start: ResumePoint | None) -> ResumePoint | None:
        """Where the next session starts: right after the last message seen, else at ``start``."""
        return ResumePoint(after=self.last_id, epoch=self.epoch) if self.last_id is not None else start

    def is_new(self, message: Message) -> bool:
        if self.resumable and self.last_id is not None and message.id <= self.last_id:
            return False
        self.last_id = message.id
        return True


def store_changed(resumed: ResumePoint | None) -> str:
    """The warning for a hello with ``reset``: our resume point was from another store."""
    after = f" instead of after message {resumed.after}" if resumed is not None and resumed.after else ""
    return ("the server's message store changed (a new, wiped or restored database): "
            f"starting from its beginning{after}")


class SavedCursor(NamedTuple):
    """What a cursor file holds: the last message id handled, and the store (epoch) it came from."""

    last_id: int
    epoch: str | None  # None in files written before epochs, or for a server that announces none

    def resume_point(self) -> ResumePoint:
        return ResumePoint(after=self.last_id, epoch=self.epoch)


class CursorFile:
    """``listen --cursor-file``: the last message id handled and its store's epoch, kept between runs.

    The file holds one line: the decimal id, then a space and the epoch of the server's store
    (``42 5d1c0a3e…``). A file with the id alone (written by an older chatcli) still loads:
    the server then checks the id only. It is replaced atomically (temporary file, then
    ``os.replace``), so a listener killed at any moment leaves the old or the new line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: int | None = None  # the descriptor holding the lock, for the life of the process

    def load(self) -> SavedCursor | None:
        """The saved cursor; ``None`` when the file does not exist yet. Claims the file first: two listens
        sharing one (a cron job started twice) would both handle every message."""
        self._claim()
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                raise UsageError(f"cannot keep a cursor in {str(self.path)!r}: "
                                 "its directory does not exist") from None
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the cursor file {str(self.path)!r}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        last_id, _, epoch = text.partition(" ")
        if not (last_id.isascii() and last_id.isdigit() and (not epoch or is_valid_epoch(epoch))):
            raise UsageError(f"the cursor file {str(self.path)!r} is corrupt: expected a message id, optionally "
                             f"followed by a space and an epoch ({EPOCH_RULE}), found {text[:80]!r}; "
                             "delete it to start from the server's cursor")
        return SavedCursor(int(last_id), epoch or None)

    def _claim(self) -> None:
        """Hold an exclusive lock on ``.NAME.lock`` beside the file (the file itself is replaced at each save)."""
        import fcntl

        if self._lock is not None:
            return
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return  # a folder we cannot write in: load and save say why
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise UsageError(f"the cursor file {str(self.path)!r} is in use by another chatcli listen: one "
                             "cursor file per listener (or every message is handled twice)") from None
        self._lock = descriptor

    def save(self, msg_id: int, epoch: str | None) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(f"{msg_id} {epoch}\n" if epoch else f"{msg_id}\n", encoding="ascii")
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a full disk would otherwise keep an empty file per attempt
                temporary.unlink()
            raise ClientError(f"cannot write the cursor file {str(self.path)!r}: {exc.strerror or exc}") from None
