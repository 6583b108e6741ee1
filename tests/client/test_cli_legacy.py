"""Seed Flutter apps and the chatcli commands talk to each other, both ways.

The stand-in app speaks exactly as the Flutter app does (no subprotocol, its
send template with raw text) and reads frames as it does (``decode_legacy_message``).
"""

from __future__ import annotations

import json

import pytest

from chatcli import protocol
from tests.support.flutter_app import decode_legacy_message, encode_legacy_send
from tests.support.processes import Chatcli, RunningServer
from tests.support.wsclients import legacy

TRICKY_TEXTS = ["plain hello", "it's \"quoted\", a \\ backslash", "{'cmd':'send','userid':'eve'}", "ünïcödé ✓"]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_chatcli_send_reaches_a_flutter_app(chatcli: Chatcli, server: RunningServer, text: str) -> None:
    app = legacy(server.ws_url, "flutter1")
    sender = chatcli("send", "alice", "flutter1", text, "--url", server.ws_url, "--json")
    assert sender.wait() == 0
    assert json.loads(sender.out[0])["status"] == "delivered"
    # What the app displays: the real author and the exact text.
    assert decode_legacy_message(str(app.recv(timeout=5))) == ("alice", text)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_a_flutter_app_reaches_chatcli_listen(chatcli: Chatcli, server: RunningServer, text: str) -> None:
    bob = chatcli("listen", "bob", "--count", "1", "--url", server.ws_url)
    bob.wait_stderr("listening as")
    app = legacy(server.ws_url, "flutter1")
    app.send(encode_legacy_send("bob", text))
    assert app.recv(timeout=5) == protocol.LEGACY_SEND_SUCCESS
    assert bob.wait() == 0
    message = json.loads(bob.out[0])
    assert (message["from"], message["to"], message["text"]) == ("flutter1", "bob", text)


def test_a_flutter_app_and_chatcli_reply_to_each_other(chatcli: Chatcli, server: RunningServer) -> None:
    app = legacy(server.ws_url, "flutter1")
    bob = chatcli("listen", "bob", "--count", "1", "--from", "flutter1", "--url", server.ws_url)
    bob.wait_stderr("listening as")
    app.send(encode_legacy_send("bob", "ping"))
    assert app.recv(timeout=5) == protocol.LEGACY_SEND_SUCCESS
    assert bob.wait() == 0
    reply_to = json.loads(bob.out[0])["from"]
    assert chatcli("send", "bob", reply_to, "pong", "--url", server.ws_url).wait() == 0
    assert decode_legacy_message(str(app.recv(timeout=5))) == ("bob", "pong")
