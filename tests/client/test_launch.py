"""Which ``chatcli`` command lines the Typer-free fast path takes (``chatcli.launch``); the rest go to Typer."""

from __future__ import annotations

import pytest

from chatcli.launch import parse_plain_send


@pytest.mark.parametrize(("args", "expected"), [
    (["send", "alice", "bob", "hi"], ("alice", "bob", "hi", None, False)),
    (["send", "alice", "bob"], ("alice", "bob", None, None, False)),
    (["send", "alice", "bob", "hi", "--url", "ws://h:1"], ("alice", "bob", "hi", "ws://h:1", False)),
    (["send", "--url=ws://h:1", "alice", "--json", "bob", "hi"], ("alice", "bob", "hi", "ws://h:1", True)),
    (["send", "alice", "bob", ""], ("alice", "bob", "", None, False)),
])
def test_plain_sends_skip_typer(args: list[str], expected: tuple[object, ...]) -> None:
    plain = parse_plain_send(args)
    assert plain is not None
    assert (plain.me, plain.peer, plain.text, plain.url, plain.json_output) == expected


@pytest.mark.parametrize("args", [
    [], ["listen", "bob"], ["send"], ["send", "alice"], ["send", "alice", "bob", "hi", "extra"],
    ["send", "--help"], ["send", "alice", "bob", "-"], ["send", "alice", "bob", "--", "-x"],
    ["send", "alice", "bob", "hi", "--timeout", "1"], ["send", "alice", "bob", "--lines"],
    ["send", "alice", "bob", "hi", "--url"], ["send", "alice", "bob", "hi", "--url", "--json"],
    ["send", "alice", "bob", "hi", "--json=1"],
])
def test_everything_else_goes_to_typer(args: list[str]) -> None:
    assert parse_plain_send(args) is None
