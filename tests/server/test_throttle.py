"""The failed-authentication throttle, in-process with an explicit clock."""

from __future__ import annotations

from chatcli.server import throttle
from chatcli.server.throttle import AuthThrottle


def test_an_address_is_refused_after_too_many_failures_until_the_window_ends() -> None:
    limiter = AuthThrottle(max_failures=3, window_s=60)
    assert [limiter.failed("a", now=t) for t in (0, 1, 2)] == [False, False, True]
    assert limiter.retry_after("a", now=10) == 50
    assert limiter.retry_after("b", now=10) == 0  # other addresses are unaffected
    assert limiter.retry_after("a", now=60) == 0  # the window is over: a fresh start
    assert not limiter.failed("a", now=61)


def test_memory_stays_bounded_under_a_flood_of_addresses() -> None:
    limiter = AuthThrottle()
    for i in range(throttle.MAX_ADDRESSES + 500):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", now=0)
    assert len(limiter) == throttle.MAX_ADDRESSES
