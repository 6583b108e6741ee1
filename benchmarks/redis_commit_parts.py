#!/usr/bin/env python3
"""What each part of the commit script (``redis_lua.COMMIT``) costs Redis per message: the script against copies
of itself with one part cut out.

The copies are wrong on purpose (they store less); they only say what a part costs, e.g. before changing what
Redis stores. Set-up as ``redis_commit_ab.py`` (a redis-server of its own, ``appendfsync no``, pinned to CPU 0;
CPU time of its main thread), with batches as the relay benchmark's seed load makes them: 600 messages per
call, 20 of 50 pairs in each, one accept time, no client ids, 60-character texts. Prints, per variant, the
median µs per message over the rounds and its difference from the whole script (median of the per-round
differences: each round runs every variant back to back).

    python benchmarks/redis_commit_parts.py --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis_commit_ab import cpu_seconds, redis_on_cpu0  # noqa: E402  # benchmarks/ is the script's directory

from chatcli.server.engine.base import NewMessage  # noqa: E402
from chatcli.server.engine.redis_engine import _commit_args, _pack, _Packed  # noqa: E402
from chatcli.server.engine.redis_lua import COMMIT  # noqa: E402

BATCH, PAIRS, PAIRS_PER_BATCH = 600, 50, 20
INBOX_XADD = "      redis.call('XADD', inbox.key, entry, 's', seq, 'f', sender, 't', text, 'ts', ts)\n"
#: The conversation streams: one entry per pair and batch (its run of ids), and the pair's count.
CONVERSATION_RUNS = COMMIT[COMMIT.index("  for _, run in ipairs(inbox.runs) do"):COMMIT.index("  redis.call('PUBLISH'")]
PUBLISH = "  redis.call('PUBLISH', inbox.tag .. ':ch', table.concat(inbox.records))\n"


def variants() -> dict[str, str]:
    """The script, and copies of it without one part each (every cut checked to apply)."""
    cuts = {
        "no conversation runs": [(CONVERSATION_RUNS, "")],
        "inbox entry: 2 fields (f, t)": [
            (INBOX_XADD, "      redis.call('XADD', inbox.key, entry, 'f', sender, 't', text)\n")],
        "no inbox XADD": [(INBOX_XADD, "")],
        "no PUBLISH": [(PUBLISH, "")],
        "no XADD at all": [(INBOX_XADD, ""), (CONVERSATION_RUNS, "")],
    }
    scripts = {"whole script": COMMIT}
    for name, replacements in cuts.items():
        script = COMMIT
        for old, new in replacements:
            if old not in script:
                raise SystemExit(f"{name}: the script changed, update this benchmark ({old.strip()!r})")
            script = script.replace(old, new)
        scripts[name] = script
    return scripts


def batches(count: int) -> list[_Packed]:
    """``count`` packed argument lists, as the sending node packs them."""
    packed = []
    for number in range(count):
        pairs = [(number * 7 + k) % PAIRS for k in range(PAIRS_PER_BATCH)]
        batch = [NewMessage(f"s{pair}", f"r{pair}", f"{n}:1732712345678901234:" + "x" * 36, 1000.5 + number)
                 for n in range(BATCH) for pair in (pairs[n % PAIRS_PER_BATCH],)]
        packed.append(_commit_args("epoch", batch))
    return packed


def run(client: Any, sha: str, batch_args: list[_Packed]) -> float:
    """Redis CPU µs per message through one script, from an empty store."""
    client.flushall()
    client.set("chatcli:epoch", "epoch")
    keys = ("chatcli:epoch", "chatcli:ids", "chatcli:users", "chatcli:newest_ts")
    calls = [_pack(("EVALSHA", sha, len(keys), *keys), args) for args in batch_args]
    connection = client.connection_pool.get_connection()
    try:
        before = cpu_seconds(client)
        for call in calls:
            connection.send_packed_command([call])
            answer = connection.read_response()
            assert isinstance(answer, list), answer
        return (cpu_seconds(client) - before) * 1e6 / (BATCH * len(calls))
    finally:
        client.connection_pool.release(connection)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=50, help="calls of 600 messages per variant and round")
    options = parser.parse_args()
    calls = batches(options.batches)
    scripts = variants()
    with redis_on_cpu0() as client:
        shas = {name: client.script_load(script) for name, script in scripts.items()}
        figures: dict[str, list[float]] = {name: [] for name in scripts}
        for round_ in range(options.rounds):
            for name in (list(scripts) if round_ % 2 == 0 else list(reversed(scripts))):
                figures[name].append(run(client, shas[name], calls))
        whole = figures["whole script"]
        for name, values in figures.items():
            saved = statistics.median(w - v for w, v in zip(whole, values, strict=True))
            print(f"{name:30} {statistics.median(values):5.2f} µs/msg  (cut saves {saved:5.2f})  rounds: "
                  + " ".join(f"{v:.2f}" for v in values))

if __name__ == "__main__":
    main()
