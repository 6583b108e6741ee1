"""Log lines for limits that bite: at most one per limit per interval, each counting the bites since the last.

A flood (idle HTTP connections, refused handshakes) must reach the operator's
log without flooding it: the first bite is logged at once, later ones are
counted into the next line an interval on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

__all__ = ["LimitLog"]

log = logging.getLogger("chatcli.server")

#: A limit that bites is logged at most once per this many seconds, with a count.
LIMIT_LOG_INTERVAL_S: Final = 10.0


class LimitLog:
    """One log line per limit per interval, however often it bites; each line counts the bites since the last."""

    def __init__(self, event: str, interval: float = LIMIT_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.interval = interval
        self.clock = clock
        self.logged_at: dict[str, float] = {}
        self.unlogged: dict[str, int] = {}

    def bit(self, limit: str, level: int, message: str, **fields: object) -> None:
        count = self.unlogged.get(limit, 0) + 1
        now = self.clock()
        last = self.logged_at.get(limit)
        if last is not None and now - last < self.interval:
            self.unlogged[limit] = count
            return
        self.logged_at[limit], self.unlogged[limit] = now, 0
        log.log(level, "%s (%d time(s) since the last such line)", message, count,
                extra={"event": self.event, "limit": limit, "count": count, **fields})
