"""chatcli.protocol.v1, sans I/O: feed frames in, compare the exact text that comes out."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, get_args

import pytest

from chatcli.errors import LocalProtocolError, RemoteProtocolError, UnknownFrameType
from chatcli.protocol import (
    DEFAULT_MAX_TEXT_BYTES,
    HISTORY_MAX_LIMIT,
    MAX_INT,
    USER_ID_RULE,
    Ack,
    Error,
    ErrorCode,
    Feature,
    Frame,
    Hello,
    History,
    HistoryRequest,
    Message,
    Presence,
    Reason,
    Received,
    Search,
    SearchRequest,
    Send,
    Status,
    Watch,
    Who,
    WhoRequest,
    check_text,
    encode,
    parse_client_frame,
    parse_server_frame,
)
from tests.protocol.test_chat_frames import CHAT_CLIENT_FRAME_TYPES, CHAT_ENCODINGS
from tests.support.samples import EPOCH, NASTY_TEXTS, TS

#: Frames a client sends; everything else is parsed as a server frame. ``history`` and ``who`` are both.
CLIENT_FRAME_TYPES = (Send, Received, HistoryRequest, WhoRequest, Watch, *CHAT_CLIENT_FRAME_TYPES, SearchRequest)


def _parser_for(frame: Frame) -> Callable[[str | bytes], Frame]:
    return parse_client_frame if isinstance(frame, CLIENT_FRAME_TYPES) else parse_server_frame


HELLO = Hello(user="alice", session="s-1", server="chatcli/0.1.0", features=("store", "history"))
HELLO_EPOCH = Hello(user="alice", session="s-2", server="chatcli/0.1.0", features=("store", "resume"), epoch=EPOCH)
HELLO_RESET = Hello(user="alice", session="s-3", server="chatcli/0.1.0", features=("store", "resume"), epoch=EPOCH,
                    reset=True)
SEND = Send(id="c1", to="bob", text='say "hi" é 😀\n')
ACK_DELIVERED = Ack(id="c1", status=Status.DELIVERED, msg_id=7, ts=TS)
ACK_STORED = Ack(id="c2", status=Status.STORED, msg_id=8, ts=TS)
ACK_DUPLICATE = Ack(id="c2", status=Status.STORED, msg_id=8, ts=TS, duplicate=True)
MESSAGE = Message(id=7, sender="alice", to="bob", text="it's \\ fine", ts=TS)
REPLY = Message(id=9, sender="bob", to="alice", text='"ok" 😀', ts=TS)
ERROR = Error(code=ErrorCode.UNKNOWN_TYPE, message="unknown frame type 'typing'",
              details={"frame_type": "typing"})

EXACT_ENCODINGS: list[tuple[Frame, str]] = [
    (HELLO, '{"type":"hello","protocol":1,"server":"chatcli/0.1.0","user":"alice","session":"s-1",'
            '"max_text_bytes":65536,"features":["store","history"]}'),
    (Hello(user="bob", session="s", server="x", protocol=2, max_text_bytes=10),
     '{"type":"hello","protocol":2,"server":"x","user":"bob","session":"s","max_text_bytes":10,"features":[]}'),
    (HELLO_EPOCH, '{"type":"hello","protocol":1,"server":"chatcli/0.1.0","user":"alice","session":"s-2",'
                  f'"max_text_bytes":65536,"features":["store","resume"],"epoch":"{EPOCH}"}}'),
    (HELLO_RESET, '{"type":"hello","protocol":1,"server":"chatcli/0.1.0","user":"alice","session":"s-3",'
                  f'"max_text_bytes":65536,"features":["store","resume"],"epoch":"{EPOCH}","reset":true}}'),
    (SEND, '{"type":"send","id":"c1","to":"bob","text":"say \\"hi\\" é 😀\\n"}'),
    (Send(id="c3", to="bob", text=""), '{"type":"send","id":"c3","to":"bob","text":""}'),
    (ACK_DELIVERED, f'{{"type":"ack","id":"c1","status":"delivered","msg_id":7,"ts":"{TS}"}}'),
    (ACK_STORED, f'{{"type":"ack","id":"c2","status":"stored","msg_id":8,"ts":"{TS}"}}'),
    (ACK_DUPLICATE, f'{{"type":"ack","id":"c2","status":"stored","msg_id":8,"ts":"{TS}","duplicate":true}}'),
    (Ack(id="c4", status=Status.DELIVERED, msg_id=0),
     '{"type":"ack","id":"c4","status":"delivered","msg_id":0}'),
    (Ack(id="c5", status=Status.DELIVERED, msg_id=MAX_INT),
     f'{{"type":"ack","id":"c5","status":"delivered","msg_id":{MAX_INT}}}'),
    (MESSAGE, f'{{"type":"message","id":7,"from":"alice","to":"bob","text":"it\'s \\\\ fine","ts":"{TS}"}}'),
    (ERROR, '{"type":"error","code":"unknown-type","message":"unknown frame type \'typing\'",'
            '"frame_type":"typing"}'),
    (Error(code=ErrorCode.BAD_JSON, message="not JSON"),
     '{"type":"error","code":"bad-json","message":"not JSON"}'),
    (Error(code=ErrorCode.UNAVAILABLE, message="no history here"),
     '{"type":"error","code":"unavailable","message":"no history here"}'),
    (Received(id=42), '{"type":"received","id":42}'),
    (Received(id=0), '{"type":"received","id":0}'),
    (Received(id=MAX_INT), f'{{"type":"received","id":{MAX_INT}}}'),
    (HistoryRequest(id="h1", peer="bob"), '{"type":"history","id":"h1","peer":"bob","limit":50}'),
    (HistoryRequest(id="h2", peer="bob", limit=20, before=40),
     '{"type":"history","id":"h2","peer":"bob","limit":20,"before":40}'),
    (HistoryRequest(id="h3", peer="bob", limit=0, before=0),
     '{"type":"history","id":"h3","peer":"bob","limit":0,"before":0}'),
    (HistoryRequest(id="h4", peer="bob", limit=HISTORY_MAX_LIMIT),
     '{"type":"history","id":"h4","peer":"bob","limit":1000}'),
    (History(id="h1", peer="bob", messages=()), '{"type":"history","id":"h1","peer":"bob","messages":[]}'),
    (History(id="h2", peer="bob", messages=(MESSAGE, REPLY)),
     f'{{"type":"history","id":"h2","peer":"bob","messages":['
     f'{{"type":"message","id":7,"from":"alice","to":"bob","text":"it\'s \\\\ fine","ts":"{TS}"}},'
     f'{{"type":"message","id":9,"from":"bob","to":"alice","text":"\\"ok\\" 😀","ts":"{TS}"}}]}}'),
    (History(id="h3", peer="bob", messages=(MESSAGE,), more=True),
     f'{{"type":"history","id":"h3","peer":"bob","messages":['
     f'{{"type":"message","id":7,"from":"alice","to":"bob","text":"it\'s \\\\ fine","ts":"{TS}"}}],"more":true}}'),
    (WhoRequest(id="w1"), '{"type":"who","id":"w1"}'),
    (Who(id="w1", users=("alice", "bob")), '{"type":"who","id":"w1","users":["alice","bob"]}'),
    (Who(id="w2", users=()), '{"type":"who","id":"w2","users":[]}'),
    (Watch(users=("bob", "carol")), '{"type":"watch","users":["bob","carol"]}'),
    (Watch(users=()), '{"type":"watch","users":[]}'),
    (Presence(user="bob", online=True), '{"type":"presence","user":"bob","online":true}'),
    (Presence(user="carol", online=False), '{"type":"presence","user":"carol","online":false}'),
    (Presence(user="dave", online=False, hidden=True),
     '{"type":"presence","user":"dave","online":false,"hidden":true}'),
    *CHAT_ENCODINGS,
    # issue 13: more in tests/protocol/test_scripting_frames.py
    (SearchRequest(id="s1", text="lunch"), '{"type":"search","id":"s1","text":"lunch","limit":20}'),
    (Search(id="s1", messages=(MESSAGE,)),
     f'{{"type":"search","id":"s1","messages":['
     f'{{"type":"message","id":7,"from":"alice","to":"bob","text":"it\'s \\\\ fine","ts":"{TS}"}}]}}'),
]

def test_every_frame_type_has_an_exact_encoding() -> None:
    assert {type(frame) for frame, _ in EXACT_ENCODINGS} == set(get_args(Frame))


@pytest.mark.parametrize(("frame", "text"), EXACT_ENCODINGS)
def test_exact_encoding(frame: Frame, text: str) -> None:
    assert encode(frame) == text


@pytest.mark.parametrize(("frame", "text"), EXACT_ENCODINGS)
def test_native_round_trip(frame: Frame, text: str) -> None:
    parse = _parser_for(frame)
    assert parse(text) == frame
    assert parse(text.encode("utf-8")) == frame


@pytest.mark.parametrize("reason", list(Reason))
def test_refused_ack_for_each_reason(reason: str) -> None:
    ack = Ack(id="c9", status=Status.REFUSED, reason=reason)
    text = encode(ack)
    assert text == f'{{"type":"ack","id":"c9","status":"refused","reason":"{reason}"}}'
    assert parse_server_frame(text) == ack
    assert not ack.accepted


def test_codes_are_their_wire_strings() -> None:
    """A member goes into JSON as its bare value and equals what a parser reads off the wire."""
    built = Ack(id="c9", status=Status.REFUSED, reason=Reason.RATE_LIMITED)
    wire = Ack(id="c9", status="refused", reason="rate-limited")
    assert built == wire
    assert encode(built) == encode(wire) == '{"type":"ack","id":"c9","status":"refused","reason":"rate-limited"}'
    assert encode(Error(ErrorCode.UNAVAILABLE, "m")) == '{"type":"error","code":"unavailable","message":"m"}'
    assert f"{Reason.TOO_LARGE}" == "too-large"
    assert check_text("") is Reason.EMPTY


def test_accepted_acks() -> None:
    assert ACK_DELIVERED.accepted
    assert ACK_STORED.accepted
    assert ACK_DUPLICATE.accepted


def test_duplicate_is_false_unless_the_server_says_true() -> None:
    base = '{"type":"ack","id":"c1","status":"stored","msg_id":8}'
    assert parse_server_frame(base) == Ack(id="c1", status=Status.STORED, msg_id=8)
    explicit_false = parse_server_frame(base[:-1] + ',"duplicate":false}')
    assert isinstance(explicit_false, Ack)
    assert explicit_false.duplicate is False
    assert encode(explicit_false) == base  # false is the default, never written
    duplicate = parse_server_frame(base[:-1] + ',"duplicate":true}')
    assert isinstance(duplicate, Ack)
    assert (duplicate.duplicate, duplicate.msg_id) == (True, 8)


def test_hello_defaults_when_parsed() -> None:
    frame = parse_server_frame('{"type":"hello","protocol":1,"server":"s","user":"alice","session":"x"}')
    assert frame == Hello(user="alice", session="x", server="s")
    assert isinstance(frame, Hello)
    assert frame.max_text_bytes == DEFAULT_MAX_TEXT_BYTES
    assert frame.features == ()
    assert (frame.epoch, frame.reset) == (None, False)  # an older server: no store identity, nothing reset


def test_hello_reset_is_false_unless_the_server_says_true() -> None:
    base = encode(HELLO_EPOCH)
    explicit_false = parse_server_frame(base[:-1] + ',"reset":false}')
    assert explicit_false == HELLO_EPOCH
    assert encode(explicit_false) == base  # false is the default, never written
    reset = parse_server_frame(base[:-1] + ',"reset":true}')
    assert isinstance(reset, Hello) and (reset.epoch, reset.reset) == (EPOCH, True)


def test_hello_lists_every_feature() -> None:
    text = encode(Hello(user="alice", session="s", server="x", features=tuple(Feature)))
    frame = parse_server_frame(text)
    assert isinstance(frame, Hello)
    assert frame.features == ("store", "resume", "history", "presence", "tokens", "reads", "receipts", "typing",
                              "replies", "search")


def test_history_request_defaults_when_parsed() -> None:
    frame = parse_client_frame('{"type":"history","id":"h1","peer":"bob"}')
    assert frame == HistoryRequest(id="h1", peer="bob", limit=50, before=None)
    assert encode(frame) == '{"type":"history","id":"h1","peer":"bob","limit":50}'


@pytest.mark.parametrize(
    ("text", "client_frame"),
    [
        ('{"type":"history","id":"h1","peer":"bob","limit":5}', HistoryRequest(id="h1", peer="bob", limit=5)),
        ('{"type":"who","id":"w1"}', WhoRequest(id="w1")),
    ],
)
def test_shared_type_names_are_told_apart_by_direction(text: str, client_frame: Frame) -> None:
    assert parse_client_frame(text) == client_frame
    with pytest.raises(RemoteProtocolError) as info:  # the same text is not a valid answer
        parse_server_frame(text)
    assert info.value.code == "bad-frame"


def test_history_answer_keeps_nasty_texts_in_order() -> None:
    messages = tuple(Message(id=i + 1, sender="alice" if i % 2 else "bob", to="bob" if i % 2 else "alice",
                             text=text, ts=TS) for i, text in enumerate(NASTY_TEXTS))
    frame = History(id="h", peer="bob", messages=messages)
    parsed = parse_server_frame(encode(frame))
    assert parsed == frame
    assert isinstance(parsed, History)
    assert [m.text for m in parsed.messages] == NASTY_TEXTS


@pytest.mark.parametrize(("frame", "text"), EXACT_ENCODINGS)
def test_unknown_fields_are_ignored(frame: Frame, text: str) -> None:
    obj = json.loads(text)
    extra = {"priority": "high", "nested": {"a": [1, 2]}, "v2_flag": True}
    parsed = _parser_for(frame)(json.dumps({**obj, **extra}))
    if isinstance(frame, Error):  # an error's extra fields are its details, kept for the reader
        assert parsed == Error(frame.code, frame.message, {**frame.details, **extra})
    else:
        assert parsed == frame


def test_history_more_is_false_unless_the_server_says_true() -> None:
    base = encode(History(id="h", peer="bob", messages=()))
    assert parse_server_frame(base) == History(id="h", peer="bob", messages=(), more=False)
    assert parse_server_frame(base[:-1] + ',"more":false}') == History(id="h", peer="bob", messages=())
    cut = parse_server_frame(base[:-1] + ',"more":true}')
    assert isinstance(cut, History) and cut.more is True


def test_a_history_answer_says_where_the_next_page_back_starts() -> None:
    page = (MESSAGE, REPLY)  # ids 7 and 9
    assert History(id="h", peer="bob", messages=page).older_than(2) == 7  # full: older ones may exist
    assert History(id="h", peer="bob", messages=page, more=True).older_than(5) == 7  # cut short by the server
    assert History(id="h", peer="bob", messages=page).older_than(5) is None  # fewer than asked: the start
    assert History(id="h", peer="bob", messages=(), more=True).older_than(5) is None  # nothing to page from


def test_unknown_fields_inside_history_messages_are_ignored() -> None:
    obj = json.loads(encode(History(id="h", peer="bob", messages=(MESSAGE,))))
    obj["messages"][0]["edited"] = True
    assert parse_server_frame(json.dumps(obj)) == History(id="h", peer="bob", messages=(MESSAGE,))


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_client_frame, '{"type":"reaction","to":"bob"}'),
        (parse_client_frame, '{"type":"hello","protocol":1}'),  # a server frame is not a client frame
        (parse_client_frame, '{"type":"presence","user":"bob","online":true}'),
        (parse_client_frame, '{"type":"ack","id":"c1","status":"delivered","msg_id":1}'),
        (parse_server_frame, '{"type":"typing-indicator","user":"bob"}'),
        (parse_server_frame, '{"type":"send","id":"c1","to":"bob","text":"hi"}'),
        (parse_server_frame, '{"type":"received","id":1}'),
        (parse_server_frame, '{"type":"watch","users":["bob"]}'),
        (parse_server_frame, '{"type":""}'),
    ],
)
def test_unknown_type(parse: Any, text: str) -> None:
    with pytest.raises(UnknownFrameType) as info:
        parse(text)
    assert info.value.code == "unknown-type"
    assert isinstance(info.value, RemoteProtocolError)
    assert str(info.value) == f"unknown frame type {json.loads(text)['type']!r}"


def test_unknown_type_name_is_truncated_in_the_message() -> None:
    with pytest.raises(UnknownFrameType) as info:
        parse_client_frame(json.dumps({"type": "t" * 1000}))
    assert str(info.value) == f"unknown frame type {'t' * 40!r}"


@pytest.mark.parametrize("data", ["", "{", "not json", "{'type':'send'}", b"\xff\xfe", "[" * 100_000,
                                  '{"type":"send"', "1" * 5000, '{"type":"received","id":' + "9" * 5000 + "}"])
@pytest.mark.parametrize("parse", [parse_client_frame, parse_server_frame])
def test_bad_json(parse: Any, data: str | bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse(data)
    assert info.value.code == "bad-json"
    assert str(info.value).startswith("not JSON: ")


@pytest.mark.parametrize("data", ["[]", '["send"]', '"send"', "1", "null", "true"])
@pytest.mark.parametrize("parse", [parse_client_frame, parse_server_frame])
def test_non_object(parse: Any, data: str) -> None:
    with pytest.raises(RemoteProtocolError, match="must be a JSON object") as info:
        parse(data)
    assert info.value.code == "bad-frame"


@pytest.mark.parametrize("data", ["{}", '{"type":null}', '{"type":1}', '{"type":["send"]}',
                                  '{"Type":"send"}'])
@pytest.mark.parametrize("parse", [parse_client_frame, parse_server_frame])
def test_missing_type(parse: Any, data: str) -> None:
    with pytest.raises(RemoteProtocolError, match="needs a string 'type'") as info:
        parse(data)
    assert info.value.code == "bad-frame"


def _with(base: dict[str, Any], **changes: Any) -> str:
    obj = {**base, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not _DROP})


_DROP = object()
_TOO_BIG = MAX_INT + 1  # past SQLite's INTEGER range: refused before it can reach the store
_SEND = {"type": "send", "id": "c1", "to": "bob", "text": "hi"}
_RECEIVED = {"type": "received", "id": 1}
_HISTORY_REQUEST = {"type": "history", "id": "h1", "peer": "bob", "limit": 5, "before": 9}
_WHO_REQUEST = {"type": "who", "id": "w1"}
_WATCH = {"type": "watch", "users": ["bob"]}
_HELLO = {"type": "hello", "protocol": 1, "server": "s", "user": "alice", "session": "x"}
_ACK = {"type": "ack", "id": "c1", "status": "delivered", "msg_id": 1}
_MESSAGE = {"type": "message", "id": 1, "from": "alice", "to": "bob", "text": "hi", "ts": TS}
_ERROR = {"type": "error", "code": "bad-frame", "message": "m"}
_HISTORY = {"type": "history", "id": "h1", "peer": "bob", "messages": [_MESSAGE]}
_WHO = {"type": "who", "id": "w1", "users": ["alice"]}
_PRESENCE = {"type": "presence", "user": "bob", "online": True}

INVALID_CLIENT_FRAMES = [
    _with(_SEND, id=_DROP),
    _with(_SEND, id=""),
    _with(_SEND, id=5),
    _with(_SEND, id="x" * 129),
    _with(_SEND, id="c\n1"),
    _with(_SEND, to=_DROP),
    _with(_SEND, to="b ob"),
    _with(_SEND, to=""),
    _with(_SEND, to="x" * 65),
    _with(_SEND, text=_DROP),
    _with(_SEND, text=None),
    _with(_SEND, text=5),
    _with(_SEND, text=["hi"]),
    '{"type":"send","id":"c1","to":"bob","text":"bad \\ud800 surrogate"}',
    '{"type":"send","id":"c1","to":"bob","text":"\\udfff"}',
    _with(_RECEIVED, id=_DROP),
    _with(_RECEIVED, id=None),
    _with(_RECEIVED, id=-1),
    _with(_RECEIVED, id="42"),
    _with(_RECEIVED, id=4.2),
    _with(_RECEIVED, id=True),
    _with(_RECEIVED, id=_TOO_BIG),
    _with(_HISTORY_REQUEST, id=_DROP),
    _with(_HISTORY_REQUEST, id=""),
    _with(_HISTORY_REQUEST, id=7),
    _with(_HISTORY_REQUEST, peer=_DROP),
    _with(_HISTORY_REQUEST, peer="no such id"),
    _with(_HISTORY_REQUEST, limit=None),
    _with(_HISTORY_REQUEST, limit=-1),
    _with(_HISTORY_REQUEST, limit="5"),
    _with(_HISTORY_REQUEST, limit=HISTORY_MAX_LIMIT + 1),
    _with(_HISTORY_REQUEST, limit=_TOO_BIG),
    _with(_HISTORY_REQUEST, before=-1),
    _with(_HISTORY_REQUEST, before="9"),
    _with(_HISTORY_REQUEST, before=False),
    _with(_HISTORY_REQUEST, before=_TOO_BIG),
    _with(_WHO_REQUEST, id=_DROP),
    _with(_WHO_REQUEST, id=""),
    _with(_WHO_REQUEST, id=["w1"]),
    _with(_WATCH, users=_DROP),
    _with(_WATCH, users=None),
    _with(_WATCH, users="bob"),
    _with(_WATCH, users={"bob": True}),
    _with(_WATCH, users=[1]),
    _with(_WATCH, users=["bob", "not an id"]),
    _with(_WATCH, users=[""]),
]

INVALID_SERVER_FRAMES = [
    _with(_HELLO, user=_DROP),
    _with(_HELLO, user="no such id"),
    _with(_HELLO, session=""),
    _with(_HELLO, server=None),
    _with(_HELLO, protocol=_DROP),
    _with(_HELLO, protocol=True),
    _with(_HELLO, protocol="1"),
    _with(_HELLO, protocol=-1),
    _with(_HELLO, max_text_bytes=1.5),
    _with(_HELLO, max_text_bytes=_TOO_BIG),
    _with(_HELLO, features="store"),
    _with(_HELLO, features=[1]),
    _with(_HELLO, epoch=""),
    _with(_HELLO, epoch=7),
    _with(_HELLO, epoch="has space"),
    _with(_HELLO, epoch="x" * 65),
    _with(_HELLO, reset="true"),
    _with(_HELLO, reset=1),
    _with(_HELLO, reset=None),
    _with(_ACK, id=_DROP),
    _with(_ACK, status="lost"),
    _with(_ACK, status=_DROP),
    _with(_ACK, msg_id=_DROP),
    _with(_ACK, msg_id="1"),
    _with(_ACK, msg_id=-1),
    _with(_ACK, msg_id=_TOO_BIG),
    _with(_ACK, reason=5),
    _with(_ACK, ts=""),
    _with(_ACK, ts=0),
    _with(_ACK, status="refused", msg_id=_DROP),
    _with(_ACK, status="refused", reason=""),
    _with(_ACK, duplicate="true"),
    _with(_ACK, duplicate=1),
    _with(_ACK, duplicate=None),
    _with(_MESSAGE, id=_DROP),
    _with(_MESSAGE, id=False),
    _with(_MESSAGE, id=_TOO_BIG),
    _with(_MESSAGE, **{"from": _DROP}),
    _with(_MESSAGE, **{"from": "bad id"}),
    _with(_MESSAGE, to="/bob"),
    _with(_MESSAGE, text=""),
    _with(_MESSAGE, ts=_DROP),
    '{"type":"message","id":1,"from":"alice","to":"bob","text":"\\ud83d","ts":"' + TS + '"}',
    _with(_ERROR, code=_DROP),
    _with(_ERROR, message=3),
    _with(_HISTORY, id=_DROP),
    _with(_HISTORY, id=""),
    _with(_HISTORY, peer=_DROP),
    _with(_HISTORY, peer="b/ob"),
    _with(_HISTORY, messages=_DROP),
    _with(_HISTORY, messages=None),
    _with(_HISTORY, messages={"0": _MESSAGE}),
    _with(_HISTORY, messages=[_MESSAGE, "hi"]),
    _with(_HISTORY, messages=[[_MESSAGE]]),
    _with(_HISTORY, messages=[{**_MESSAGE, "id": -1}]),
    _with(_HISTORY, messages=[_MESSAGE, {**_MESSAGE, "text": None}]),
    _with(_HISTORY, messages=[{"type": "message"}]),
    _with(_HISTORY, more="true"),
    _with(_HISTORY, more=None),
    _with(_WHO, id=_DROP),
    _with(_WHO, users=_DROP),
    _with(_WHO, users="alice"),
    _with(_WHO, users=["alice", 2]),
    _with(_WHO, users=["bad id"]),
    _with(_PRESENCE, user=_DROP),
    _with(_PRESENCE, user="bad id"),
    _with(_PRESENCE, online=_DROP),
    _with(_PRESENCE, online="true"),
    _with(_PRESENCE, online=1),
    _with(_PRESENCE, online=None),
]


@pytest.mark.parametrize("data", INVALID_CLIENT_FRAMES)
def test_invalid_client_frame_is_the_peers_fault(data: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_client_frame(data)
    assert info.value.code == "bad-frame"
    assert not isinstance(info.value, LocalProtocolError)
    assert str(info.value).startswith(f"invalid {json.loads(data)['type']} frame: ")


@pytest.mark.parametrize("data", INVALID_SERVER_FRAMES)
def test_invalid_server_frame_is_the_peers_fault(data: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_server_frame(data)
    assert info.value.code == "bad-frame"
    assert not isinstance(info.value, LocalProtocolError)
    assert str(info.value).startswith(f"invalid {json.loads(data)['type']} frame: ")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(_RECEIVED, id=_TOO_BIG), f"invalid received frame: id must be an integer from 0 to {MAX_INT}"),
        (_with(_HISTORY_REQUEST, limit=HISTORY_MAX_LIMIT + 1),
         f"invalid history frame: limit must be at most {HISTORY_MAX_LIMIT}"),
        (_with(_WATCH, users=["bob", "not an id"]), "invalid watch frame: users must be a tuple of user ids"),
    ],
)
def test_invalid_client_frame_says_which_field(data: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_client_frame(data)
    assert str(info.value) == message


def test_a_bad_message_inside_history_names_the_history_frame() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_server_frame(_with(_HISTORY, messages=[_MESSAGE, {**_MESSAGE, "from": "bad id"}]))
    assert str(info.value) == ("invalid history frame: in messages: invalid message frame: "
                               f"invalid user id 'bad id': use {USER_ID_RULE}")


def test_empty_send_text_parses_so_the_server_can_refuse_it_with_a_reason() -> None:
    frame = parse_client_frame(_with(_SEND, text=""))
    assert frame == Send(id="c1", to="bob", text="")
    assert check_text(frame.text) == Reason.EMPTY


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello(user="bad id", session="s", server="x"),
        lambda: Hello(user="alice", session="", server="x"),
        lambda: Hello(user="alice", session="s", server="x", features=["store"]),  # type: ignore[arg-type]
        lambda: Hello(user="alice", session="s", server="x", max_text_bytes=-1),
        lambda: Hello(user="alice", session="s", server="x", epoch="a b"),
        lambda: Hello(user="alice", session="s", server="x", reset=1),  # type: ignore[arg-type]
        lambda: Send(id="c1", to="bob", text="\ud800"),
        lambda: Send(id="", to="bob", text="hi"),
        lambda: Send(id="c1", to="", text="hi"),
        lambda: Send(id="c1", to="bob", text=None),  # type: ignore[arg-type]
        lambda: Ack(id="c1", status="delivered"),
        lambda: Ack(id="c1", status="refused"),
        lambda: Ack(id="c1", status="ok", msg_id=1),
        lambda: Ack(id="c1", status="delivered", msg_id=1, reason=5),  # type: ignore[arg-type]
        lambda: Ack(id="c1", status="stored", msg_id=1, duplicate=1),  # type: ignore[arg-type]
        lambda: Ack(id="c1", status="stored", msg_id=MAX_INT + 1),
        lambda: Message(id=1, sender="alice", to="bob", text="", ts=TS),
        lambda: Message(id=1, sender="alice", to="bob", text="\udc00", ts=TS),
        lambda: Message(id=-1, sender="alice", to="bob", text="hi", ts=TS),
        lambda: Error(code="", message="m"),
        lambda: Error(code="bad-frame", message="m", details={"type": "hello"}),
        lambda: Error(code="bad-frame", message="m", details={"code": "other"}),
        lambda: Received(id=-1),
        lambda: Received(id=MAX_INT + 1),
        lambda: Received(id="1"),  # type: ignore[arg-type]
        lambda: HistoryRequest(id="h", peer="bob", limit=HISTORY_MAX_LIMIT + 1),
        lambda: HistoryRequest(id="h", peer="bob", before=-1),
        lambda: HistoryRequest(id="", peer="bob"),
        lambda: HistoryRequest(id="h", peer="b b"),
        lambda: History(id="h", peer="bob", messages=[MESSAGE]),  # type: ignore[arg-type]
        lambda: History(id="h", peer="bob", messages=(MESSAGE, ACK_STORED)),  # type: ignore[arg-type]
        lambda: History(id="h", peer="", messages=()),
        lambda: WhoRequest(id=""),
        lambda: Who(id="w", users=["alice"]),  # type: ignore[arg-type]
        lambda: Who(id="w", users=("alice", "b b")),
        lambda: Who(id="", users=()),
        lambda: Watch(users=["bob"]),  # type: ignore[arg-type]
        lambda: Watch(users=("bob", "")),
        lambda: Presence(user="bob", online=1),  # type: ignore[arg-type]
        lambda: Presence(user="bob", online=False, hidden="yes"),  # type: ignore[arg-type]
        lambda: Presence(user="b b", online=True),
    ],
)
def test_building_an_invalid_frame_is_a_local_error(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_error_details_from_the_wire_never_replace_its_own_fields() -> None:
    frame = parse_server_frame('{"type":"error","code":"bad-frame","message":"m","limit":8}')
    assert frame == Error("bad-frame", "m", {"limit": 8})
    assert encode(frame) == '{"type":"error","code":"bad-frame","message":"m","limit":8}'


def test_frames_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SEND.text = "changed"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ACK_DUPLICATE.duplicate = False  # type: ignore[misc]
