"""The chat experience's frames (issue 12): read positions, receipts, typing and the inbox, byte for byte."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatcli.errors import LocalProtocolError, RemoteProtocolError
from chatcli.protocol import (
    INBOX_MAX_LIMIT,
    PREVIEW_MAX_CHARS,
    Conversation,
    Feature,
    Frame,
    Inbox,
    InboxRequest,
    MarkRead,
    PeerTyping,
    ReadPosition,
    Receipt,
    Typing,
    encode,
    parse_client_frame,
    parse_server_frame,
)
from tests.support.samples import TS

CONVERSATION = Conversation(peer="bob", unread=2, read=40, last_id=42, last_from="bob", last_ts=TS,
                            preview='see you "at" 5 😀', peer_read=41)
#: Appended to test_v1's EXACT_ENCODINGS, so the checks there (round trip, every frame type) cover these too.
CHAT_ENCODINGS: list[tuple[Frame, str]] = [
    (MarkRead(peer="bob", id=42), '{"type":"read","peer":"bob","id":42}'),
    (MarkRead(peer="bob", id=42, receipt=False), '{"type":"read","peer":"bob","id":42,"receipt":false}'),
    (ReadPosition(peer="bob", id=42), '{"type":"read","peer":"bob","id":42}'),
    (Receipt(sender="bob", id=43), '{"type":"receipt","from":"bob","id":43}'),
    (Typing(to="bob"), '{"type":"typing","to":"bob"}'),
    (PeerTyping(sender="alice"), '{"type":"typing","from":"alice"}'),
    (InboxRequest(id="i1"), '{"type":"inbox","id":"i1","limit":50}'),
    (InboxRequest(id="i2", limit=INBOX_MAX_LIMIT), '{"type":"inbox","id":"i2","limit":200}'),
    (Inbox(id="i1", conversations=()), '{"type":"inbox","id":"i1","conversations":[]}'),
    (Inbox(id="i2", conversations=(CONVERSATION,), more=True),
     '{"type":"inbox","id":"i2","conversations":[{"peer":"bob","unread":2,"read":40,"last_id":42,'
     f'"last_from":"bob","last_ts":"{TS}","preview":"see you \\"at\\" 5 😀","peer_read":41}}],"more":true}}'),
    (Inbox(id="i3", conversations=(Conversation("carol", 0, 39, 39, "alice", TS, ""),)),
     '{"type":"inbox","id":"i3","conversations":[{"peer":"carol","unread":0,"read":39,"last_id":39,'
     f'"last_from":"alice","last_ts":"{TS}","preview":""}}]}}'),
]
CHAT_CLIENT_FRAME_TYPES = (MarkRead, Typing, InboxRequest)


def test_the_features_that_announce_them() -> None:
    assert (Feature.READS, Feature.RECEIPTS, Feature.TYPING) == ("reads", "receipts", "typing")


@pytest.mark.parametrize(
    ("text", "client_frame", "server_frame"),
    [
        ('{"type":"read","peer":"bob","id":4}', MarkRead("bob", 4), ReadPosition("bob", 4)),
    ],
)
def test_read_is_a_request_one_way_and_a_position_the_other(text: str, client_frame: Frame,
                                                           server_frame: Frame) -> None:
    assert parse_client_frame(text) == client_frame
    assert parse_server_frame(text) == server_frame


def test_defaults_when_parsed() -> None:
    assert parse_client_frame('{"type":"inbox","id":"i"}') == InboxRequest("i", 50)
    assert parse_client_frame('{"type":"read","peer":"bob","id":1}') == MarkRead("bob", 1, receipt=True)
    assert parse_server_frame('{"type":"inbox","id":"i","conversations":[]}') == Inbox("i", (), more=False)


def test_unknown_fields_inside_conversations_are_ignored() -> None:
    entry = {**CONVERSATION.to_dict(), "pinned": True}
    frame = parse_server_frame(json.dumps({"type": "inbox", "id": "i", "conversations": [entry]}))
    assert frame == Inbox("i", (CONVERSATION,))


_READ = {"type": "read", "peer": "bob", "id": 1}
_TYPING_TO = {"type": "typing", "to": "bob"}
_INBOX_REQUEST = {"type": "inbox", "id": "i1", "limit": 5}
_RECEIPT = {"type": "receipt", "from": "bob", "id": 1}
_TYPING_FROM = {"type": "typing", "from": "bob"}
_ENTRY = CONVERSATION.to_dict()
_INBOX = {"type": "inbox", "id": "i1", "conversations": [_ENTRY]}


def _with(base: dict[str, Any], **changes: Any) -> str:
    return json.dumps({k: v for k, v in {**base, **changes}.items() if v is not None})


@pytest.mark.parametrize("data", [
    _with(_READ, peer="b b"), _with(_READ, id=-1), _with(_READ, id="1"), _with(_READ, receipt="no"),
    _with(_TYPING_TO, to="") , _with(_TYPING_TO, to=5),
    _with(_INBOX_REQUEST, id=""), _with(_INBOX_REQUEST, limit=INBOX_MAX_LIMIT + 1), _with(_INBOX_REQUEST, limit="5"),
])
def test_invalid_client_frames_are_the_peers_fault(data: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_client_frame(data)
    assert info.value.code == "bad-frame"
    assert str(info.value).startswith(f"invalid {json.loads(data)['type']} frame: ")


@pytest.mark.parametrize("data", [
    _with(_READ, peer="/bob"), _with(_READ, id=True),
    _with(_RECEIPT, **{"from": "b b"}), _with(_RECEIPT, id=-2),
    _with(_TYPING_FROM, **{"from": ""}),
    _with(_INBOX, id=""), _with(_INBOX, conversations="bob"), _with(_INBOX, conversations=["bob"]),
    _with(_INBOX, more="yes"),
    _with(_INBOX, conversations=[{**_ENTRY, "unread": -1}]),
    _with(_INBOX, conversations=[{**_ENTRY, "peer": "b b"}]),
    _with(_INBOX, conversations=[{**_ENTRY, "last_from": 3}]),
    _with(_INBOX, conversations=[{**_ENTRY, "last_ts": ""}]),
    _with(_INBOX, conversations=[{**_ENTRY, "preview": 5}]),
    _with(_INBOX, conversations=[{**_ENTRY, "peer_read": -1}]),
    _with(_INBOX, conversations=[{**_ENTRY, "peer_read": "41"}]),
    _with(_INBOX, conversations=[{**_ENTRY, "preview": "x" * (PREVIEW_MAX_CHARS + 1)}]),
    '{"type":"inbox","id":"i","conversations":[{"peer":"bob","unread":0,"read":0,"last_id":1,'
    f'"last_from":"bob","last_ts":"{TS}","preview":"\\ud800"}}]}}',
])
def test_invalid_server_frames_are_the_peers_fault(data: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_server_frame(data)
    assert info.value.code == "bad-frame"
    assert str(info.value).startswith(f"invalid {json.loads(data)['type']} frame: ")


def test_a_bad_conversation_names_the_inbox_frame() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_server_frame(_with(_INBOX, conversations=[{**_ENTRY, "read": "x"}]))
    assert str(info.value) == ("invalid inbox frame: in conversations: invalid conversation frame: "
                               "read must be an integer from 0 to 9223372036854775807")


@pytest.mark.parametrize("build", [
    lambda: MarkRead(peer="bob", id=1, receipt=1),  # type: ignore[arg-type]
    lambda: Inbox(id="i", conversations=[CONVERSATION]),  # type: ignore[arg-type]
    lambda: Inbox(id="i", conversations=(CONVERSATION,), more=None),  # type: ignore[arg-type]
    lambda: InboxRequest(id="i", limit=-1),
    lambda: Receipt(sender="bob", id=MAX_ID + 1),
])
def test_building_an_invalid_frame_is_a_local_error(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


MAX_ID = 2**63 - 1


def test_typing_and_receipts_encode_to_small_frames() -> None:
    assert len(encode(PeerTyping("a" * 64))) < 100 and len(encode(Receipt("a" * 64, MAX_ID))) < 120
