"""A server you can put on a network: accounts, TLS, limits, liveness and metrics (real processes)."""

from __future__ import annotations

import json
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from chatcli import protocol as p
from tests.support.credentials import add_user, issue_certificate
from tests.support.flutter_app import encode_legacy_send
from tests.support.processes import RunningServer, StartServer, metric, wait_until
from tests.support.wsclients import RawClient, is_open, legacy, native, recv_frame, send_native, server_close

# -- accounts --------------------------------------------------------------------------


def test_accounts_stop_impersonation_in_both_protocols(start_server: StartServer, tmp_path: Path) -> None:
    db = tmp_path / "chatcli.db"
    alice_token, bob_token = add_user(db, "alice"), add_user(db, "bob")
    server = start_server()
    assert server.wait_log('"mode": "tokens"')
    # The shared key no longer opens a session, and nobody can claim an id without its token.
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {p.DEFAULT_AUTH_KEY}"}, 403),
                            ({"Authorization": f"Bearer {bob_token}"}, 403)):
        raw = RawClient(server.ws_port, "/alice", {"Sec-WebSocket-Protocol": p.SUBPROTOCOL, **headers})
        assert raw.status == status
    assert RawClient(server.ws_port, "/alice").status == 401  # a seed app without ?token=
    assert RawClient(server.ws_port, f"/alice?token={bob_token}").status == 403
    # With their own tokens: native by header, the seed app by ?token=, its per-frame key not needed.
    bob, _ = native(server.ws_url, "bob", key=bob_token)
    alice = legacy(server.ws_url, f"alice?token={alice_token}")
    alice.send(encode_legacy_send("bob", "it's really alice", auth="anything"))
    assert alice.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    message = recv_frame(bob)
    assert isinstance(message, p.Message) and (message.sender, message.text) == ("alice", "it's really alice")
    assert not any(alice_token in line or bob_token in line for line in server.log), "a token reached the log"


def test_rotating_a_token_locks_out_the_old_one(start_server: StartServer, tmp_path: Path) -> None:
    db = tmp_path / "chatcli.db"
    old = add_user(db, "alice")
    server = start_server()
    native(server.ws_url, "alice", key=old)[0].close()
    new = subprocess.run([sys.executable, "-m", "chatcli", "user", "rotate", "alice", "--db", str(db)],
                         capture_output=True, text=True, check=True).stdout.strip()
    with pytest.raises(InvalidStatus) as refused:
        native(server.ws_url, "alice", key=old)
    assert refused.value.response.status_code == 403
    native(server.ws_url, "alice", key=new)[0].close()


def user_command(db: Path, *args: str) -> str:
    """``chatcli user ARGS --db DB`` as an operator runs it; its output (a new token)."""
    return subprocess.run([sys.executable, "-m", "chatcli", "user", *args, "--db", str(db)], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_rotating_a_token_closes_the_sessions_it_opened_and_only_those(start_server: StartServer,
                                                                      tmp_path: Path) -> None:
    db = tmp_path / "chatcli.db"
    server = start_server()
    shared_key, _ = native(server.ws_url, "carol")  # opened before any account existed
    old, bob_token, dave_token = add_user(db, "alice"), add_user(db, "bob"), add_user(db, "dave")
    old_native, _ = native(server.ws_url, "alice", key=old)
    old_seed_app = legacy(server.ws_url, f"alice?token={old}")
    bob, _ = native(server.ws_url, "bob", key=bob_token)
    dave, _ = native(server.ws_url, "dave", key=dave_token)

    rotated_at = time.monotonic()
    new = user_command(db, "rotate", "alice")
    assert server_close(old_native) == (1008, "token revoked")
    assert server_close(old_seed_app) == (1008, "token revoked")
    assert time.monotonic() - rotated_at < 3
    new_native, _ = native(server.ws_url, "alice", key=new)
    # Another change, and its effect: a check ran after the new session opened, and left it alone.
    user_command(db, "rotate", "dave")
    assert server_close(dave) == (1008, "token revoked")
    assert all(is_open(ws) for ws in (new_native, bob, shared_key))
    assert send_native(new_native, "bob", "still here").accepted
    revoked = [json.loads(line) for line in server.log if '"event": "token-revoked"' in line]
    assert [(line["user"], line["sessions"]) for line in revoked] == [("alice", 2), ("dave", 1)]
    assert not any(token in line for line in server.log for token in (old, new, bob_token, dave_token))


def test_removing_an_account_closes_its_sessions(start_server: StartServer, tmp_path: Path) -> None:
    db = tmp_path / "chatcli.db"
    alice_token, bob_token = add_user(db, "alice"), add_user(db, "bob")
    server = start_server()
    alice_native, _ = native(server.ws_url, "alice", key=alice_token)
    alice_seed_app = legacy(server.ws_url, f"alice?token={alice_token}")
    bob, _ = native(server.ws_url, "bob", key=bob_token)
    subprocess.run([sys.executable, "-m", "chatcli", "user", "remove", "alice", "--db", str(db)], check=True,
                   capture_output=True)
    assert server_close(alice_native) == (1008, "token revoked")
    assert server_close(alice_seed_app) == (1008, "token revoked")
    assert is_open(bob)
    assert server.wait_log('"event": "token-revoked"') and server.wait_log('"user": "alice"')


def test_a_database_from_before_token_revocation_still_serves(start_server: StartServer, tmp_path: Path) -> None:
    db = tmp_path / "chatcli.db"
    alice_token, bob_token = add_user(db, "alice"), add_user(db, "bob")
    with sqlite3.connect(db) as conn:  # as the release before the accounts' generation left the file
        conn.execute("DROP TABLE account_generation")
        conn.execute("UPDATE schema_versions SET version = 1 WHERE component = 'accounts'")
    server = start_server()  # migrates it
    alice, _ = native(server.ws_url, "alice", key=alice_token)
    bob, _ = native(server.ws_url, "bob", key=bob_token)
    assert send_native(alice, "bob", "after the upgrade").accepted
    user_command(db, "rotate", "bob")
    assert server_close(bob) == (1008, "token revoked")
    with pytest.raises(InvalidStatus):
        native(server.ws_url, "bob", key=bob_token)
    assert is_open(alice)


def test_accounts_added_while_running_turn_tokens_on(server: RunningServer, tmp_path: Path) -> None:
    native(server.ws_url, "alice")[0].close()  # shared key works: no accounts yet
    token = add_user(tmp_path / "chatcli.db", "alice")
    with pytest.raises(InvalidStatus):
        native(server.ws_url, "alice")
    native(server.ws_url, "alice", key=token)[0].close()
    assert server.wait_log("per-user tokens are now required")
    # Removing the last account takes --allow-last, and the server says loudly what it means.
    removed = subprocess.run([sys.executable, "-m", "chatcli", "user", "remove", "alice", "--allow-last", "--db",
                              str(tmp_path / "chatcli.db")], capture_output=True, text=True)
    assert removed.returncode == 0
    native(server.ws_url, "mallory")[0].close()
    assert server.wait_log("the last account was removed")
    assert any('"level": "warning"' in line for line in server.log if "the last account was removed" in line)


def test_require_auth_without_accounts_refuses_everyone(start_server: StartServer) -> None:
    server = start_server("--require-auth")
    assert RawClient(server.ws_port, "/alice").status == 401


def test_user_commands_list_remove_and_errors(tmp_path: Path) -> None:
    db = str(tmp_path / "accounts" / "accounts.db")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "chatcli", "user", *args, "--db", db], capture_output=True,
                              text=True)

    # Before any account: a mistyped --db is an error, and no empty database (or folder) appears there.
    for command in (("list",), ("remove", "alice"), ("rotate", "alice")):
        missing = run(*command)
        assert missing.returncode == 1 and f"no database at {db}" in missing.stderr
    assert not (tmp_path / "accounts").exists()

    token = run("add", "alice")
    assert token.returncode == 0 and len(token.stdout.strip()) >= 40 and "only once" in token.stderr
    taken = run("add", "alice")  # a provisioning script tells "already there" from a failure
    assert taken.returncode == 9 and "already exists" in taken.stderr and taken.stdout == ""
    assert run("add", "bad id").returncode == 2
    assert run("list").stdout.startswith("alice\t")
    last = run("remove", "alice")  # the last account: tokens would silently turn off on a running server
    assert last.returncode == 2 and "alice is the last account" in last.stderr and "--allow-last" in last.stderr
    assert run("list").stdout.startswith("alice\t")
    assert run("remove", "alice", "--allow-last").returncode == 0
    gone = run("remove", "alice")
    assert gone.returncode == 9 and "no account named 'alice'" in gone.stderr
    assert run("rotate", "alice").returncode == 9
    assert run("list").stdout == ""
    assert token.stdout.strip().encode() not in Path(db).read_bytes()


# -- TLS ---------------------------------------------------------------------------------


def test_tls_end_to_end(start_server: StartServer, tmp_path: Path) -> None:
    certificate = issue_certificate(tmp_path, "127.0.0.1", "localhost")
    server = start_server(*certificate.server_args())
    context = ssl.create_default_context()
    certificate.ca.configure_trust(context)
    url = f"wss://127.0.0.1:{server.ws_port}"
    bob, _ = native(url, "bob", ssl=context)
    alice, _ = native(url, "alice", ssl=context)
    assert send_native(alice, "bob", "over TLS").status == p.Status.DELIVERED
    assert recv_frame(bob).text == "over TLS"  # type: ignore[union-attr]
    with pytest.raises(ssl.SSLError):  # a client that does not trust the CA is refused
        connect(f"{url}/eve", ssl=ssl.create_default_context(), open_timeout=5)
    with urllib.request.urlopen(f"https://127.0.0.1:{server.http_port}/healthz", context=context, timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_an_encrypted_key_takes_its_passphrase_from_the_environment(start_server: StartServer,
                                                                     tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    certificate = issue_certificate(tmp_path)
    key = serialization.load_pem_private_key(certificate.keyfile.read_bytes(), password=None)
    certificate.keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.BestAvailableEncryption(b"s3cret")))
    # Without it: one clear line, no prompt on the terminal (stdin is not even read).
    with pytest.raises(RuntimeError, match="is encrypted: give its passphrase in CHATCLI_TLS_KEY_PASSPHRASE"):
        start_server(*certificate.server_args())
    server = start_server(*certificate.server_args(), env={"CHATCLI_TLS_KEY_PASSPHRASE": "s3cret"})
    context = ssl.create_default_context()
    certificate.ca.configure_trust(context)
    bob, _ = native(f"wss://127.0.0.1:{server.ws_port}", "bob", ssl=context)
    bob.close()


def test_certfile_without_keyfile_is_a_usage_error(start_server: StartServer, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="go together"):
        start_server("--certfile", str(tmp_path / "cert.pem"))


# -- limits -------------------------------------------------------------------------------


def test_rate_limit_paces_both_protocols_in_order(start_server: StartServer) -> None:
    server = start_server("--rate", "4", "--burst", "3")
    alice, _ = native(server.ws_url, "alice")
    bob, _ = native(server.ws_url, "bob")
    started = time.monotonic()
    for i in range(6):  # pipelined: 3 go at once, the rest wait for the bucket, none is refused
        alice.send(p.encode(p.Send(f"m{i}", "bob", f"native {i}")))
    acks = [recv_frame(alice) for _ in range(6)]
    assert [(a.id, a.status) for a in acks if isinstance(a, p.Ack)] == [(f"m{i}", p.Status.DELIVERED) for i in range(6)]
    assert time.monotonic() - started >= 3 / 4 * 0.95  # 6 from a bucket of 3 refilled at 4 a second
    carol = legacy(server.ws_url, "carol")  # a seed app over its limit is paced too, never sent send:error
    for i in range(5):
        carol.send(encode_legacy_send("bob", f"seed {i}"))
    assert [carol.recv(timeout=5) for _ in range(5)] == [p.LEGACY_SEND_SUCCESS] * 5
    received = [(m.sender, m.text) for m in messages_until_quiet(bob)]
    assert [text for sender, text in received if sender == "alice"] == [f"native {i}" for i in range(6)]
    assert [text for sender, text in received if sender == "carol"] == [f"seed {i}" for i in range(5)]
    assert metric(server, "chatcli_messages_refused_total", '{reason="rate-limited"}') == 0
    assert metric(server, "chatcli_rate_limit_waits_total") >= 2


def messages_until_quiet(ws, quiet: float = 0.3) -> list[p.Message]:  # type: ignore[no-untyped-def]
    out = []
    while True:
        try:
            frame = recv_frame(ws, timeout=quiet)
        except TimeoutError:
            return out
        if isinstance(frame, p.Message):
            out.append(frame)


def test_max_connections_and_sessions_per_user(start_server: StartServer) -> None:
    server = start_server("--max-connections", "3", "--max-sessions-per-user", "2")
    first, second = legacy(server.ws_url, "alice"), legacy(server.ws_url, "alice")
    too_many = RawClient(server.ws_port, "/alice")
    assert too_many.status == 429 and "too many sessions for alice" in too_many.response_body()
    third = legacy(server.ws_url, "bob")
    full = RawClient(server.ws_port, "/carol")
    assert full.status == 503 and "server full" in full.response_body()
    for ws in (first, second, third):
        ws.close()
    wait_until(lambda: RawClient(server.ws_port, "/carol").status == 101, timeout=5, what="room to free up")


def test_slow_consumer_is_closed_while_others_keep_chatting(start_server: StartServer) -> None:
    server = start_server("--max-buffer", "262144")
    sleeper = RawClient(server.ws_port, "/sleeper")  # never reads a byte after the handshake
    sleeper.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    flooder = legacy(server.ws_url, "flooder")
    alice, _ = native(server.ws_url, "alice")
    bob, _ = native(server.ws_url, "bob")
    chunk = "x" * 8000
    start_rss = _rss_kb(server.proc.pid)

    def sleeper_closed() -> bool:
        for _ in range(50):
            flooder.send(encode_legacy_send("sleeper", chunk))
            flooder.recv(timeout=5)
        return metric(server, "chatcli_sessions_closed_total", '{why="slow-consumer"}') >= 1

    wait_until(sleeper_closed, timeout=30, what="the slow consumer to be closed")
    assert _rss_kb(server.proc.pid) - start_rss < 64 * 1024, "server memory grew without bound"
    assert send_native(alice, "bob", "still flowing").status == p.Status.DELIVERED
    assert recv_frame(bob).text == "still flowing"  # type: ignore[union-attr]
    assert server.wait_log("too many unread messages")
    # What it missed is stored: a new session gets it.
    back, _ = native(server.ws_url, "sleeper")
    assert recv_frame(back).text == chunk  # type: ignore[union-attr]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def test_dead_peers_are_found_with_pings(start_server: StartServer) -> None:
    server = start_server("--ping-interval", "0.3", "--ping-timeout", "0.5")
    mute = RawClient(server.ws_port, "/mute")  # answers no ping
    assert mute.recv_frame() == (0x1, b"connected")
    alive = legacy(server.ws_url, "alive")  # the websockets client answers pings by itself
    assert mute.recv_frame()[0] == 0x9  # a ping came
    wait_until(lambda: metric(server, "chatcli_sessions_closed_total", '{why="dead-peer"}') == 1, timeout=10,
               what="the mute peer to be dropped")
    alive.send(encode_legacy_send("alive", "still here"))
    assert alive.recv(timeout=5) in (p.LEGACY_SEND_SUCCESS, "{'cmd':'send','userid':'alive', 'msgtext':'still here'}")


def test_oversize_message_is_refused_with_too_large(start_server: StartServer) -> None:
    server = start_server("--max-text-bytes", "10")
    alice, hello = native(server.ws_url, "alice")
    assert hello.max_text_bytes == 10
    assert send_native(alice, "bob", "x" * 11).reason == p.Reason.TOO_LARGE
    assert send_native(alice, "bob", "x" * 10).status == p.Status.STORED


# -- operations -----------------------------------------------------------------------------


def test_metrics_change_as_traffic_flows(server: RunningServer) -> None:
    before = {name: metric(server, name) for name in ("chatcli_messages_routed_total", "chatcli_bytes_received_total",
                                                      "chatcli_ack_latency_seconds_count")}
    alice, _ = native(server.ws_url, "alice")
    bob = legacy(server.ws_url, "bob")
    assert metric(server, "chatcli_sessions", '{protocol="legacy"}') == 1
    assert metric(server, "chatcli_sessions", '{protocol="chatcli.v1"}') == 1
    send_native(alice, "bob", "one")
    send_native(alice, "carol", "stored")
    alice.send("junk")
    recv_frame(alice)
    assert metric(server, "chatcli_messages_routed_total") == before["chatcli_messages_routed_total"] + 1
    assert metric(server, "chatcli_messages_stored_total") == 1
    assert metric(server, "chatcli_errors_total", '{code="bad-json"}') == 1
    assert metric(server, "chatcli_ack_latency_seconds_count") == before["chatcli_ack_latency_seconds_count"] + 2
    assert metric(server, "chatcli_bytes_received_total") > before["chatcli_bytes_received_total"]
    assert metric(server, "chatcli_db_bytes") > 0
    bob.close()
    wait_until(lambda: metric(server, "chatcli_sessions", '{protocol="legacy"}') == 0, timeout=5,
               what="the closed session to leave the gauge")


def test_who_and_presence(server: RunningServer) -> None:
    alice, hello = native(server.ws_url, "alice")
    assert p.Feature.PRESENCE in hello.features
    alice.send(p.encode(p.Watch(("bob",))))
    assert recv_frame(alice) == p.Presence("bob", False)
    bob1, bob2 = legacy(server.ws_url, "bob"), legacy(server.ws_url, "bob")
    assert recv_frame(alice) == p.Presence("bob", True)  # once, for the first session
    alice.send(p.encode(p.WhoRequest("w1")))
    assert recv_frame(alice) == p.Who("w1", ("alice", "bob"))
    bob1.close()
    bob2.close()
    assert recv_frame(alice) == p.Presence("bob", False)  # once, when the last session closed


def test_closed_watcher_is_forgotten(server: RunningServer) -> None:
    alice, _ = native(server.ws_url, "alice")
    alice.send(p.encode(p.Watch(("bob",))))
    recv_frame(alice)
    alice.close()
    bob = legacy(server.ws_url, "bob")
    bob.close()
    assert server.proc.poll() is None
    with pytest.raises(ConnectionClosed):
        alice.recv(timeout=1)
