"""Read positions, receipts, typing and the inbox through the relay, in-process over every engine
(issue 12): who is told what, what legacy sessions never see, what presence privacy and the rate
limit hold back."""

from __future__ import annotations

from pathlib import Path

from chatcli import protocol as p
from chatcli.server.chat_events import TYPING_INTERVAL_S
from chatcli.server.codecs import LEGACY
from chatcli.server.engine.base import Capability, Engine
from chatcli.server.relay import Relay
from tests.server.fakes import RecordingSession, make_engine
from tests.server.test_relay import Ticks, relay_on


def _send(relay: object, session: RecordingSession, frame: p.ClientFrame) -> None:
    relay.on_native_text(session, p.encode(frame))  # type: ignore[attr-defined]


def _of(session: RecordingSession, kind: type) -> list[p.ServerFrame]:
    return [f for f in session.frames() if isinstance(f, kind)]


def test_a_read_reaches_the_other_sessions_and_the_peer_not_legacy_ones(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice1, alice2, bob = RecordingSession("alice"), RecordingSession("alice"), RecordingSession("bob")
    bob_app = RecordingSession("bob", codec=LEGACY)
    for session in (alice1, alice2, bob, bob_app):
        relay.open_session(session)
    relay.submit(bob, "b1", "alice", "hi")
    ticks.end()
    for session in (alice1, alice2, bob, bob_app):
        session.sent.clear()
    _send(relay, alice1, p.MarkRead("bob", 1))
    ticks.end()
    assert alice1.sent == []  # no answer to the reader
    expected = [p.ReadPosition("bob", 1)] if Capability.READS in engine.capabilities else []
    assert alice2.frames() == expected
    assert bob.frames() == [p.Receipt("alice", 1)]
    assert bob_app.sent == []  # the seed app's frames have no room for any of this


def test_a_read_past_the_highest_id_counts_as_it_and_opting_out_sends_no_receipt(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, alice2, bob = RecordingSession("alice"), RecordingSession("alice"), RecordingSession("bob")
    for session in (alice, alice2, bob):
        relay.open_session(session)
    relay.submit(bob, "b1", "alice", "hi")
    ticks.end()
    bob.sent.clear()
    _send(relay, alice, p.MarkRead("bob", p.MAX_INT, receipt=False))
    ticks.end()
    assert _of(bob, p.Receipt) == []
    if Capability.READS in engine.capabilities:
        assert _of(alice2, p.ReadPosition) == [p.ReadPosition("bob", 1)]


def test_typing_goes_to_an_online_recipient_at_most_once_per_interval(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    now = [100.0]
    relay.monotonic = lambda: now[0]
    alice, bob, bob_app = RecordingSession("alice"), RecordingSession("bob"), RecordingSession("bob", codec=LEGACY)
    for session in (alice, bob, bob_app):
        relay.open_session(session)
    _send(relay, alice, p.Typing("carol"))  # offline: nobody to tell, and nothing kept
    _send(relay, alice, p.Typing("bob"))
    _send(relay, alice, p.Typing("bob"))  # too soon: dropped
    now[0] += TYPING_INTERVAL_S
    _send(relay, alice, p.Typing("bob"))
    assert bob.frames() == [p.PeerTyping("alice"), p.PeerTyping("alice")]
    assert bob_app.sent == [] and alice.sent == []


def _privacy_case(engine: Engine, presence: str, tmp_path: Path) -> tuple[Ticks, Relay, RecordingSession,
                                                                         RecordingSession]:
    ticks = Ticks()
    relay = relay_on(engine, ticks, presence=presence, db_path=tmp_path / "chat.db")  # the engine's file
    alice, bob = RecordingSession("alice"), RecordingSession("bob")
    for session in (alice, bob):
        relay.open_session(session)
    _send(relay, alice, p.Typing("bob"))
    _send(relay, alice, p.MarkRead("bob", 0))
    ticks.end()
    assert _of(bob, p.PeerTyping) == [] and _of(bob, p.Receipt) == []
    return ticks, relay, alice, bob


def test_presence_off_means_no_typing_or_receipts(engine: Engine, tmp_path: Path) -> None:
    _, relay, _, _ = _privacy_case(engine, "off", tmp_path)
    assert p.Feature.TYPING not in relay.features and p.Feature.RECEIPTS not in relay.features


def test_presence_contacts_means_typing_and_receipts_once_they_talked(tmp_path: Path) -> None:
    engine = make_engine("sqlite", tmp_path)  # contacts need stored messages
    ticks, relay, alice, bob = _privacy_case(engine, "contacts", tmp_path)
    relay.submit(bob, "b1", "alice", "now we have talked")
    ticks.end()
    relay.monotonic = lambda: 1e9  # past the typing interval
    _send(relay, alice, p.Typing("bob"))
    _send(relay, alice, p.MarkRead("bob", 1))
    ticks.end()
    assert _of(bob, p.PeerTyping) == [p.PeerTyping("alice")] and _of(bob, p.Receipt) == [p.Receipt("alice", 1)]
    engine.close()


def test_the_inbox_answers_with_counts_or_says_it_is_unavailable(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, bob = RecordingSession("alice"), RecordingSession("bob")
    for session in (alice, bob):
        relay.open_session(session)
    relay.submit(bob, "b1", "alice", "é" * 100)
    ticks.end()
    alice.sent.clear()
    _send(relay, alice, p.InboxRequest("i1"))
    ticks.end()
    (answer,) = alice.frames()
    if Capability.READS not in engine.capabilities:
        assert isinstance(answer, p.Error) and answer.code == p.ErrorCode.UNAVAILABLE
        assert "no inbox" in answer.message
        return
    assert isinstance(answer, p.Inbox) and answer.id == "i1"
    (line,) = answer.conversations
    assert (line.peer, line.unread, line.read, line.last_id, line.last_from) == ("bob", 1, 0, 1, "bob")
    assert line.preview == "é" * p.PREVIEW_MAX_CHARS


def test_an_inbox_asked_right_after_a_read_shows_it(engine: Engine) -> None:
    """A client that marks a conversation read and asks for its inbox in the same breath (one read of the
    socket, one tick) sees its read, though reads are kept a tick's worth at a time."""
    if Capability.READS not in engine.capabilities:
        return
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, bob = RecordingSession("alice"), RecordingSession("bob")
    for session in (alice, bob):
        relay.open_session(session)
    for n in range(3):
        relay.submit(bob, f"b{n}", "alice", f"hi {n}")
    ticks.end()
    alice.sent.clear()
    _send(relay, alice, p.MarkRead("bob", 2))
    _send(relay, alice, p.InboxRequest("i1"))
    ticks.end()
    _send(relay, alice, p.MarkRead("bob", 3))  # and again: each inbox shows the reads asked before it
    _send(relay, alice, p.InboxRequest("i2"))
    ticks.end()
    inboxes = _of(alice, p.Inbox)
    assert [(i.id, [(c.peer, c.read, c.unread) for c in i.conversations]) for i in inboxes] == [  # type: ignore[attr-defined]
        ("i1", [("bob", 2, 1)]), ("i2", [("bob", 3, 0)])]


def test_read_typing_and_inbox_draw_on_the_rate_limit(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks, rate=1, burst=1)
    alice, bob = RecordingSession("alice"), RecordingSession("bob")
    for session in (alice, bob):
        relay.open_session(session)
    _send(relay, alice, p.Typing("bob"))  # the one token
    _send(relay, alice, p.MarkRead("bob", 0))  # dropped quietly
    _send(relay, alice, p.InboxRequest("i9"))
    ticks.end()
    assert bob.frames() == [p.PeerTyping("alice")]
    (refusal,) = alice.frames()
    assert isinstance(refusal, p.Error) and refusal.code == p.ErrorCode.RATE_LIMITED
    assert refusal.details == {"id": "i9"}


def test_a_ticks_reads_are_kept_together_and_told_once(tmp_path: Path) -> None:
    """A flood of ``read`` frames costs one commit per tick, as ``received`` does: the highest id wins."""
    engine = make_engine("sqlite", tmp_path)
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, alice2, bob = RecordingSession("alice"), RecordingSession("alice"), RecordingSession("bob")
    for session in (alice, alice2, bob):
        relay.open_session(session)
    for text in ("one", "two", "three"):
        relay.submit(bob, text, "alice", text)
    ticks.end()
    for session in (alice2, bob):
        session.sent.clear()
    for msg_id in (1, 3, 2):
        _send(relay, alice, p.MarkRead("bob", msg_id))
    assert relay.chat.reads_waiting[("alice", "bob")].msg_id == 3
    ticks.end()
    assert alice2.frames() == [p.ReadPosition("bob", 3)] and bob.frames() == [p.Receipt("alice", 3)]
    assert not relay.chat.reads_waiting and not relay.chat.reads_committing
    engine.close()


def test_a_read_that_cannot_be_kept_is_answered_with_an_error(tmp_path: Path) -> None:
    engine = make_engine("sqlite", tmp_path)
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, bob = RecordingSession("alice"), RecordingSession("bob")
    for session in (alice, bob):
        relay.open_session(session)
    engine.close()  # every storage call fails from now on
    _send(relay, alice, p.MarkRead("bob", 0))
    ticks.end()
    (error,) = alice.frames()
    assert isinstance(error, p.Error) and error.code == p.ErrorCode.UNAVAILABLE
    assert bob.sent == []  # no receipt for a position that was not kept
