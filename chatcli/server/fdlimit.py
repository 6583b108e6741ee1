"""How many connections the process can hold: every connection is a file descriptor, and a desktop's
default soft limit (often 1,024) would silently cap the server far below ``--max-connections``."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Descriptors kept free beyond those open at start-up and the HTTP port's: SQLite's journal, WAL and
#: temporary files, the accounts database, a TLS handshake or an accept in flight.
__all__ = ["FD_RESERVE", "FdLimit", "connection_capacity", "fit_connections", "open_fd_count", "raise_fd_limit"]

FD_RESERVE = 32

#: Linux's default ceiling (fs.nr_open) and macOS's OPEN_MAX: the soft limit tried when the hard one is
#: "unlimited", which setrlimit refuses as a soft value.
_UNLIMITED_HARD_TRIES = (1 << 20, 10240)


@dataclass(frozen=True, slots=True)
class FdLimit:
    """The soft RLIMIT_NOFILE before and after start-up raised it (None: unlimited or unknown)."""

    before: int | None
    after: int | None

    @property
    def raised(self) -> bool:
        return self.before is not None and self.after != self.before


def raise_fd_limit() -> FdLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as far as the platform allows)."""
    try:
        import resource
    except ImportError:  # no such limit on this platform (Windows)
        return FdLimit(None, None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return FdLimit(None, None)
    for target in _UNLIMITED_HARD_TRIES if hard == resource.RLIM_INFINITY else (hard,):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return FdLimit(soft, target)
    return FdLimit(soft, soft)


def open_fd_count() -> int | None:
    """Descriptors this process has open now, where the platform can tell."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory)) - 1  # listing the directory opened one more
        except OSError:
            continue
    return None


def connection_capacity(limit: int, open_now: int, http_connections: int) -> int:
    """WebSocket connections that fit under ``limit`` beside those open now, the HTTP port's and the reserve."""
    return max(0, limit - open_now - http_connections - FD_RESERVE)


def fit_connections(requested: int, capacity: int, refusing: int) -> int:
    """The most WebSocket connections to admit: ``requested``, or fewer when ``capacity`` has no room for it
    plus the ``refusing`` connections still read to be told "server full" (503).

    Without this, connections past the descriptors fail at accept, and the peer sees its socket closed with
    no answer. When the room is short, an eighth of it at most is kept for those polite refusals.
    """
    if requested + refusing <= capacity:
        return requested
    return max(1, min(requested, capacity - min(refusing, capacity // 8)))
