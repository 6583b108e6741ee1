"""`serve --presence all|contacts|off`, seen from `chatcli who` and from a watching client, with accounts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection

from chatcli import protocol as p
from tests.support.credentials import add_user
from tests.support.flutter_app import encode_legacy_send
from tests.support.processes import Chatcli, ChatcliProcess, RunningServer, StartServer, wait_until
from tests.support.wsclients import legacy, native, recv_frame, send_native

USERS = ("alice", "bob", "carol", "dave")


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    """Accounts in the database the servers of these tests use (so tokens are required)."""
    return {user: add_user(tmp_path / "chatcli.db", user) for user in USERS}


def who(chatcli: Chatcli, server: RunningServer, me: str, token: str) -> ChatcliProcess:
    process = chatcli("who", me, "--url", server.ws_url, env={"CHATCLI_TOKEN": token})
    process.wait()
    return process


def online_with_bob_and_carol(server: RunningServer, tokens: dict[str, str]) -> list[ClientConnection]:
    """bob online natively, carol through the seed app; alice and bob have talked, carol with nobody."""
    bob, _ = native(server.ws_url, "bob", key=tokens["bob"])
    alice, _ = native(server.ws_url, "alice", key=tokens["alice"], headers={p.RECEIVE_HEADER: "none"})
    assert send_native(alice, "bob", "hi bob").status == p.Status.DELIVERED
    alice.close()
    carol = legacy(server.ws_url, f"carol?token={tokens['carol']}")
    return [bob, carol]


def test_with_accounts_users_see_only_their_contacts_by_default(chatcli: Chatcli, start_server: StartServer,
                                                               tokens: dict[str, str]) -> None:
    server = start_server()
    _, carol = online_with_bob_and_carol(server, tokens)
    assert who(chatcli, server, "alice", tokens["alice"]).out == ["bob"]
    assert who(chatcli, server, "carol", tokens["carol"]).out == ["carol"]  # oneself is always visible

    alice, hello = native(server.ws_url, "alice", key=tokens["alice"])
    assert p.Feature.PRESENCE in hello.features
    alice.send(p.encode(p.Watch(("bob", "carol", "dave"))))
    assert [recv_frame(alice) for _ in range(3)] == [
        p.Presence("bob", True), p.Presence("carol", False, hidden=True), p.Presence("dave", False, hidden=True)]
    # carol comes and goes unseen by alice…
    carol.close()
    wait_until(lambda: any('"disconnect"' in line and '"carol"' in line for line in server.log),
               what="carol's session to close")
    carol = legacy(server.ws_url, f"carol?token={tokens['carol']}")
    # …until they exchange a message: then alice is told where carol is, before the message itself.
    carol.send(encode_legacy_send("alice", "hello alice"))
    assert recv_frame(alice) == p.Presence("carol", True)
    message = recv_frame(alice)
    assert isinstance(message, p.Message) and message.sender == "carol"
    assert who(chatcli, server, "alice", tokens["alice"]).out == ["alice", "bob", "carol"]
    assert who(chatcli, server, "carol", tokens["carol"]).out == ["alice", "carol"]
    carol.close()
    assert recv_frame(alice) == p.Presence("carol", False)


def test_presence_off_answers_who_and_watch_with_unavailable(chatcli: Chatcli, start_server: StartServer,
                                                             tokens: dict[str, str]) -> None:
    server = start_server("--presence", "off")
    online_with_bob_and_carol(server, tokens)
    alice, hello = native(server.ws_url, "alice", key=tokens["alice"])
    assert p.Feature.PRESENCE not in hello.features
    for request in (p.Watch(("bob",)), p.WhoRequest("w1")):
        alice.send(p.encode(request))
        error = recv_frame(alice)
        assert isinstance(error, p.Error) and error.code == p.ErrorCode.UNAVAILABLE
        assert "--presence off" in error.message
    refused = who(chatcli, server, "alice", tokens["alice"])
    assert refused.proc.returncode == 5 and refused.out == [] and "presence off" in refused.err[-1]
    assert send_native(alice, "bob", "chat still works").status == p.Status.DELIVERED


def test_presence_all_shows_everyone_even_with_accounts(chatcli: Chatcli, start_server: StartServer,
                                                        tokens: dict[str, str]) -> None:
    server = start_server("--presence", "all")
    online_with_bob_and_carol(server, tokens)
    assert who(chatcli, server, "dave", tokens["dave"]).out == ["bob", "carol"]
    dave, _ = native(server.ws_url, "dave", key=tokens["dave"])
    dave.send(p.encode(p.Watch(("carol",))))
    assert recv_frame(dave) == p.Presence("carol", True)


def test_without_accounts_everyone_is_visible_by_default(chatcli: Chatcli, server: RunningServer) -> None:
    # Anyone can claim any id without accounts: hiding presence would protect nothing.
    bob = legacy(server.ws_url, "bob")
    process = chatcli("who", "alice", "--url", server.ws_url)
    assert process.wait() == 0 and process.out == ["bob"]
    bob.close()


def test_presence_contacts_needs_stored_messages(tmp_home: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "chatcli", "serve", "--ephemeral", "--presence", "contacts",
                             "--ws-port", "0", "--http-port", "0"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "--presence contacts" in result.stderr and "--ephemeral" in result.stderr
    assert "Traceback" not in result.stderr
