"""Several ``chatcli serve --redis`` nodes on one real redis-server act as one server.

Three nodes share one Redis for the tests that only talk (each uses its own user names);
the tests that kill, wipe or stop something get a Redis and nodes of their own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from chatcli import protocol as p
from tests.support.flutter_app import decode_legacy_message, encode_legacy_send
from tests.support.processes import Chatcli, RunningServer, kill_leftovers, metric, start_server_process, wait_until
from tests.support.redis_server import RedisServer, redis_cli
from tests.support.samples import NASTY_TEXTS
from tests.support.wsclients import is_open, legacy, native, recv_frame, send_native, server_close

#: ``start_node(redis, *args)`` starts one more node on ``redis``.
StartNode = Callable[..., RunningServer]


def _node_factory(started: list[RunningServer]) -> StartNode:
    def start(redis: RedisServer, *args: str) -> RunningServer:
        node = start_server_process(["--redis", redis.url, *args])
        started.append(node)
        return node
    return start


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def cluster(shared_redis: RedisServer) -> Iterator[list[RunningServer]]:
    """Three nodes on one Redis, shared by this module's talking tests."""
    started: list[RunningServer] = []
    start = _node_factory(started)
    try:
        yield [start(shared_redis) for _ in range(3)]
    finally:
        kill_leftovers(node.proc for node in started)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def start_node() -> Iterator[StartNode]:
    started: list[RunningServer] = []
    yield _node_factory(started)
    kill_leftovers(node.proc for node in started)


def messages(ws, count: int, timeout: float = 5) -> list[p.Message]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(count):
        frame = recv_frame(ws, timeout)
        while isinstance(frame, p.Presence):  # presence of watched users may come in between
            frame = recv_frame(ws, timeout)
        assert isinstance(frame, p.Message), frame
        out.append(frame)
    return out


def who(url: str, user: str) -> tuple[str, ...]:
    ws, _ = native(url, user)
    ws.send(p.encode(p.WhoRequest("w")))
    answer = recv_frame(ws)
    ws.close()
    assert isinstance(answer, p.Who), answer
    return answer.users


def health(node: RunningServer) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(node.http_url + "/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- several nodes, one server ----------------------------------------------------------------------


def test_messages_reach_every_session_on_every_node_in_order_both_protocols(cluster: list[RunningServer]) -> None:
    one, two, three = cluster
    alice, _ = native(one.ws_url, "alice1")
    bob_native_two, _ = native(two.ws_url, "bob1")
    bob_native_three, _ = native(three.ws_url, "bob1")
    bob_seed_app = legacy(three.ws_url, "bob1")
    # Node one learns of bob's sessions from the other nodes' presence events (milliseconds): its acks then
    # say delivered, not stored.
    wait_until(lambda: "bob1" in who(one.ws_url, "alice1"), 5, "node one to see bob online")
    texts = [f"m{i} it's {i}" for i in range(30)]
    acks = [send_native(alice, "bob1", text) for text in texts]
    assert {ack.status for ack in acks} == {p.Status.DELIVERED}
    for session in (bob_native_two, bob_native_three):
        got = messages(session, len(texts))
        assert [(m.id, m.sender, m.text) for m in got] == [(a.msg_id, "alice1", t) for a, t in zip(acks, texts,
                                                                                                 strict=True)]
    assert [decode_legacy_message(bob_seed_app.recv(timeout=5)) for _ in texts] == [("alice1", t) for t in texts]
    bob_seed_app.send(encode_legacy_send("alice1", "seed app's answer"))  # from node three to node one
    assert bob_seed_app.recv(timeout=5) == p.LEGACY_SEND_SUCCESS
    assert [(m.sender, m.text) for m in messages(alice, 1)] == [("bob1", "seed app's answer")]


def test_every_nasty_text_crosses_nodes_unchanged(cluster: list[RunningServer]) -> None:
    one, two, _ = cluster
    bob, _ = native(two.ws_url, "bob4")
    alice, _ = native(one.ws_url, "alice4")
    texts = [text for text in NASTY_TEXTS if text]
    for text in texts:  # several per batch and per published payload: lengths, newlines, any UTF-8
        alice.send(p.encode(p.Send(f"c{len(text)}-{hash(text)}", "bob4", text)))
    assert [m.text for m in messages(bob, len(texts))] == texts


def test_offline_delivery_history_who_and_presence_across_nodes(cluster: list[RunningServer]) -> None:
    one, two, three = cluster
    alice, _ = native(one.ws_url, "alice2")
    stored = [send_native(alice, "carol2", f"while you were out {i}") for i in range(3)]
    assert {ack.status for ack in stored} == {p.Status.STORED}
    carol, _ = native(three.ws_url, "carol2")  # another node than the one that stored them
    assert [m.text for m in messages(carol, 3)] == [f"while you were out {i}" for i in range(3)]
    assert send_native(carol, "alice2", "back now").status == p.Status.DELIVERED
    assert [m.text for m in messages(alice, 1)] == ["back now"]
    reader, _ = native(two.ws_url, "alice2", headers={p.REPLAY_SINCE_HEADER: "2999-01-01T00:00:00Z"})
    reader.send(p.encode(p.HistoryRequest("h", "carol2", limit=3)))
    history = recv_frame(reader)
    assert isinstance(history, p.History)
    assert [(m.sender, m.text) for m in history.messages] == [
        ("alice2", "while you were out 1"), ("alice2", "while you were out 2"), ("carol2", "back now")]
    wait_until(lambda: {"alice2", "carol2"} <= set(who(two.ws_url, "dave2")), 5, "who on node two")
    watcher, _ = native(one.ws_url, "dave2")
    watcher.send(p.encode(p.Watch(("erin2",))))
    assert recv_frame(watcher) == p.Presence("erin2", False)
    erin, _ = native(two.ws_url, "erin2")
    assert recv_frame(watcher) == p.Presence("erin2", True)
    erin.close()
    assert recv_frame(watcher) == p.Presence("erin2", False)


def test_a_seed_apps_cursor_is_written_soon_and_nothing_comes_twice_through_another_node(
        cluster: list[RunningServer], shared_redis: RedisServer) -> None:
    """A seed app's cursor moves as messages are written to it, with no message of its own to commit: the
    node gathers such moves (CURSOR_DELAY_S) but writes them within it, and at once when the app leaves."""
    one, two, _ = cluster
    alice, _ = native(one.ws_url, "alice5")
    seed_app = legacy(two.ws_url, "bob5")
    wait_until(lambda: "bob5" in who(one.ws_url, "alice5"), 5, "node one to see bob online")

    def cursor() -> int:
        return int(redis_cli(shared_redis, "EVAL", "return tonumber(redis.call('HGET', KEYS[1], 'c') or '0')",
                             "1", "{u:bob5}:m"))

    for round_ in ("a", "b"):
        acks = [send_native(alice, "bob5", f"{round_}{i}") for i in range(3)]
        assert [decode_legacy_message(seed_app.recv(timeout=5)) for _ in acks] == [
            ("alice5", f"{round_}{i}") for i in range(3)]
        wait_until(lambda: cursor() == acks[-1].msg_id, 2, "the seed app's cursor in Redis")  # noqa: B023
    seed_app.close()
    seed_app = legacy(one.ws_url, "bob5")  # another node: its backlog starts after the cursor
    send_native(alice, "bob5", "after")
    assert decode_legacy_message(seed_app.recv(timeout=5)) == ("alice5", "after")


def test_a_killed_pubsub_connection_loses_nothing(cluster: list[RunningServer], shared_redis: RedisServer) -> None:
    one, two, _ = cluster
    bob, _ = native(two.ws_url, "bob3")
    alice, _ = native(one.ws_url, "alice3")
    texts = [f"streaming {i}" for i in range(400)]
    for text in texts:  # in flight, unacknowledged, while the subscriptions are killed
        alice.send(p.encode(p.Send(uuid.uuid4().hex, "bob3", text)))
    assert redis_cli(shared_redis, "CLIENT", "KILL", "TYPE", "pubsub").isdigit()  # every node's subscriptions
    assert [m.text for m in messages(bob, len(texts))] == texts  # each once, in order: gaps read from the stream
    assert two.wait_log("redis-pubsub-lost")


# -- failures: nodes, Redis ---------------------------------------------------------------------------


def test_redis_down_refuses_sends_at_once_then_recovers_and_lost_nothing_acked(
        redis: RedisServer, start_node: StartNode, chatcli: Chatcli) -> None:
    one, two = start_node(redis), start_node(redis)
    alice, _ = native(one.ws_url, "alice")
    bob, _ = native(two.ws_url, "bob")
    stored = [send_native(alice, "zed", f"kept {i}") for i in range(50)]
    assert {ack.status for ack in stored} == {p.Status.STORED}
    redis.kill()  # kill -9: Redis is gone, with its last fsync
    started = time.monotonic()
    refused = send_native(alice, "bob", "nobody to store this")
    assert (refused.status, refused.reason) == (p.Status.REFUSED, p.Reason.UNAVAILABLE)
    assert time.monotonic() - started < 2
    run = chatcli("send", "alice", "bob", "a script's message", "--url", one.ws_url)
    assert run.wait() == 5 and "unavailable" in run.err[-1], run.err
    for i in range(20):  # a flood of refusals is one line in the log, not one per batch
        assert send_native(alice, "bob", f"refused {i}").status == p.Status.REFUSED
    assert sum("could not store" in line for line in one.log) == 1
    status, body = health(one)
    assert status == 503 and body["storage"]["redis"]["state"] == "down"  # type: ignore[index]
    redis.start()  # the same AOF
    wait_until(lambda: health(one)[0] == 200 and health(two)[0] == 200, 15, "the nodes to find Redis again")
    assert send_native(alice, "bob", "after the outage").status == p.Status.DELIVERED
    assert [m.text for m in messages(bob, 1)] == ["after the outage"]  # bob's session stayed open
    zed, _ = native(two.ws_url, "zed")
    assert [m.id for m in messages(zed, 50)] == [ack.msg_id for ack in stored]
    assert metric(one, "chatcli_redis_reconnects_total") >= 1


def test_flushall_resets_clients_instead_of_skipping(redis: RedisServer, start_node: StartNode,
                                                     chatcli: Chatcli) -> None:
    one, two = start_node(redis), start_node(redis)
    listener = chatcli("listen", "bob", "--url", two.ws_url)
    listener.wait_stderr("listening as")
    alice, _ = native(one.ws_url, "alice")
    send_native(alice, "bob", "before")
    listener.wait_stdout_lines(1)
    assert redis_cli(redis, "FLUSHALL") == "OK"
    listener.wait_stderr("message store changed", timeout=10)
    wait_until(lambda: send_native(native(one.ws_url, "alice")[0], "bob", "after").accepted, 10, "a send")
    listener.wait_stdout_lines(2)
    assert [json.loads(line)["text"] for line in listener.out] == ["before", "after"]


def test_kill_9_of_a_node_loses_no_acked_message_and_its_users_go_offline(
        redis: RedisServer, start_node: StartNode, chatcli: Chatcli) -> None:
    one, two = start_node(redis), start_node(redis)
    lines = [f"line {i}" for i in range(3000)]
    receiver = chatcli("listen", "bob", "--url", two.ws_url)
    receiver.wait_stderr("listening as")
    carol, _ = native(one.ws_url, "carol")  # online through the node about to die
    wait_until(lambda: "carol" in who(two.ws_url, "dave"), 5, "carol online on node two")
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--timeout", "30", "--url", one.ws_url,
                     stdin=subprocess.PIPE)
    assert sender.proc.stdin is not None
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines))
    sender.proc.stdin.close()
    sender.wait_stdout_lines(200)
    one.proc.send_signal(signal.SIGKILL)
    one.proc.wait()
    killed = time.monotonic()
    assert len(sender.out) < len(lines), "the kill must land while lines are still being sent"
    start_node(redis, "--ws-port", str(one.ws_port))  # a supervisor restarts it
    wait_until(lambda: "carol" not in who(two.ws_url, "dave"), 15, "carol offline on node two")
    assert time.monotonic() - killed < 15
    assert sender.wait(timeout=60) == 0, sender.err
    acks = [json.loads(line) for line in sender.out]
    assert len({ack["msg_id"] for ack in acks}) == len(lines)
    receiver.wait_stdout_lines(len(lines), timeout=30)
    assert [json.loads(line)["text"] for line in receiver.out] == lines
    carol.close()


def test_accounts_and_contacts_are_shared_by_every_node(redis: RedisServer, start_node: StartNode,
                                                       chatcli: Chatcli) -> None:
    tokens = {}
    for user in ("alice", "bob"):
        add = chatcli("user", "add", user, "--redis", redis.url)
        assert add.wait() == 0
        tokens[user] = add.out[0]
    token = tokens["alice"]
    one, two = start_node(redis), start_node(redis)
    for node in (one, two):
        ws, hello = native(node.ws_url, "alice", key=token)
        assert p.Feature.TOKENS in hello.features
        ws.close()
    # With accounts, presence shows contacts only (the default): bob, online on node one, is visible to
    # alice on node two once they exchanged a message, whichever node stored it.
    bob, _ = native(one.ws_url, "bob", key=tokens["bob"])
    alice, _ = native(two.ws_url, "alice", key=token)
    alice.send(p.encode(p.WhoRequest("before")))
    assert recv_frame(alice) == p.Who("before", ("alice",))
    assert send_native(bob, "alice", "hello").accepted
    assert [m.text for m in messages(alice, 1)] == ["hello"]
    alice.send(p.encode(p.WhoRequest("after")))
    assert recv_frame(alice) == p.Who("after", ("alice", "bob"))
    with pytest.raises(InvalidStatus, match=r"HTTP 403"):
        native(two.ws_url, "alice", key="not the token")
    listed = chatcli("user", "list", "--redis", redis.url)
    assert listed.wait() == 0 and listed.out[0].startswith("alice\t")


def test_a_token_rotated_from_anywhere_closes_its_sessions_on_every_node(redis: RedisServer, start_node: StartNode,
                                                                         chatcli: Chatcli) -> None:
    def user(*args: str) -> str:
        command = chatcli("user", *args, "--redis", redis.url)
        assert command.wait() == 0, command.err
        return command.out[0] if command.out else ""

    old, bob_token = user("add", "alice"), user("add", "bob")
    one, two = start_node(redis), start_node(redis)
    on_one, _ = native(one.ws_url, "alice", key=old)
    seed_app_on_two = legacy(two.ws_url, f"alice?token={old}")
    bob, _ = native(two.ws_url, "bob", key=bob_token)
    new = user("rotate", "alice")
    assert server_close(on_one) == (1008, "token revoked")
    assert server_close(seed_app_on_two) == (1008, "token revoked")
    alice, _ = native(one.ws_url, "alice", key=new)
    user("remove", "bob")
    assert server_close(bob) == (1008, "token revoked")
    assert is_open(alice)
    for node in (one, two):
        assert node.wait_log('"event": "token-revoked"')
        assert not any(old in line or new in line for line in node.log)


def test_token_checks_with_redis_gone_say_so_once_and_keep_the_node_up(redis: RedisServer, start_node: StartNode,
                                                                       chatcli: Chatcli) -> None:
    add = chatcli("user", "add", "alice", "--redis", redis.url)
    assert add.wait() == 0
    node = start_node(redis)
    # Send-only: no backlog read in flight, which a Redis gone would fail (1011) and so end the session.
    alice, _ = native(node.ws_url, "alice", key=add.out[0], headers={p.RECEIVE_HEADER: "none"})
    redis.kill()
    assert node.wait_log("cannot check for revoked tokens")
    assert node.proc.poll() is None and is_open(alice)
    assert sum("cannot check for revoked tokens" in line for line in node.log) == 1  # not one a second
    assert not any("Traceback" in line for line in node.log)


def test_strict_durability_and_an_evicting_redis_refuse_to_start(tmp_path: Path) -> None:
    relaxed = RedisServer(tmp_path / "r", extra=["--appendfsync", "everysec", "--maxmemory-policy",
                                                 "allkeys-lru"]).start()
    try:
        with pytest.raises(RuntimeError, match="maxmemory-policy is allkeys-lru"):
            start_server_process(["--redis", relaxed.url], timeout=10)
        assert redis_cli(relaxed, "CONFIG", "SET", "maxmemory-policy", "noeviction") == "OK"
        with pytest.raises(RuntimeError, match="strict needs appendonly yes and appendfsync always"):
            start_server_process(["--redis", relaxed.url, "--redis-durability", "strict"], timeout=10)
        node = start_server_process(["--redis", relaxed.url], timeout=10)
        try:
            assert node.wait_log("a Redis crash or power loss can lose about the last second")
        finally:
            kill_leftovers([node.proc])
    finally:
        relaxed.stop()
