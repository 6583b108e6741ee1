"""Counters the server keeps about itself, cheap enough for the per-message path, and their
Prometheus text exposition for ``GET /metrics``.

Sessions are counted by protocol under their codec's name (``chatcli.server.codecs``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["ACK_LATENCY_BUCKETS", "Histogram", "Metrics", "histogram_lines", "render_prometheus"]

#: Upper bounds (seconds) of the ack latency buckets: from a frame's arrival to its ack being queued.
ACK_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    bounds: tuple[float, ...] = ACK_LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(ACK_LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float, times: int = 1) -> None:
        """Record ``times`` observations of the same value (a batch acknowledged together)."""
        self.counts[bisect_left(self.bounds, seconds)] += times
        self.total += seconds * times
        self.count += times


@dataclass
class Metrics:
    sessions_opened: Counter[str] = field(default_factory=Counter)  # by protocol (its codec's name)
    handshakes_refused: Counter[int] = field(default_factory=Counter)  # by HTTP status
    routed: int = 0  # delivered to at least one open session
    stored: int = 0  # accepted for a recipient with no open session
    refusals: Counter[str] = field(default_factory=Counter)  # by reason
    errors: Counter[str] = field(default_factory=Counter)  # by code
    closed: Counter[str] = field(default_factory=Counter)  # sessions closed by the server, by why
    rate_waits: int = 0  # a connection stopped reading: its user had no request left (--rate/--burst)
    rate_wait_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    ack_latency: Histogram = field(default_factory=Histogram)

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1


def _line(name: str, value: float, labels: Mapping[str, object] | None = None) -> str:
    if labels:
        inner = ",".join(f'{key}="{_escape(str(val))}"' for key, val in labels.items())
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def render_prometheus(metrics: Metrics, gauges: Mapping[str, Mapping[str, float]]) -> str:
    """The text exposition format; ``gauges`` maps a gauge name to {label value: value} read at scrape time."""
    m = metrics
    out: list[str] = []
    out += _family("chatcli_connections", "gauge", "Open TCP connections on the WebSocket port.",
                   [_line("chatcli_connections", gauges["connections"][""])])
    out += _family("chatcli_sessions", "gauge", "Open chat sessions by protocol.",
                   [_line("chatcli_sessions", v, {"protocol": k}) for k, v in sorted(gauges["sessions"].items())])
    out += _family("chatcli_sessions_opened_total", "counter", "Sessions opened since start, by protocol.",
                   [_line("chatcli_sessions_opened_total", v, {"protocol": k})
                    for k, v in sorted(m.sessions_opened.items())])
    out += _family("chatcli_handshakes_refused_total", "counter", "WebSocket handshakes refused, by HTTP status.",
                   [_line("chatcli_handshakes_refused_total", v, {"status": k})
                    for k, v in sorted(m.handshakes_refused.items())])
    out += _family("chatcli_messages_routed_total", "counter", "Messages delivered to an open session.",
                   [_line("chatcli_messages_routed_total", m.routed)])
    out += _family("chatcli_messages_stored_total", "counter", "Messages stored for a recipient who was offline.",
                   [_line("chatcli_messages_stored_total", m.stored)])
    out += _family("chatcli_messages_refused_total", "counter", "Messages refused, by reason.",
                   [_line("chatcli_messages_refused_total", v, {"reason": k}) for k, v in sorted(m.refusals.items())])
    out += _family("chatcli_errors_total", "counter", "Bad frames and other errors, by code.",
                   [_line("chatcli_errors_total", v, {"code": k}) for k, v in sorted(m.errors.items())])
    out += _family("chatcli_sessions_closed_total", "counter", "Sessions the server closed, by why.",
                   [_line("chatcli_sessions_closed_total", v, {"why": k}) for k, v in sorted(m.closed.items())])
    out += _family("chatcli_rate_limit_waits_total", "counter",
                   "Times a connection stopped reading until its user's bucket refilled (--rate, --burst).",
                   [_line("chatcli_rate_limit_waits_total", m.rate_waits)])
    out += _family("chatcli_rate_limit_wait_seconds_total", "counter",
                   "Seconds connections spent not read for their user's rate limit.",
                   [_line("chatcli_rate_limit_wait_seconds_total", m.rate_wait_seconds)])
    out += _family("chatcli_bytes_received_total", "counter", "Bytes read from WebSocket connections.",
                   [_line("chatcli_bytes_received_total", m.bytes_in)])
    out += _family("chatcli_bytes_sent_total", "counter", "Bytes written to WebSocket connections.",
                   [_line("chatcli_bytes_sent_total", m.bytes_out)])
    out += _family("chatcli_db_bytes", "gauge", "Size of the message database on disk (0 when ephemeral).",
                   [_line("chatcli_db_bytes", gauges["db_bytes"][""])])
    out += _family("chatcli_ack_latency_seconds", "histogram",
                   "From a send's arrival to its ack (includes the commit of durable messages).",
                   histogram_lines("chatcli_ack_latency_seconds", m.ack_latency))
    return "\n".join(out) + "\n"


def histogram_lines(name: str, histogram: Histogram) -> list[str]:
    lines, running = [], 0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
        running += count
        lines.append(_line(f"{name}_bucket", running, {"le": f"{bound:g}"}))
    lines.append(_line(f"{name}_bucket", histogram.count, {"le": "+Inf"}))
    lines.append(_line(f"{name}_sum", histogram.total))
    lines.append(_line(f"{name}_count", histogram.count))
    return lines
