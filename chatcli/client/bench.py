"""``chatcli bench``: a load generator that measures a relay and verifies what it delivered.

Pairs of sessions, sender *i* → receiver *i*, like ``../shared/bench/loadgen.js``: each sender keeps up
to ``window`` messages unacknowledged; each text carries its sequence number and the sender's
``time.monotonic_ns()`` (``"<seq>:<ns>:xxxx…"``), so the receiver measures send-to-receipt latency and
checks that every message of its pair arrived once and in order.

It speaks either protocol (``native``: ``chatcli.v1`` with client ids, acks and ``message`` frames;
``legacy``: the seed app's frames, so the seed's Node server can be measured too). The sessions are
driven through websockets' sans-I/O ``ClientProtocol`` from an ``asyncio.Protocol`` (uvloop when
installed): each burst of frames is parsed as bytes, only the few fields needed, and each sender's window
is written with one ``writelines``, so one process drives tens of thousands of messages a second.
``procs > 1`` spreads the pairs over that many processes (``multiprocessing``, spawn), each with its own
histogram and counts, merged at the end. Every connection is open before the clock starts.

No Typer here, and no Rich: the command in ``chatcli.cli`` draws the progress bar only on a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast
from urllib.parse import quote

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from chatcli import protocol as p
from chatcli.errors import AuthError, ConnectError, ExitStatus, UsageError

__all__ = ["LEGACY", "NATIVE", "PROTOCOLS", "RESULT_KEYS", "BenchOptions", "Counts", "Histogram", "exit_status",
           "result", "run", "split_pairs", "summary_text"]

NATIVE: Final = "native"
LEGACY: Final = "legacy"
PROTOCOLS: Final = (NATIVE, LEGACY)

#: Keys of the ``--json`` object, in order (docs/clients.md describes each).
RESULT_KEYS: Final = (
    "url", "protocol", "pairs", "messages_per_pair", "window", "size", "procs",
    "sent", "acked", "refused", "unanswered", "delivered", "lost", "duplicated", "out_of_order", "unexpected",
    "connections_lost", "lost_because", "timed_out", "ok", "exit_status",
    "seconds", "msgs_per_s", "latency_ms",
)


# ---------------------------------------------------------------------------
# The histogram: log-linear buckets (HdrHistogram's layout), bounded memory, mergeable
# ---------------------------------------------------------------------------

#: Values below 2**SUB_BITS microseconds get a bucket each; above, each power of two is split into
#: 2**(SUB_BITS-1) buckets, so a bucket is at most 1/64 (1.6 %) of its values wide.
SUB_BITS: Final = 7
_SUB: Final = 1 << SUB_BITS
_HALF: Final = _SUB >> 1
#: Longest latency told apart: ~73 minutes in microseconds; longer ones land in the last bucket.
MAX_TRACKED_US: Final = (1 << 32) - 1
_BUCKETS: Final = _SUB + (32 - SUB_BITS) * _HALF


def bucket_index(us: int) -> int:
    """The bucket of a latency of ``us`` microseconds (negative counts as 0)."""
    if us < _SUB:
        return us if us > 0 else 0
    if us > MAX_TRACKED_US:
        us = MAX_TRACKED_US
    shift = us.bit_length() - SUB_BITS
    return _SUB + (shift - 1) * _HALF + (us >> shift) - _HALF


def bucket_high(index: int) -> int:
    """The highest value (µs) that lands in bucket ``index``."""
    if index < _SUB:
        return index
    shift = (index - _SUB) // _HALF + 1
    top = (index - _SUB) % _HALF + _HALF
    return ((top + 1) << shift) - 1


class Histogram:
    """Latencies in microseconds, as counts per log-linear bucket: fixed size, exact count and max."""

    __slots__ = ("count", "counts", "max_us", "total_us")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.max_us = 0
        self.total_us = 0

    def record(self, us: int) -> None:
        self.counts[bucket_index(us)] += 1
        self.count += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, q: float) -> int:
        """The value (µs) at quantile ``q`` (0-1): the top of its bucket, never above the exact max."""
        if self.count == 0:
            return 0
        rank = max(1, min(self.count, int(q * self.count + 0.999999)))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(bucket_high(index), self.max_us)
        return self.max_us  # pragma: no cover

    def summary_ms(self) -> dict[str, float | None]:
        if self.count == 0:
            return {"p50": None, "p90": None, "p99": None, "p99_9": None, "max": None, "mean": None}
        out: dict[str, float | None] = {
            name: round(self.percentile(q) / 1000, 3)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999))}
        out["max"] = round(self.max_us / 1000, 3)
        out["mean"] = round(self.total_us / self.count / 1000, 3)
        return out


# ---------------------------------------------------------------------------
# Options and results
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What ``chatcli bench`` runs; picklable, so spawned workers get it whole."""

    url: str = "ws://127.0.0.1:6060"
    pairs: int = 50
    messages: int = 2000
    window: int = 32
    size: int = 64
    protocol: str = NATIVE
    procs: int = 1
    #: The shared key: in every legacy frame, and as ``Authorization: Bearer`` for native sessions.
    auth_key: str = field(default=p.DEFAULT_AUTH_KEY, repr=False)
    #: Seconds to open the connections, and the longest silence while acks are still due.
    timeout: float = 10.0
    #: Seconds to keep waiting, once every ack is in, for acknowledged messages that have not arrived.
    grace: float = 2.0
    #: User ids are ``<prefix>s<i>`` and ``<prefix>r<i>``; a fresh random one per run by default.
    prefix: str = ""
    cafile: str | None = None
    insecure: bool = False

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        for name, value in (("--pairs", self.pairs), ("--messages", self.messages), ("--window", self.window),
                            ("--procs", self.procs)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, not {value}")
        if self.size < 0:
            raise UsageError(f"--size must be 0 or more, not {self.size}")
        if self.procs > self.pairs:
            raise UsageError(f"--procs {self.procs} is more than --pairs {self.pairs}: each process drives whole pairs")
        if self.prefix and not p.is_valid_user_id(self.user(self.pairs - 1, "s")):
            raise UsageError(f"--prefix {self.prefix!r} does not make valid user ids: {p.USER_ID_RULE}")

    def user(self, index: int, role: str) -> str:
        return f"{self.prefix}{role}{index}"


@dataclass(slots=True)
class Counts:
    """What one worker (or all of them, merged) saw."""

    sent: int = 0
    acked: int = 0  # accepted: delivered or stored (native), send:success (legacy)
    refused: int = 0  # native refused acks, legacy send:error
    delivered: int = 0  # distinct messages of this run that arrived
    lost: int = 0  # accepted, never arrived
    duplicated: int = 0  # arrivals of a message already seen
    out_of_order: int = 0  # first arrivals with a lower sequence number than one already seen in that pair
    unexpected: int = 0  # frames that are not a message of this run: garbled, other senders, refused ones arriving
    connections_lost: int = 0
    lost_because: str = ""  # why the first lost session closed, e.g. "the server closed it with 1009 (…)"
    timed_out: bool = False
    first_ns: int = 0  # when the clock started (time.monotonic_ns)
    last_ns: int = 0  # the last delivery, or the last ack when nothing was delivered

    def merge(self, other: Counts) -> None:
        for name in ("sent", "acked", "refused", "delivered", "lost", "duplicated", "out_of_order", "unexpected",
                     "connections_lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lost_because = self.lost_because or other.lost_because
        self.timed_out = self.timed_out or other.timed_out
        self.first_ns = min(self.first_ns, other.first_ns) if self.first_ns else other.first_ns
        self.last_ns = max(self.last_ns, other.last_ns)


def exit_status(counts: Counts) -> ExitStatus:
    """0 only when every message was accepted and arrived once, in order.

    3 when sessions were lost (the server went away), else 5 when any message was refused, else 6 when
    acks never came, else 1 when any accepted message was lost, duplicated or delivered out of order.
    """
    if counts.connections_lost:
        return ExitStatus.CONNECT
    if counts.refused:
        return ExitStatus.REFUSED
    if counts.timed_out or counts.acked + counts.refused < counts.sent:
        return ExitStatus.TIMEOUT
    if counts.lost or counts.duplicated or counts.out_of_order or counts.unexpected:
        return ExitStatus.ERROR
    return ExitStatus.SUCCESS


def result(options: BenchOptions, counts: Counts, histogram: Histogram) -> dict[str, Any]:
    """The ``--json`` object: the keys of ``RESULT_KEYS``, in that order."""
    seconds = max(counts.last_ns - counts.first_ns, 1) / 1e9
    status = exit_status(counts)
    out: dict[str, Any] = {
        "url": options.url, "protocol": options.protocol, "pairs": options.pairs,
        "messages_per_pair": options.messages, "window": options.window, "size": options.size,
        "procs": options.procs, "sent": counts.sent, "acked": counts.acked, "refused": counts.refused,
        "unanswered": counts.sent - counts.acked - counts.refused, "delivered": counts.delivered,
        "lost": counts.lost, "duplicated": counts.duplicated, "out_of_order": counts.out_of_order,
        "unexpected": counts.unexpected, "connections_lost": counts.connections_lost,
        "lost_because": counts.lost_because or None,
        "timed_out": counts.timed_out, "ok": status == ExitStatus.SUCCESS, "exit_status": int(status),
        "seconds": round(seconds, 3), "msgs_per_s": round(counts.delivered / seconds),
        "latency_ms": histogram.summary_ms(),
    }
    assert tuple(out) == RESULT_KEYS
    return out


def summary_text(res: dict[str, Any]) -> str:
    """The human summary ``chatcli bench`` prints without ``--json``."""
    lat = res["latency_ms"]
    lines = [
        f"{res['pairs']} pairs × {res['messages_per_pair']} messages, window {res['window']}, {res['size']} bytes, "
        f"{res['protocol']} protocol, {res['procs']} process(es), {res['url']}",
        f"throughput  {res['msgs_per_s']:,} msg/s delivered ({res['delivered']:,} in {res['seconds']:.3f} s)",
    ]
    if lat["p50"] is not None:
        lines.append("latency ms  " + "  ".join(f"{name.replace('_', '.')} {lat[name]:.3f}"
                                                for name in ("p50", "p90", "p99", "p99_9", "max")))
    lines.append(f"sent {res['sent']:,}  acked {res['acked']:,}  refused {res['refused']:,}  "
                 f"unanswered {res['unanswered']:,}  lost {res['lost']:,}  duplicated {res['duplicated']:,}  "
                 f"out of order {res['out_of_order']:,}  unexpected {res['unexpected']:,}")
    if res["connections_lost"]:
        why = f"; the first: {res['lost_because']}" if res["lost_because"] else ""
        lines.append(f"{res['connections_lost']} session(s) lost before the end{why}")
    if res["timed_out"]:
        lines.append("timed out waiting for acks")
    lines.append("OK: every message arrived once, in order" if res["ok"]
                 else f"FAILED (exit status {res['exit_status']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Sessions: websockets' sans-I/O client driven by an asyncio.Protocol
# ---------------------------------------------------------------------------

OnFrames = Callable[[list[bytes]], None]


class _Session(asyncio.Protocol):
    """One WebSocket client connection; hands each burst of text frames to ``on_frames`` at once."""

    def __init__(self, url: str, subprotocols: list[str], headers: dict[str, str], on_frames: OnFrames) -> None:
        self.ws = ClientProtocol(parse_uri(url), subprotocols=[Subprotocol(s) for s in subprotocols] or None,
                                 max_size=None)
        self.headers = headers
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Set before the handshake: the first frames may come in the same read as the handshake's answer.
        self.on_frames = on_frames
        self.closed = False
        self.why_closed = ""  # set when the connection is gone: the server's close code and reason, if any
        self._partial: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        request = self.ws.connect()
        for name, value in self.headers.items():
            request.headers[name] = value
        self.ws.send_request(request)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        texts: list[bytes] = []
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT or (event.opcode is Opcode.CONT and self._partial):
                    if event.fin and not self._partial:
                        texts.append(cast(bytes, event.data))
                    else:
                        self._partial.append(cast(bytes, event.data))
                        if event.fin:
                            texts.append(b"".join(self._partial))
                            self._partial.clear()
            elif isinstance(event, Response) and not self.opened.done():
                if self.ws.handshake_exc is not None:
                    self.opened.set_exception(_handshake_error(event, self.ws.handshake_exc))
                else:
                    self.opened.set_result(None)
        if texts:
            self.on_frames(texts)
        self.flush()

    def send_texts(self, texts: Iterable[str]) -> None:
        if self.closed:
            return
        send_text = self.ws.send_text
        for text in texts:
            send_text(text.encode())
        self.flush()

    def flush(self) -> None:
        data = self.ws.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(data)

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self.flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        close = self.ws.close_rcvd
        self.why_closed = (f"the server closed it with {close}" if close is not None
                           else f"the connection dropped ({exc})" if exc else "the connection dropped")
        if not self.opened.done():
            self.opened.set_exception(ConnectError(f"the server closed the connection during the handshake"
                                                   f"{': ' + str(exc) if exc else ''}"))
        self.on_frames([])  # wakes the worker, which notices ``closed``

    def close(self) -> None:
        """Say goodbye (close code 1000) and let the transport go once that is written."""
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):  # already closing: nothing to say
                self.ws.send_close(1000)
                self.flush()
            self.transport.close()


def _handshake_error(response: Any, exc: BaseException) -> Exception:
    status = getattr(response, "status_code", 0)
    body = bytes(getattr(response, "body", b"") or b"").decode("utf-8", "replace").strip()
    if status in (401, 403):
        return AuthError(f"the server refused the bench's credentials (HTTP {status}): {body or exc}; "
                         "chatcli bench uses the shared key: a server with accounts is out of its reach")
    return ConnectError(f"handshake refused (HTTP {status}): {body or exc}")


async def _open(options: BenchOptions, user: str, on_frames: OnFrames, *, receives: bool) -> _Session:
    from urllib.parse import urlsplit

    parts = urlsplit(options.url)
    url = options.url.rstrip("/") + "/" + quote(user, safe="")
    headers: dict[str, str] = {"User-Agent": "chatcli-bench"}
    subprotocols: list[str] = []
    if options.protocol == NATIVE:
        subprotocols = [p.SUBPROTOCOL]
        headers["Authorization"] = f"Bearer {options.auth_key}"
        if not receives:
            headers[p.RECEIVE_HEADER] = "none"
    ssl_context = None
    if parts.scheme == "wss":
        from pathlib import Path

        from chatcli.client.session import tls_context

        ssl_context = tls_context(Path(options.cafile) if options.cafile else None, options.insecure)
    loop = asyncio.get_running_loop()
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if ssl_context else 80)
    try:
        _, session = await loop.create_connection(lambda: _Session(url, subprotocols, headers, on_frames), host, port,
                                                  ssl=ssl_context, server_hostname=host if ssl_context else None)
        await session.opened
    except OSError as exc:
        raise ConnectError(f"cannot connect to {options.url}: {exc.strerror or exc}") from None
    if options.protocol == NATIVE and session.ws.subprotocol != p.SUBPROTOCOL:
        session.close()
        raise ConnectError(f"{options.url} does not speak {p.SUBPROTOCOL}: try --protocol legacy")
    return session


# ---------------------------------------------------------------------------
# One worker: some pairs, in one process
# ---------------------------------------------------------------------------

_ACCEPTED: Final = 1
_REFUSED: Final = 2


class _Pair:
    """Sender ``index`` → receiver ``index``: its window, its acks, what arrived."""

    __slots__ = ("acks", "index", "inflight", "max_seq", "next_ack", "pad", "receiver", "seen", "sender",
                 "sent", "to")

    def __init__(self, index: int, to: str, messages: int, pad: str) -> None:
        self.index = index
        self.to = to
        self.pad = pad
        self.sent = 0
        self.inflight = 0
        self.next_ack = 0  # legacy acks carry no id: they answer the sends in order
        self.max_seq = -1
        self.acks = bytearray(messages)  # 0: no answer yet, _ACCEPTED, _REFUSED
        self.seen = bytearray(messages)  # arrivals per sequence number (saturating at 255)
        self.sender: _Session | None = None
        self.receiver: _Session | None = None


class Worker:
    """Drives a list of pairs in one event loop; ``run`` returns their counts and latency histogram."""

    def __init__(self, options: BenchOptions, indices: list[int]) -> None:
        self.options = options
        self.native = options.protocol == NATIVE
        self.pairs = [_Pair(i, options.user(i, "r"), options.messages, "") for i in indices]
        self.counts = Counts()
        self.histogram = Histogram()
        self.answered = 0  # acks plus refusals
        self.expected = len(self.pairs) * options.messages
        self.last_event_ns = 0
        self.wake: asyncio.Event | None = None
        self.start_ns = 0
        self.sessions_lost = 0

    # -- setup ---------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open every receiver, then every sender, before the clock starts."""
        self.wake = asyncio.Event()
        opts = self.options
        try:
            receivers = await asyncio.wait_for(asyncio.gather(
                *(_open(opts, opts.user(pair.index, "r"), self._receiver_callback(pair), receives=True)
                  for pair in self.pairs)), opts.timeout)
            for pair, session in zip(self.pairs, receivers, strict=True):
                pair.receiver = session
            senders = await asyncio.wait_for(asyncio.gather(
                *(_open(opts, opts.user(pair.index, "s"), self._sender_callback(pair), receives=False)
                  for pair in self.pairs)), opts.timeout)
            for pair, session in zip(self.pairs, senders, strict=True):
                pair.sender = session
        except TimeoutError:
            self.close()
            raise ConnectError(f"cannot connect to {opts.url}: the sessions did not open in {opts.timeout:g} s") \
                from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for pair in self.pairs:
            for session in (pair.sender, pair.receiver):
                if session is not None:
                    session.close()

    # -- the hot paths -------------------------------------------------------------------------

    def _pump(self, pair: _Pair) -> None:
        """Fill ``pair``'s window: every frame of the burst leaves in one write."""
        window, total = self.options.window, self.options.messages
        if pair.inflight >= window or pair.sent >= total or pair.sender is None or not self.start_ns:
            return  # nothing to send, or the clock has not started
        size = self.options.size
        frames = []
        native, to, auth = self.native, pair.to, self.options.auth_key
        while pair.inflight < window and pair.sent < total:
            seq = pair.sent
            head = f"{seq}:{time.monotonic_ns()}:"
            text = head + "x" * (size - len(head)) if size > len(head) else head
            if native:
                frames.append(f'{{"type":"send","id":"{seq}","to":"{to}","text":"{text}"}}')
            else:
                frames.append(f"{{'auth':'{auth}','cmd':'send','userid':'{to}', 'msgtext':'{text}'}}")
            pair.sent = seq + 1
            pair.inflight += 1
        self.counts.sent += len(frames)
        pair.sender.send_texts(frames)

    def _sender_callback(self, pair: _Pair) -> OnFrames:
        counts = self.counts
        acks = pair.acks
        native = self.native

        def on_frames(frames: list[bytes]) -> None:
            if not frames:  # the connection is gone
                self.sessions_lost += 1
            for data in frames:
                if native:
                    if not data.startswith(b'{"type":"ack"') and b'"type":"ack"' not in data:
                        continue  # hello, or a frame of a newer server
                    i = data.find(b'"id":"') + 6
                    try:
                        seq = int(data[i:data.index(b'"', i)])
                    except ValueError:
                        counts.unexpected += 1
                        continue
                    if not 0 <= seq < len(acks) or acks[seq]:
                        counts.unexpected += 1
                        continue
                    refused = b'"status":"refused"' in data
                elif data == b"send:success" or data == b"send:error":
                    refused = data == b"send:error"
                    seq = pair.next_ack
                    if seq >= len(acks):
                        counts.unexpected += 1
                        continue
                    pair.next_ack = seq + 1
                else:
                    continue  # connected, or another cmd's answer
                if refused:
                    acks[seq] = _REFUSED
                    counts.refused += 1
                else:
                    acks[seq] = _ACCEPTED
                    counts.acked += 1
                pair.inflight -= 1
                self.answered += 1
            self._pump(pair)
            self._event()

        return on_frames

    def _receiver_callback(self, pair: _Pair) -> OnFrames:
        counts = self.counts
        histogram = self.histogram
        seen = pair.seen
        record = histogram.record
        marker = b'"text":"' if self.native else b"'msgtext':'"
        skip = len(marker)
        native = self.native

        def on_frames(frames: list[bytes]) -> None:
            if not frames:  # the connection is gone
                self.sessions_lost += 1
            now = time.monotonic_ns()
            start = self.start_ns
            for data in frames:
                k = data.find(marker)
                if k < 0 or (native and b'"type":"message"' not in data):
                    if data[:1] == b"{" and not data.startswith(b'{"type":"hello"'):
                        counts.unexpected += 1
                    continue  # the hello, or legacy "connected"
                k += skip
                a = data.find(b":", k)
                b = data.find(b":", a + 1)
                try:
                    seq = int(data[k:a])
                    stamp = int(data[a + 1:b])
                except ValueError:
                    counts.unexpected += 1
                    continue
                if not 0 <= seq < len(seen):
                    counts.unexpected += 1
                    continue
                n = seen[seq]
                if n:
                    counts.duplicated += 1
                    if n < 255:
                        seen[seq] = n + 1
                    continue
                seen[seq] = 1
                counts.delivered += 1
                if seq < pair.max_seq:
                    counts.out_of_order += 1
                else:
                    pair.max_seq = seq
                if stamp >= start > 0:  # not a leftover from before the clock started
                    record((now - stamp) // 1000)
            if frames:
                counts.last_ns = now
            self._event()

        return on_frames

    def _event(self) -> None:
        self.last_event_ns = time.monotonic_ns()
        if self.wake is not None and self.finished():
            self.wake.set()

    def finished(self) -> bool:
        return (self.answered >= self.expected and self.counts.delivered >= self.counts.acked) \
            or self.sessions_lost > 0

    # -- the run -------------------------------------------------------------------------------

    async def run(self, start_ns: int | None = None) -> Counts:
        """Start every pair's window (at ``start_ns``, the shared clock, if given) and wait for the end."""
        assert self.wake is not None
        opts = self.options
        self.start_ns = start_ns or time.monotonic_ns()
        self.counts.first_ns = self.start_ns
        self.last_event_ns = self.start_ns
        for pair in self.pairs:
            self._pump(pair)
        while not self.finished():
            all_answered = self.answered >= self.expected
            quiet_s = (time.monotonic_ns() - self.last_event_ns) / 1e9
            limit = opts.grace if all_answered else opts.timeout
            if quiet_s >= limit:
                self.counts.timed_out = not all_answered
                break
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), min(0.1, limit - quiet_s + 0.001))
        self._tally()
        self.close()
        return self.counts

    def _tally(self) -> None:
        c = self.counts
        c.connections_lost = self.sessions_lost
        c.lost_because = next((session.why_closed for pair in self.pairs for session in (pair.receiver, pair.sender)
                               if session is not None and session.why_closed), "")
        for pair in self.pairs:
            c.lost += sum(1 for ack, n in zip(pair.acks, pair.seen, strict=True) if ack == _ACCEPTED and not n)
        if not c.last_ns:
            c.last_ns = self.last_event_ns


# ---------------------------------------------------------------------------
# Running: one process, or several (spawned) with merged results
# ---------------------------------------------------------------------------


def split_pairs(pairs: int, procs: int) -> list[list[int]]:
    """Pair indices per process, as even as can be: 5 pairs over 2 processes → [0, 2, 4], [1, 3]."""
    return [list(range(k, pairs, procs)) for k in range(procs)]


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        loop = asyncio.new_event_loop()
    return loop


Progress = Callable[[int, int], None]


def run(options: BenchOptions, progress: Progress | None = None) -> tuple[Counts, Histogram]:
    """Run the bench; ``progress(delivered, total)`` is called about ten times a second if given."""
    options.check()
    if not options.prefix:
        options = _with_prefix(options)
    if options.procs == 1:
        loop = _event_loop()
        try:
            return loop.run_until_complete(_run_here(options, progress))
        finally:
            loop.close()
    return _run_spawned(options, progress)


def _with_prefix(options: BenchOptions) -> BenchOptions:
    from dataclasses import replace

    return replace(options, prefix=f"bench{os.urandom(4).hex()}")


async def _run_here(options: BenchOptions, progress: Progress | None) -> tuple[Counts, Histogram]:
    worker = Worker(options, list(range(options.pairs)))
    await worker.connect()
    total = options.pairs * options.messages
    ticker = None
    if progress is not None:
        async def tick() -> None:
            while True:
                progress(worker.counts.delivered, total)
                await asyncio.sleep(0.1)
        ticker = asyncio.create_task(tick())
    try:
        counts = await worker.run()
    finally:
        if ticker is not None:
            ticker.cancel()
    if progress is not None:
        progress(counts.delivered, total)
    return counts, worker.histogram


def _worker_main(options: BenchOptions, indices: list[int], slot: int, ready: Any, go: Any, start: Any,
                 delivered: Any, results: Any) -> None:
    """A spawned process: connect, report ready, wait for the go, run, send back counts and histogram."""
    loop = _event_loop()
    try:
        worker = Worker(options, indices)
        try:
            loop.run_until_complete(worker.connect())
        except Exception as exc:  # reported to the parent, which raises it
            results.put((slot, exc, None))
            ready.release()
            return
        ready.release()

        async def main() -> Counts:
            await loop.run_in_executor(None, go.wait)

            async def tick() -> None:
                while True:
                    delivered[slot] = worker.counts.delivered
                    await asyncio.sleep(0.1)

            ticker = asyncio.create_task(tick())
            try:
                return await worker.run(start.value)
            finally:
                ticker.cancel()
                delivered[slot] = worker.counts.delivered

        counts = loop.run_until_complete(main())
        results.put((slot, counts, worker.histogram))
    finally:
        loop.close()


def _run_spawned(options: BenchOptions, progress: Progress | None) -> tuple[Counts, Histogram]:
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    start = ctx.Value("q", 0)
    delivered = ctx.Array("q", options.procs)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(options, indices, slot, ready, go, start, delivered, results),
                         daemon=True, name=f"chatcli-bench-{slot}")
             for slot, indices in enumerate(split_pairs(options.pairs, options.procs))]
    for proc in procs:
        proc.start()
    counts, histogram = Counts(), Histogram()
    failure: BaseException | None = None
    gathered: dict[int, tuple[Any, Any]] = {}
    total = options.pairs * options.messages
    try:
        for _ in procs:  # every connection is open before the clock starts
            while not ready.acquire(timeout=0.5):
                if any(not proc.is_alive() for proc in procs) and results.empty():
                    raise ConnectError("a bench process died while connecting")
        if not results.empty():  # a worker could not connect: do not start the others
            slot, first, _ = results.get()
            failure = first if isinstance(first, BaseException) else ConnectError("a bench process failed")
            raise failure
        start.value = time.monotonic_ns()
        go.set()
        while len(gathered) < len(procs):
            try:
                slot, first, second = results.get(timeout=0.1)
                gathered[slot] = (first, second)
            except queue.Empty:
                if all(not proc.is_alive() for proc in procs) and results.empty():
                    raise ConnectError("the bench processes ended without a result") from None
            if progress is not None:
                progress(sum(delivered[:]), total)
        for first, second in gathered.values():
            if isinstance(first, BaseException):
                failure = failure or first
            else:
                counts.merge(first)
                histogram.merge(second)
        if failure is not None:
            raise failure
        if progress is not None:
            progress(counts.delivered, total)
        return counts, histogram
    finally:
        for proc in procs:  # after a failure, the others must not go on loading the server
            if len(gathered) < len(procs) or failure is not None:
                proc.kill()
            proc.join(timeout=5)
