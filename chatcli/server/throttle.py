"""Throttling of repeated failed authentication from one network address.

A wrong token or key costs the server an HMAC and costs a guesser nothing, so
an address that keeps failing is refused for a while before its credentials
are even looked at. Keyed by IP address, not by connection: a guesser opens a
new connection per try.
"""

from __future__ import annotations

from typing import Final

__all__ = ["AuthThrottle"]

#: Failures from one address within the window before it is refused.
MAX_FAILURES: Final = 10
#: Seconds a failure counts, and how long an address over the limit is refused.
WINDOW_S: Final = 60.0
#: Addresses remembered at most: a flood of addresses evicts the oldest, so memory stays bounded.
MAX_ADDRESSES: Final = 10_000


class AuthThrottle:
    """Counts failed authentications per address in a fixed window."""

    __slots__ = ("_failures", "max_failures", "window_s")

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        # address -> (failures, time of the first failure in the window); dicts keep insertion order,
        # which makes the first key the oldest to evict.
        self._failures: dict[str, tuple[int, float]] = {}

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again; 0 when it may try now."""
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        count, since = entry
        if now - since >= self.window_s:
            del self._failures[address]
            return 0.0
        return self.window_s - (now - since) if count >= self.max_failures else 0.0

    def failed(self, address: str, now: float) -> bool:
        """Record a failure; True when ``address`` is now over the limit."""
        count, since = self._failures.pop(address, (0, now))
        if now - since >= self.window_s:
            count, since = 0, now
        self._failures[address] = (count + 1, since)  # re-inserted: newest last
        if len(self._failures) > MAX_ADDRESSES:
            del self._failures[next(iter(self._failures))]
        return count + 1 >= self.max_failures

    def __len__(self) -> int:
        return len(self._failures)
