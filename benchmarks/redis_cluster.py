#!/usr/bin/env python3
"""Two nodes on one Redis: what one message at a time costs, catching up, and a dead node's presence.

Starts a redis-server of its own (unix socket, appendonly yes, appendfsync always) and two
``chatcli serve --redis`` nodes, every process pinned to CPU 0 as in benchmarks/relay.py, and the
native clients of this script on CPU 1. Prints one JSON object:

- ``ack_ms``: send → ack on node 1, one message in flight (window 1), p50/p99 of ``--messages``;
- ``cross_node_ms``: send on node 1 → receipt by a session on node 2, same messages, p50/p99;
- ``catch_up_1000_ms``: a session on node 2 that missed 1,000 messages reconnects: connect → last one;
- ``presence_offline_s``: kill -9 of node 1 with a user on it → ``who`` on node 2 no longer lists them.

    python benchmarks/redis_cluster.py [--messages 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatcli import protocol as p  # noqa: E402
from tests.support.processes import RunningServer, start_server_process, wait_until  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.wsclients import native, recv_frame  # noqa: E402


def pinned() -> None:
    os.sched_setaffinity(0, {0})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def one_at_a_time(one: RunningServer, two: RunningServer, count: int) -> dict[str, object]:
    alice, _ = native(one.ws_url, "alice")
    bob, _ = native(two.ws_url, "bob")
    arrived: dict[str, float] = {}

    def receive() -> None:
        for _ in range(count):
            frame = recv_frame(bob, 10)
            if isinstance(frame, p.Message):
                arrived[frame.text] = time.perf_counter()

    reader = threading.Thread(target=receive)
    reader.start()
    acks, sent = [], {}
    for i in range(count):
        text = f"m{i}"
        sent[text] = time.perf_counter()
        alice.send(p.encode(p.Send(uuid.uuid4().hex, "bob", text)))
        frame = recv_frame(alice, 10)
        assert isinstance(frame, p.Ack) and frame.accepted, frame
        acks.append((time.perf_counter() - sent[text]) * 1000)
    reader.join(30)
    cross = [(arrived[t] - sent[t]) * 1000 for t in sent if t in arrived]
    alice.close()
    bob.close()
    return {"ack_ms": {"p50": percentile(acks, 0.5), "p99": percentile(acks, 0.99)},
            "cross_node_ms": {"p50": percentile(cross, 0.5), "p99": percentile(cross, 0.99)},
            "delivered": len(cross)}


def catch_up(one: RunningServer, two: RunningServer) -> float:
    carol, _ = native(two.ws_url, "carol")
    carol.close()
    sender, _ = native(one.ws_url, "dave")
    for i in range(1000):
        sender.send(p.encode(p.Send(uuid.uuid4().hex, "carol", f"missed {i}")))
    acks = 0
    while acks < 1000:
        acks += isinstance(recv_frame(sender, 10), p.Ack)
    started = time.perf_counter()
    carol, _ = native(two.ws_url, "carol")
    got = 0
    while got < 1000:
        got += isinstance(recv_frame(carol, 10), p.Message)
    elapsed = (time.perf_counter() - started) * 1000
    carol.send(p.encode(p.Received(p.MAX_INT)))
    carol.close()
    sender.close()
    return round(elapsed, 1)


def presence_offline(one: RunningServer, two: RunningServer) -> float:
    _erin, _ = native(one.ws_url, "erin")  # kept open: online through node one until it dies
    watcher, _ = native(two.ws_url, "frank")

    def online() -> bool:
        watcher.send(p.encode(p.WhoRequest("w")))
        answer = recv_frame(watcher)
        return isinstance(answer, p.Who) and "erin" in answer.users

    wait_until(online, 10, "erin online on node two")
    one.proc.send_signal(signal.SIGKILL)
    one.proc.wait()
    killed = time.perf_counter()
    while online():
        time.sleep(0.05)
    return round(time.perf_counter() - killed, 2)


def run_once(messages: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="chatcli-redis-bench-") as scratch:
        redis = RedisServer(Path(scratch))
        redis.start()
        os.sched_setaffinity(redis.proc.pid, {0})  # type: ignore[union-attr]
        nodes = [start_server_process(["--redis", redis.url], preexec_fn=pinned) for _ in range(2)]
        try:
            result = one_at_a_time(nodes[0], nodes[1], messages)
            result["catch_up_1000_ms"] = catch_up(nodes[0], nodes[1])
            result["presence_offline_s"] = presence_offline(nodes[0], nodes[1])
            return result
        finally:
            for node in nodes:
                if node.proc.poll() is None:
                    node.proc.kill()
                    node.proc.wait()
            redis.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    runs = [run_once(args.messages) for _ in range(args.runs)]
    for run in runs:
        print(json.dumps(run))
    summary = {
        "ack_p50_ms": statistics.median(r["ack_ms"]["p50"] for r in runs),  # type: ignore[index]
        "ack_p99_ms": statistics.median(r["ack_ms"]["p99"] for r in runs),  # type: ignore[index]
        "cross_node_p50_ms": statistics.median(r["cross_node_ms"]["p50"] for r in runs),  # type: ignore[index]
        "cross_node_p99_ms": statistics.median(r["cross_node_ms"]["p99"] for r in runs),  # type: ignore[index]
        "catch_up_1000_ms": statistics.median(float(r["catch_up_1000_ms"]) for r in runs),  # type: ignore[arg-type]
        "presence_offline_s": statistics.median(float(r["presence_offline_s"]) for r in runs),  # type: ignore[arg-type]
    }
    print(json.dumps({"median_of": len(runs), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
