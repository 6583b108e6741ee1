"""The server's fast paths (read_client_frame, encode_ack, encode_message) agree with the dataclasses:
same frames, same bytes, same refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatcli import protocol as p
from chatcli.errors import ChatcliError
from tests.support.samples import NASTY_TEXTS

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.text(max_size=8),
                    st.sampled_from(["alice", "bob@x", "-bad", "a" * 65, "ok\x00", "\ud800", "x" * 129]),
                    st.sampled_from(NASTY_TEXTS))


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except ChatcliError as exc:
        return type(exc).__name__, str(exc)


@given(client_id=_VALUES, to=_VALUES, text=_VALUES, extra=st.booleans())
def test_read_client_frame_agrees_with_parse_client_frame(client_id: Any, to: Any, text: Any, extra: bool) -> None:
    obj: dict[str, Any] = {"type": "send", "id": client_id, "to": to, "text": text}
    if extra:
        obj["later"] = 1
    data = json.dumps(obj)
    fast = _outcome(lambda: p.read_client_frame(data))
    slow = _outcome(lambda: p.parse_client_frame(data))
    if fast[0] == "ok" and isinstance(fast[1], tuple):
        assert slow == ("ok", p.Send(*fast[1]))
    else:
        assert fast == slow


@pytest.mark.parametrize("data", ['{"type":"received","id":3}', "[]", "nope", '{"type":"x"}', '{"type":"send"}'])
def test_read_client_frame_other_frames(data: str) -> None:
    assert _outcome(lambda: p.read_client_frame(data)) == _outcome(lambda: p.parse_client_frame(data))


@given(client_id=_VALUES, status=st.sampled_from(["delivered", "stored", "refused", "x", p.Status.STORED]),
       msg_id=_VALUES, ts=_VALUES, duplicate=st.one_of(st.booleans(), st.none()))
def test_encode_ack_agrees_with_ack(client_id: Any, status: Any, msg_id: Any, ts: Any, duplicate: Any) -> None:
    fast = _outcome(lambda: p.encode_ack(client_id, status, msg_id, ts, duplicate))
    slow = _outcome(lambda: p.encode(p.Ack(client_id, status, msg_id=msg_id, ts=ts, duplicate=duplicate)))
    assert fast == slow


@given(msg_id=_VALUES, sender=_VALUES, to=_VALUES, text=_VALUES, ts=_VALUES)
def test_encode_message_agrees_with_message(msg_id: Any, sender: Any, to: Any, text: Any, ts: Any) -> None:
    fast = _outcome(lambda: p.encode_message(msg_id, sender, to, text, ts))
    slow = _outcome(lambda: p.encode(p.Message(msg_id, sender, to, text, ts)))
    assert fast == slow


@pytest.mark.parametrize("text", NASTY_TEXTS)
def test_encode_message_nasty_texts(text: str) -> None:
    assert p.encode_message(7, "alice", "bob", text, "2026-11-27T05:00:00.000Z") == p.encode(
        p.Message(7, "alice", "bob", text, "2026-11-27T05:00:00.000Z"))


@pytest.mark.parametrize("duplicate", [False, True])
@pytest.mark.parametrize("client_id", ["c-1", 'with "quotes" and \\ and é'])
def test_encode_ack_fast_path_is_byte_for_byte(client_id: str, duplicate: bool) -> None:
    """Valid acks always take the template (random values above may rarely be all valid)."""
    ts = "2026-11-25T19:34:47.123Z"
    assert p.encode_ack(client_id, "stored", 42, ts, duplicate) == p.encode(
        p.Ack(client_id, "stored", msg_id=42, ts=ts, duplicate=duplicate))
