"""Issue 13's frames: ``send.reply_to``, ``message.reply_to`` and ``search``; exact text in and out."""

from __future__ import annotations

from typing import Any

import pytest

from chatcli import protocol as p
from chatcli.errors import LocalProtocolError, RemoteProtocolError
from tests.support.samples import TS

REPLY_SEND = '{"type":"send","id":"c9","to":"alice","text":"yes","reply_to":42}'
REPLY_MESSAGE = f'{{"type":"message","id":43,"from":"bob","to":"alice","text":"yes","ts":"{TS}","reply_to":42}}'
SEARCH_FULL = ('{"type":"search","id":"s1","text":"lunch","limit":5,"peer":"bob",'
               '"since":"2026-11-25T00:00:00Z","before":40}')


def test_a_reply_round_trips_byte_for_byte() -> None:
    send = p.parse_client_frame(REPLY_SEND)
    assert isinstance(send, p.Send) and send.reply_to == 42
    assert p.encode(send) == REPLY_SEND
    message = p.parse_server_frame(REPLY_MESSAGE)
    assert isinstance(message, p.Message) and message.reply_to == 42
    assert p.encode(message) == REPLY_MESSAGE


def test_the_fast_send_path_hands_a_reply_over_as_a_send() -> None:
    assert p.read_client_frame(REPLY_SEND) == p.Send("c9", "alice", "yes", reply_to=42)
    assert p.read_client_frame('{"type":"send","id":"c9","to":"alice","text":"yes"}') == ("c9", "alice", "yes")


def test_encode_message_with_a_reply_is_the_dataclass_encoding() -> None:
    assert p.encode_message(43, "bob", "alice", "yes", TS, 42) == REPLY_MESSAGE
    assert p.encode_message(43, "bob", "alice", "yes", TS) == p.encode(p.Message(43, "bob", "alice", "yes", TS))


@pytest.mark.parametrize("value", [-1, "42", 1.5, True, p.MAX_INT + 1])
def test_reply_to_must_be_a_message_id(value: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="reply_to must be an integer"):
        p.parse_client_frame(f'{{"type":"send","id":"c","to":"bob","text":"x","reply_to":{_json(value)}}}')
    with pytest.raises(LocalProtocolError, match="reply_to"):
        p.Message(1, "a", "b", "x", TS, reply_to=value)


def _json(value: Any) -> str:
    import json
    return json.dumps(value)


def test_search_request_round_trips_and_defaults() -> None:
    request = p.parse_client_frame(SEARCH_FULL)
    assert request == p.SearchRequest("s1", "lunch", 5, "bob", "2026-11-25T00:00:00Z", 40)
    assert p.encode(request) == SEARCH_FULL
    assert p.parse_client_frame('{"type":"search","id":"s2","text":"x"}') == p.SearchRequest("s2", "x")
    assert p.encode(p.SearchRequest("s2", "x")) == '{"type":"search","id":"s2","text":"x","limit":20}'


@pytest.mark.parametrize(("fields", "message"), [
    ({"text": ""}, "text must be a non-empty string"),
    ({"text": "   "}, "text must hold a word"),
    ({"text": "x" * (p.SEARCH_TEXT_MAX_LEN + 1)}, "at most 256 characters"),
    ({"text": "\ud800"}, "text must hold a word"),
    ({"limit": 0}, "limit must be from 1 to 200"),
    ({"limit": p.SEARCH_MAX_LIMIT + 1}, "limit must be from 1"),
    ({"limit": "5"}, "limit must be an integer"),
    ({"peer": "b c"}, "invalid user id"),
    ({"since": "yesterday"}, "invalid timestamp"),
    ({"since": 5}, "since must be a non-empty string"),
    ({"before": -1}, "before must be an integer"),
])
def test_a_bad_search_request_says_which_field(fields: dict[str, Any], message: str) -> None:
    obj = {"type": "search", "id": "s", "text": "lunch", **fields}
    with pytest.raises(RemoteProtocolError, match="invalid search frame") as info:
        p.parse_client_frame(_json(obj))
    assert message in info.value.message


def test_search_answer_round_trips() -> None:
    answer = f'{{"type":"search","id":"s1","messages":[{REPLY_MESSAGE}],"more":true}}'
    frame = p.parse_server_frame(answer)
    assert isinstance(frame, p.Search) and frame.more and frame.messages[0].reply_to == 42
    assert p.encode(frame) == answer
    empty = p.parse_server_frame('{"type":"search","id":"s2","messages":[]}')
    assert empty == p.Search("s2", ())
    assert p.encode(empty) == '{"type":"search","id":"s2","messages":[]}'


@pytest.mark.parametrize(("data", "message"), [
    ('{"type":"search","id":"s","messages":{}}', "messages must be a list of objects"),
    ('{"type":"search","id":"s","messages":[{"type":"message"}]}', "invalid search frame: in messages"),
    ('{"type":"search","id":"s","messages":[],"more":1}', "more must be a boolean"),
])
def test_a_bad_search_answer_is_the_servers_fault(data: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        p.parse_server_frame(data)


@pytest.mark.parametrize("build", [
    lambda: p.Search("s", [p.Message(1, "a", "b", "x", TS)]),  # type: ignore[arg-type]
    lambda: p.Search("s", (), more=None),  # type: ignore[arg-type]
])
def test_building_a_bad_search_answer_is_a_local_error(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()
