"""``chatcli bench`` against real servers: it reports every message delivered once, in order, and counts
what was refused, lost or duplicated; plus its histogram, which must stay exact enough and mergeable."""

from __future__ import annotations

import json
import random
import re
import signal
import urllib.request
from typing import Any

import pytest

from chatcli import protocol as p
from chatcli.client import bench
from tests.support.processes import Chatcli, RunningServer, StartServer, wait_until


def run_bench(chatcli: Chatcli, server: RunningServer, *args: str) -> tuple[int, dict[str, Any]]:
    """Chatcli ``chatcli bench --json`` to the end: its exit status and its one JSON object."""
    proc = chatcli("bench", "--url", server.ws_url, "--json", *args)
    status = proc.wait(timeout=30)
    assert len(proc.out) == 1, (proc.out, proc.err)
    result = json.loads(proc.out[0])
    assert tuple(result) == bench.RESULT_KEYS
    return status, result


@pytest.mark.parametrize("protocol", ["native", "legacy"])
def test_small_run_delivers_every_message_once_in_order(start_server: StartServer, chatcli: Chatcli,
                                                        protocol: str) -> None:
    server = start_server()
    status, result = run_bench(chatcli, server, "--pairs", "3", "--messages", "200", "--window", "8",
                               "--protocol", protocol)
    assert status == 0, result
    assert result["ok"] is True and result["exit_status"] == 0
    assert (result["sent"], result["acked"], result["delivered"]) == (600, 600, 600)
    assert (result["refused"], result["unanswered"], result["lost"], result["duplicated"],
            result["out_of_order"], result["unexpected"], result["connections_lost"]) == (0,) * 7
    latency = result["latency_ms"]
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99_9"] <= latency["max"]
    assert result["msgs_per_s"] > 0


def test_procs_spread_the_pairs_and_merge_their_counts(start_server: StartServer, chatcli: Chatcli) -> None:
    server = start_server("--ephemeral")
    status, result = run_bench(chatcli, server, "--pairs", "4", "--messages", "100", "--procs", "2")
    assert status == 0, result
    assert (result["procs"], result["sent"], result["delivered"], result["lost"]) == (2, 400, 400, 0)


def test_refused_messages_are_counted_and_exit_5(start_server: StartServer, chatcli: Chatcli) -> None:
    """A real refusal: the server takes texts of 40 bytes at most, the bench sends 64."""
    server = start_server("--ephemeral", "--max-text-bytes", "40")
    status, result = run_bench(chatcli, server, "--pairs", "1", "--messages", "30", "--window", "4")
    assert status == 5, result
    assert (result["refused"], result["acked"], result["sent"]) == (30, 0, 30)
    assert result["delivered"] == 0 and result["lost"] == 0 and not result["ok"]


def test_a_pair_over_the_rate_limit_is_paced_not_refused(start_server: StartServer, chatcli: Chatcli) -> None:
    server = start_server("--ephemeral", "--rate", "20", "--burst", "5")
    status, result = run_bench(chatcli, server, "--pairs", "1", "--messages", "30", "--window", "4")
    assert status == 0, result
    assert (result["refused"], result["delivered"], result["lost"]) == (0, 30, 0)
    assert result["seconds"] >= 25 / 20 * 0.95  # 30 from a bucket of 5 refilled at 20 a second


def test_duplicated_messages_are_counted_and_exit_1(start_server: StartServer, chatcli: Chatcli) -> None:
    """Messages stored for the receiver before the run (its backlog) carry sequence numbers the run sends again:
    the receiver gets those numbers twice."""
    server = start_server()
    for seq in (0, 3):
        sent = chatcli("send", "dupes0", "duper0", f"{seq}:1:stored before the run", "--url", server.ws_url)
        assert sent.wait() == 0, sent.err
    status, result = run_bench(chatcli, server, "--pairs", "1", "--messages", "10", "--prefix", "dupe")
    assert status == 1, json.dumps(result)
    assert result["duplicated"] == 2 and result["delivered"] == 10 and result["lost"] == 0
    assert result["latency_ms"]["max"] < 60_000  # the old ones' timestamps are not latencies


def test_a_server_killed_mid_run_exits_3_with_consistent_counts(start_server: StartServer, chatcli: Chatcli) -> None:
    server = start_server("--ephemeral", "--rate", "1000000", "--burst", "1000000")
    proc = chatcli("bench", "--url", server.ws_url, "--json", "--pairs", "2", "--messages", "10000000")

    def routed() -> float:
        with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("chatcli_messages_routed_total"):
                    return float(line.split()[-1])
        return 0.0

    wait_until(lambda: routed() >= 500, 10, "messages flowing")
    server.stop(signal.SIGKILL)
    assert proc.wait(timeout=15) == 3, proc.err
    result = json.loads(proc.out[0])
    assert result["connections_lost"] >= 1 and not result["ok"] and result["exit_status"] == 3
    assert result["sent"] == result["acked"] + result["refused"] + result["unanswered"]
    assert 500 <= result["sent"] < 20_000_000 and result["delivered"] <= result["sent"]
    assert 0 <= result["lost"] <= result["acked"]
    assert result["lost_because"].startswith("the connection dropped")  # SIGKILL: no close frame


def test_messages_too_large_for_the_server_say_why_the_sessions_closed(start_server: StartServer,
                                                                        chatcli: Chatcli) -> None:
    server = start_server("--ephemeral", "--max-text-bytes", "1000")
    proc = chatcli("bench", "--url", server.ws_url, "--pairs", "2", "--messages", "5", "--size", "20000")
    assert proc.wait(timeout=15) == 3, proc.err
    # The run ends at the first lost session: the other one may or may not have been counted by then.
    assert any(re.match(r"[12] session\(s\) lost before the end; the first: the server closed it with 1009 "
                        r"\(message too big\)", line) for line in proc.out), proc.out


def test_no_server_exits_3(chatcli: Chatcli) -> None:
    proc = chatcli("bench", "--url", "ws://127.0.0.1:9", "--json", "--pairs", "1", "--messages", "1")
    assert proc.wait() == 3
    assert proc.out == [] and "cannot connect" in "\n".join(proc.err)


def test_the_native_send_frame_is_the_protocol_modules() -> None:
    """The hot path builds its frames by hand: they must be what ``chatcli.protocol`` would encode."""
    options = bench.BenchOptions(pairs=1, messages=3, window=3, size=40, prefix="x")
    worker = bench.Worker(options, [0])
    written: list[str] = []

    class Sink:
        def send_texts(self, texts: list[str]) -> None:
            written.extend(texts)

    worker.pairs[0].sender = Sink()  # type: ignore[assignment]
    worker.start_ns = 1
    worker._pump(worker.pairs[0])
    assert len(written) == 3
    for seq, frame in enumerate(written):
        parsed = p.parse_client_frame(frame)
        assert isinstance(parsed, p.Send) and parsed.id == str(seq) and parsed.to == "xr0"
        assert p.encode(parsed) == frame and len(parsed.text) == 40 and parsed.text.startswith(f"{seq}:")


def test_histogram_percentiles_are_within_a_bucket_and_merge() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(8, 1.5)) for _ in range(20_000)]
    whole, left, right = bench.Histogram(), bench.Histogram(), bench.Histogram()
    for i, value in enumerate(values):
        whole.record(value)
        (left if i % 2 else right).record(value)
    left.merge(right)
    assert left.counts == whole.counts and left.count == whole.count and left.max_us == whole.max_us
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = ordered[max(0, -(-int(q * len(ordered) * 1000) // 1000) - 1)]
        assert exact <= whole.percentile(q) <= exact * 1.016 + 1
    assert whole.percentile(1.0) == max(values)
    assert len(whole.counts) == len(bench.Histogram().counts) < 2000  # bounded, whatever was recorded
    for value in (0, 1, 127, 128, 129, 1000, 65_535, 10**9, 2**40):
        index = bench.bucket_index(value)
        assert bench.bucket_high(index) >= min(value, bench.MAX_TRACKED_US)
        assert index == 0 or bench.bucket_high(index - 1) < min(value, bench.MAX_TRACKED_US)
