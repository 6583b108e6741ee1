"""The relay's routing in-process, with fake sessions of both protocols on the memory engine (``--ephemeral``).

Each session's frames come from its codec: these tests check who gets what, in which protocol,
and that a message fanned out to many sessions is encoded once per protocol.
"""

from __future__ import annotations

import pytest

from chatcli import protocol as p
from chatcli.server.codecs import LEGACY, NATIVE, Codec, LegacyCodec, NativeCodec
from chatcli.server.config import ServerConfig
from chatcli.server.engine.base import StoredMessage
from chatcli.server.engine.memory import MemoryEngine
from chatcli.server.metrics import Metrics
from chatcli.server.relay import Relay
from tests.server.fakes import RecordingSession

LEGACY_SEND = "{'auth':'" + p.DEFAULT_AUTH_KEY + "','cmd':'send','userid':'bob', 'msgtext':'hi bob'}"


def ephemeral_relay() -> Relay:
    return Relay(ServerConfig(), Metrics(), MemoryEngine(), clock=lambda: 1_795_752_000.0)


def opened(relay: Relay, user: str, codec: Codec = NATIVE, receive: bool = True) -> RecordingSession:
    session = RecordingSession(user, codec)
    relay.open_session(session, receive=receive)
    return session


def test_a_message_reaches_every_session_of_its_recipient_in_each_ones_protocol(
        monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[str] = []
    for cls in (NativeCodec, LegacyCodec):
        original = cls.encode_message

        def counting(self: Codec, message: StoredMessage, original: object = original) -> str:
            encoded.append(self.name)
            return original(self, message)  # type: ignore[operator,no-any-return]

        monkeypatch.setattr(cls, "encode_message", counting)
    relay = ephemeral_relay()
    bobs = [opened(relay, "bob", codec) for codec in (NATIVE, LEGACY, NATIVE, LEGACY, NATIVE)]
    alice = opened(relay, "alice", receive=False)
    relay.on_native_text(alice, p.encode(p.Send("c1", "bob", "hi bob")))
    (ack,) = alice.frames()
    assert isinstance(ack, p.Ack) and ack.status == p.Status.DELIVERED and ack.msg_id == 1
    for bob in bobs:
        if bob.codec is LEGACY:
            assert bob.sent == ["{'cmd':'send','userid':'alice', 'msgtext':'hi bob'}"]
        else:
            (message,) = bob.frames()
            assert isinstance(message, p.Message)
            assert (message.id, message.sender, message.text) == (1, "alice", "hi bob")
        assert bob.written_upto == 1
    assert sorted(encoded) == ["chatcli.v1", "legacy"]  # once per protocol, not once per session
    assert relay.metrics.routed == 1


def test_a_seed_client_is_answered_in_its_own_frames() -> None:
    relay = ephemeral_relay()
    bob = opened(relay, "bob")
    alice = opened(relay, "alice", LEGACY)
    LEGACY.dispatch(relay, alice, LEGACY_SEND)  # what the transport does with its text frames
    assert alice.sent == ["send:success"]
    (message,) = bob.frames()
    assert isinstance(message, p.Message) and (message.sender, message.text) == ("alice", "hi bob")


def test_an_offline_recipient_is_refused_without_a_store_in_either_protocol() -> None:
    relay = ephemeral_relay()
    native, seed = opened(relay, "alice"), opened(relay, "carol", LEGACY)
    relay.on_native_text(native, p.encode(p.Send("c1", "bob", "anyone?")))
    seed.codec.dispatch(relay, seed, LEGACY_SEND)
    assert native.sent == ['{"type":"ack","id":"c1","status":"refused","reason":"offline"}']
    assert seed.sent == ["send:error"]
    assert relay.metrics.refusals == {p.Reason.OFFLINE: 2}


def test_a_wrong_key_from_a_seed_client_is_refused_and_counted() -> None:
    relay = ephemeral_relay()
    opened(relay, "bob")
    alice = opened(relay, "alice", LEGACY)
    relay.on_legacy_text(alice, LEGACY_SEND.replace(p.DEFAULT_AUTH_KEY, "guess"))
    assert alice.sent == ["send:error"] and alice.auth_failures == 1
    assert relay.metrics.refusals == {p.Reason.BAD_AUTH: 1}


def test_a_closed_session_receives_nothing_more_and_its_user_stays_reachable() -> None:
    relay = ephemeral_relay()
    first, second = opened(relay, "bob"), opened(relay, "bob", LEGACY)
    alice = opened(relay, "alice", receive=False)
    relay.close_session(first)
    relay.on_native_text(alice, p.encode(p.Send("c1", "bob", "still there?")))
    assert first.sent == [] and len(second.sent) == 1
    relay.close_session(second)
    relay.on_native_text(alice, p.encode(p.Send("c2", "bob", "gone?")))
    assert [frame.status for frame in alice.frames() if isinstance(frame, p.Ack)] == ["delivered", "refused"]


def test_a_binary_frame_is_an_error_in_the_sessions_protocol() -> None:
    relay = ephemeral_relay()
    native, seed = opened(relay, "alice"), opened(relay, "bob", LEGACY)
    relay.on_binary(native)
    relay.on_binary(seed)
    (error,) = native.frames()
    assert isinstance(error, p.Error) and error.code == p.ErrorCode.BINARY_UNSUPPORTED
    assert seed.sent == ["send:error"]
    assert relay.metrics.errors == {p.ErrorCode.BINARY_UNSUPPORTED: 2}
