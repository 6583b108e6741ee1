"""Counters the server keeps about itself, cheap enough for the per-message path."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    connections_total: Counter[str] = field(default_factory=Counter)  # by protocol
    handshakes_refused: Counter[int] = field(default_factory=Counter)  # by HTTP status
    routed: int = 0
    stored: int = 0  # accepted for a recipient with no open session
    refusals: Counter[str] = field(default_factory=Counter)  # by reason
    errors: Counter[str] = field(default_factory=Counter)  # by code
    bytes_in: int = 0
    bytes_out: int = 0

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1
