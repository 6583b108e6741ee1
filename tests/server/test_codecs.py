"""The codecs in-process: the exact text of every frame kind in both protocols, and encoding once per message."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chatcli import protocol as p
from chatcli.errors import ChatcliError
from chatcli.server.codecs import CODECS, LEGACY, NATIVE, Codec, LegacyCodec, NativeCodec, Outcome, codec_for
from chatcli.server.engine.base import StoredMessage

#: 2026-11-27T04:00:00.250Z
TS = 1_795_752_000.25
TS_TEXT = "2026-11-27T04:00:00.250Z"
MESSAGE = StoredMessage(7, "alice", "bob", "it's \"ok\"", TS, "c1")
HELLO = p.Hello(user="bob", session="ab12-1", server="chatcli/9", max_text_bytes=100,
                features=(p.Feature.STORE, p.Feature.RESUME), epoch="e-1")


def test_the_timestamp_used_here_is_what_it_says() -> None:
    assert p.format_ts(TS) == TS_TEXT


def test_the_codec_follows_the_negotiated_subprotocol() -> None:
    assert codec_for(p.SUBPROTOCOL) is NATIVE
    assert codec_for(None) is LEGACY  # no subprotocol offered: a seed Flutter app
    assert {codec.name for codec in CODECS} == {"chatcli.v1", "legacy"}


NATIVE_FRAMES = [
    (lambda c: c.greeting(HELLO),
     '{"type":"hello","protocol":1,"server":"chatcli/9","user":"bob","session":"ab12-1","max_text_bytes":100,'
     '"features":["store","resume"],"epoch":"e-1"}'),
    (lambda c: c.ack("c1", MESSAGE, Outcome.DELIVERED),
     f'{{"type":"ack","id":"c1","status":"delivered","msg_id":7,"ts":"{TS_TEXT}"}}'),
    (lambda c: c.ack("c1", MESSAGE, Outcome.STORED),
     f'{{"type":"ack","id":"c1","status":"stored","msg_id":7,"ts":"{TS_TEXT}"}}'),
    (lambda c: c.ack("c1", MESSAGE, Outcome.DUPLICATE),
     f'{{"type":"ack","id":"c1","status":"stored","msg_id":7,"ts":"{TS_TEXT}","duplicate":true}}'),
    (lambda c: c.refusal("c1", p.Reason.OFFLINE), '{"type":"ack","id":"c1","status":"refused","reason":"offline"}'),
    (lambda c: c.refusal("c2", p.Reason.RATE_LIMITED),
     '{"type":"ack","id":"c2","status":"refused","reason":"rate-limited"}'),
    (lambda c: c.error(p.ErrorCode.BINARY_UNSUPPORTED, "no binary"),
     '{"type":"error","code":"binary-unsupported","message":"no binary"}'),
    (lambda c: c.error(p.ErrorCode.RATE_LIMITED, "slow down", {"id": "h1"}),
     '{"type":"error","code":"rate-limited","message":"slow down","id":"h1"}'),
    (lambda c: c.message(MESSAGE),
     f'{{"type":"message","id":7,"from":"alice","to":"bob","text":"it\'s \\"ok\\"","ts":"{TS_TEXT}"}}'),
]

LEGACY_FRAMES = [
    (lambda c: c.greeting(HELLO), "connected"),
    (lambda c: c.ack("c1", MESSAGE, Outcome.DELIVERED), "send:success"),
    (lambda c: c.ack(None, MESSAGE, Outcome.STORED), "send:success"),
    (lambda c: c.ack(None, MESSAGE, Outcome.DUPLICATE), "send:success"),
    (lambda c: c.refusal(None, p.Reason.OFFLINE), "send:error"),
    (lambda c: c.error(p.ErrorCode.BINARY_UNSUPPORTED, "no binary"), "send:error"),
    # The app replaces ' with " and decodes JSON: the apostrophe travels as \u0027.
    (lambda c: c.message(MESSAGE), "{'cmd':'send','userid':'alice', 'msgtext':'it\\u0027s \\\"ok\\\"'}"),
]


@pytest.mark.parametrize(("encode", "frame"), NATIVE_FRAMES)
def test_native_frames_byte_for_byte(encode: object, frame: str) -> None:
    assert encode(NativeCodec()) == frame  # type: ignore[operator]


@pytest.mark.parametrize(("encode", "frame"), LEGACY_FRAMES)
def test_legacy_frames_byte_for_byte(encode: object, frame: str) -> None:
    assert encode(LegacyCodec()) == frame  # type: ignore[operator]


def test_only_the_seed_protocol_counts_written_messages_as_received() -> None:
    assert LEGACY.confirms_on_write and not NATIVE.confirms_on_write  # chatcli.v1 has "received" frames


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every real encoding of a message, as (codec name, message id)."""
    calls: list[tuple[str, int]] = []
    for cls in (NativeCodec, LegacyCodec):
        original = cls.encode_message

        def counting(self: Codec, message: StoredMessage, original: object = original) -> str:
            calls.append((self.name, message.id))
            return original(self, message)  # type: ignore[operator,no-any-return]

        monkeypatch.setattr(cls, "encode_message", counting)
    yield calls


@pytest.mark.parametrize("codec_class", [NativeCodec, LegacyCodec])
def test_a_message_sent_to_many_sessions_is_encoded_once(codec_class: type[Codec],
                                                          encodings: list[tuple[str, int]]) -> None:
    codec = codec_class()
    frames = {codec.message(MESSAGE) for _ in range(5)}
    assert len(frames) == 1 and encodings == [(codec.name, 7)]
    later = MESSAGE._replace(id=8, text="later")
    assert codec.message(later) != codec.message(MESSAGE)  # a new message is encoded afresh
    assert encodings == [(codec.name, 7), (codec.name, 8), (codec.name, 7)]


def test_a_message_that_cannot_be_encoded_is_not_cached() -> None:
    codec = NativeCodec()
    broken = MESSAGE._replace(sender="not a valid id")  # e.g. a row stored by an older, exploitable server
    for _ in range(2):
        with pytest.raises(ChatcliError):
            codec.message(broken)
    assert codec.message(MESSAGE) == codec.encode_message(MESSAGE)
