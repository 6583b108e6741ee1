"""What the commit script publishes for the other nodes, read back by ``published_records``: on a real Redis."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import redis

from chatcli.server.engine.base import NewMessage
from chatcli.server.engine.redis_engine import _commit_args, _pack
from chatcli.server.engine.redis_lua import COMMIT, channel, published_records
from tests.support.redis_server import shared_redis

KEYS = ("chatcli:epoch", "chatcli:ids", "chatcli:users", "chatcli:newest_ts")


def commit(client: Any, batch: list[NewMessage]) -> Any:
    """One commit as a node makes it (its packed arguments), answered by Redis."""
    sha = client.script_load(COMMIT)
    connection = client.connection_pool.get_connection()
    try:
        connection.send_packed_command([_pack(("EVALSHA", sha, len(KEYS), *KEYS), _commit_args("e", batch))])
        return connection.read_response()
    finally:
        client.connection_pool.release(connection)


def test_what_a_commit_publishes_reads_back_as_committed() -> None:
    client = redis.Redis(unix_socket_path=str(shared_redis().socket_path), db=7)  # a database of its own
    client.flushdb()
    client.set("chatcli:epoch", "e")
    bob, carol = f"bob{secrets.token_hex(4)}", f"carol{secrets.token_hex(4)}"  # channels are shared by all dbs
    subscriber = client.pubsub()
    subscriber.subscribe(channel(bob))
    assert subscriber.get_message(timeout=5)["type"] == "subscribe"
    texts = ["one", "two\nlines\n", "ÿ é 😀 \\ ' \" \x7f", " "]  # U+00FF is two bytes in UTF-8, never 0xFF
    commit(client, [NewMessage(carol, bob, text, 1000.25) for text in texts])
    commit(client, [NewMessage(carol, bob, "a reply", 1001.5, reply_to=2), NewMessage(carol, bob, "last", 1001.5)])
    payloads = [subscriber.get_message(timeout=5)["data"] for _ in range(2)]
    subscriber.close()
    records = [record for payload in payloads for record in published_records(payload)]
    assert records == [(1, 1, 1000.25, carol, None, "one"), (2, 2, 1000.25, carol, None, "two\nlines\n"),
                       (3, 3, 1000.25, carol, None, texts[2]), (4, 4, 1000.25, carol, None, " "),
                       (5, 5, 1001.5, carol, 2, "a reply"), (6, 6, 1001.5, carol, None, "last")]
    client.flushdb()


def test_a_payload_of_nodes_before_this_format_is_read_too() -> None:
    """A cluster being upgraded: length-prefixed records, as the nodes before published them."""
    records = [("1\n1", "two\nlines"), ("7\n8 1", "é😀")]  # the second a reply to 1
    payload = "".join(f"{head}\n1000.5\ncarol\n{len(text.encode())}\n{text}" for head, text in records).encode()
    assert list(published_records(payload)) == [(1, 1, 1000.5, "carol", None, "two\nlines"),
                                                 (7, 8, 1000.5, "carol", 1, "é😀")]


@pytest.mark.parametrize("payload", [b"\xff1\xff1\xff1000.0\xffcarol", b"1\n1\nnot a record", b"\n"])
def test_a_payload_that_is_not_whole_records_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="published record"):
        list(published_records(payload))
