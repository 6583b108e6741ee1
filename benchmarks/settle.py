"""What the benchmarks share: waiting until a reading of the server stops changing."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["settled"]


def settled(read: Callable[[], float], quiet_s: float = 1.0, poll_s: float = 0.05) -> float:
    """The value of ``read()`` once it has not changed for ``quiet_s`` (a server works in batches)."""
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(poll_s)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last
