"""chatcli.client.hooks in process, with real hook processes: what moves the cursor."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chatcli.client.hooks import HookOptions, HookRunner, hook_environment
from chatcli.protocol import Message

TS = "2026-11-27T06:00:00.000Z"


def test_a_hook_of_a_replaced_store_no_longer_moves_the_cursor(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    options = HookOptions.build(f'case "$CHATCLI_TEXT" in old) while [ ! -e {gate} ]; do sleep 0.02; done;; esac',
                                None, parallel=2)
    handled: list[int] = []

    async def run() -> None:
        runner = HookRunner(options, on_success=lambda m: None, notice=print, on_handled=handled.append)
        await runner.submit(Message(42, "alice", "bob", "old", TS))  # of the store the server had
        runner.store_changed()  # the server came back with another store: its ids start again
        await runner.submit(Message(1, "carol", "bob", "new", TS))  # another sender: not queued behind 42
        while handled != [1]:
            await asyncio.sleep(0.02)
        gate.touch()
        await runner.drain()

    asyncio.run(run())
    assert handled == [1]  # 42 ran to the end, but is no position in the new store


def test_the_environment_carries_the_message_and_never_a_nul() -> None:
    env = hook_environment(Message(7, "alice", "bob", "a\x00b", TS, reply_to=3), attempt=2)
    assert (env["CHATCLI_ID"], env["CHATCLI_FROM"], env["CHATCLI_TO"], env["CHATCLI_TEXT"], env["CHATCLI_TS"],
            env["CHATCLI_REPLY_TO"], env["CHATCLI_ATTEMPT"]) == ("7", "alice", "bob", "ab", TS, "3", "2")
    assert "CHATCLI_REPLY_TO" not in hook_environment(Message(8, "alice", "bob", "x", TS), attempt=1)
