"""The chat's client side in-process (issue 12), against a real server: what the status line is told,
where the pty tests can only see escape sequences; and the status line's words."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from chatcli.client import render, repl
from chatcli.client.render import ConnectionState, StatusView
from chatcli.client.repl import ChatClient
from chatcli.client.session import open_session
from chatcli.client.settings import ClientSettings
from tests.support.processes import RunningServer


async def _until(condition: Callable[[], object], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_typing_shows_until_the_message_or_a_pause(server: RunningServer, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_home: object) -> None:
    monkeypatch.setattr(repl, "TYPING_SHOWN_S", 0.5)  # the pause, shortened
    settings = ClientSettings(url=server.ws_url)
    shown: list[str] = []

    async def scenario() -> None:
        client = ChatClient(settings, "tom", "uma", colour=False, show=shown.append)
        running = asyncio.create_task(client.run())
        await _until(lambda: client.state is ConnectionState.CONNECTED and client.peer_online is not None)
        async with open_session(settings, "uma") as uma:
            await uma.typing("tom")
            await _until(lambda: client.view().peer_typing)
            assert "uma is typing…" in render.status_text(client.view())
            await uma.send("tom", "done typing")
            await _until(lambda: any("uma: done typing" in line for line in shown))
            assert not client.view().peer_typing  # cleared by the message
        async with open_session(settings, "uma") as again:  # a new session: not held back by the interval
            await again.typing("tom")
            await _until(lambda: client.view().peer_typing)
            await _until(lambda: not client.view().peer_typing, timeout=3)  # cleared by the pause
        running.cancel()

    asyncio.run(scenario())


def test_typing_ends_when_the_peer_leaves(server: RunningServer, tmp_home: object) -> None:
    settings = ClientSettings(url=server.ws_url)

    async def scenario() -> None:
        client = ChatClient(settings, "tom", "uma", colour=False, show=lambda line: None)
        running = asyncio.create_task(client.run())
        await _until(lambda: client.state is ConnectionState.CONNECTED and client.peer_online is not None)
        async with open_session(settings, "uma") as uma:
            await _until(lambda: client.peer_online)
            await uma.typing("tom")
            await _until(lambda: client.view().peer_typing)
        await _until(lambda: client.peer_online is False, timeout=2)  # their chat closed mid-sentence
        assert not client.view().peer_typing  # at once, not after TYPING_SHOWN_S
        running.cancel()

    asyncio.run(scenario())


def test_the_status_line_names_the_conversation_typing_and_the_hotlist() -> None:
    connected = ConnectionState.CONNECTED
    view = StatusView(connected, "ws://h:1", "alice", "bob", peer_online=True, peer_typing=True,
                      unread=(("carol", 2), ("dave", 1)))
    assert render.status_text(view) == ("● connected  alice → bob  bob online  bob is typing…"
                                        "  [3 unread: carol 2, dave 1]  ws://h:1")
    inbox = StatusView(connected, "ws://h:1", "alice", None)
    assert render.status_text(inbox) == "● connected  alice → inbox  ws://h:1"
    many = tuple((f"u{n}", 1) for n in range(7))
    assert render.status_text(StatusView(connected, "u", "a", None, unread=many)).endswith(
        "[7 unread: u0 1, u1 1, u2 1, u3 1, u4 1, …]  u")


def test_search_says_what_is_missing() -> None:
    shown: list[str] = []
    on_inbox = ChatClient(ClientSettings(url="ws://127.0.0.1:9"), "tom", None, colour=False, show=shown.append)
    asyncio.run(on_inbox.search_command("lunch"))  # words, but no conversation to search
    asyncio.run(on_inbox.search_command(""))
    in_conversation = ChatClient(ClientSettings(url="ws://127.0.0.1:9"), "tom", "uma", colour=False,
                                 show=shown.append)
    asyncio.run(in_conversation.search_command("  "))
    assert shown == ["-- no conversation open: /open PEER first", "-- no conversation open: /open PEER first",
                     "-- /search TEXT: give the words to find"]


def test_messages_kept_for_closed_conversations_stay_within_a_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server without history: the chat keeps what came for other conversations, but a flood from many
    # peers cannot grow its memory without end. The newest stay, in order.
    from chatcli.protocol import Message

    monkeypatch.setattr(repl, "KEPT_BYTES_MAX", 10_000)
    client = ChatClient(ClientSettings(url="ws://127.0.0.1:9"), "tom", "uma", colour=False, show=lambda line: None)
    for n in range(1, 101):
        client._keep(Message(n, "carol" if n % 2 else "dave", "tom", "x" * 999 + str(n % 10),
                             "2026-01-01T00:00:00.000Z"))
    carol, dave = client._take_kept("carol"), client._take_kept("dave")
    assert sum(len(m.text) for m in carol + dave) <= 10_000
    assert [m.id for m in carol] == [91, 93, 95, 97, 99] and [m.id for m in dave] == [92, 94, 96, 98, 100]
    assert client._take_kept("carol") == []  # shown once
