"""The relay in-process, over every engine, with recording sessions: routing, acks, replay, history,
presence and the engine's hooks, without sockets or a loop (commits run when the test says the tick ended).

A session whose user id is invalid is only reachable here (issue 8, item 1: a refused handshake
used to leave ``user=""``). What needs a real process (signals, kill -9, the file) is tested in
test_durability.py and test_storage_failures.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from chatcli import protocol as p
from chatcli.server.codecs import LEGACY
from chatcli.server.config import ServerConfig
from chatcli.server.engine.base import Capability, Engine, StoredMessage
from chatcli.server.metrics import Metrics
from chatcli.server.relay import Outcome, Relay
from tests.server.fakes import RecordingSession, make_engine
from tests.support.flutter_app import decode_legacy_message


class Ticks:
    """The relay's ``schedule``: callbacks wait until ``end()`` runs them, as the loop would after a tick."""

    def __init__(self) -> None:
        self.waiting: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.waiting.append(callback)

    def end(self) -> None:
        while self.waiting:
            self.waiting.pop(0)()


def relay_on(engine: Engine, ticks: Ticks, **config: object) -> Relay:
    return Relay(ServerConfig.build(**config), Metrics(), engine, schedule=ticks)


def test_a_sender_with_an_invalid_id_fails_alone_in_its_batch(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ticks = Ticks()
    engine = make_engine("sqlite", tmp_path)
    relay = relay_on(engine, ticks)
    bob, alice, nobody = RecordingSession("bob"), RecordingSession("alice"), RecordingSession("")
    relay.open_session(bob)
    for sender in (alice, nobody):
        relay.open_session(sender, receive=False)  # registered, as the transport does before any frame
    relay.submit(nobody, "n1", "bob", "from nobody")  # the same tick: one batch
    relay.submit(alice, "a1", "bob", "from alice")
    with caplog.at_level(logging.ERROR, "chatcli.server"):
        ticks.end()  # the commit
    engine.close()
    (nobody_ack,) = nobody.frames()
    (alice_ack,) = alice.frames()
    assert isinstance(nobody_ack, p.Ack) and nobody_ack.status == p.Status.STORED  # stored, so not refused
    assert isinstance(alice_ack, p.Ack) and alice_ack.status == p.Status.DELIVERED
    assert bob.texts() == ["from alice"]
    assert "cannot deliver stored message" in caplog.text


def test_a_tick_is_acknowledged_and_delivered_once_committed(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, bob = RecordingSession("alice"), RecordingSession("bob", LEGACY)
    relay.open_session(alice)
    relay.open_session(bob)
    relay.submit(alice, "c1", "bob", "one")
    relay.submit(alice, "c2", "bob", "two")
    assert alice.sent == [] and bob.sent == []  # nothing before the commit
    ticks.end()
    assert [(a.id, a.status, a.msg_id) for a in alice.acks()] == [("c1", "delivered", 1), ("c2", "delivered", 2)]
    assert [decode_legacy_message(frame) for frame in bob.sent] == [("alice", "one"), ("alice", "two")]


def test_an_offline_recipient_is_stored_then_replayed_or_refused(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice = RecordingSession("alice")
    relay.open_session(alice)
    relay.submit(alice, "c1", "carol", "later")
    ticks.end()
    (ack,) = alice.acks()
    carol = RecordingSession("carol")
    relay.open_session(carol)
    if Capability.STORE in engine.capabilities:
        assert ack.status == p.Status.STORED and carol.texts() == ["later"]
    else:
        assert (ack.status, ack.reason) == (p.Status.REFUSED, p.Reason.OFFLINE) and carol.sent == []


def test_a_retried_client_id_is_acknowledged_as_a_duplicate_where_stored(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice, bob = RecordingSession("alice"), RecordingSession("bob")
    relay.open_session(alice)
    relay.open_session(bob)
    for _ in range(2):
        relay.submit(alice, "same", "bob", "hi")
        ticks.end()
    first, second = alice.acks()
    if Capability.STORE in engine.capabilities:
        assert second.duplicate and second.msg_id == first.msg_id and bob.texts() == ["hi"]
    else:
        assert not second.duplicate and bob.texts() == ["hi", "hi"]


def test_hello_features_and_history_follow_the_capabilities(engine: Engine) -> None:
    ticks = Ticks()
    relay = relay_on(engine, ticks)
    alice = RecordingSession("alice")
    relay.open_session(alice)
    relay.on_native_text(alice, p.encode(p.HistoryRequest("h1", "bob", 10)))
    ticks.end()
    (answer,) = alice.frames()
    reads = (p.Feature.READS,) if Capability.READS in engine.capabilities else ()  # not on Redis yet
    replies = tuple(feature for capability, feature in ((Capability.REPLIES, p.Feature.REPLIES),
                                                        (Capability.SEARCH, p.Feature.SEARCH))
                    if capability in engine.capabilities)  # nor these
    if Capability.HISTORY in engine.capabilities:
        assert relay.features == (p.Feature.STORE, p.Feature.RESUME, p.Feature.HISTORY, *replies,
                                  p.Feature.PRESENCE, *reads, p.Feature.RECEIPTS, p.Feature.TYPING)
        assert isinstance(answer, p.History) and answer.messages == ()
    else:
        assert relay.features == (p.Feature.REPLIES, p.Feature.PRESENCE, p.Feature.RECEIPTS, p.Feature.TYPING)
        assert isinstance(answer, p.Error) and answer.code == p.ErrorCode.UNAVAILABLE


def test_a_cursor_from_another_epoch_or_past_the_highest_id_is_a_reset(engine: Engine) -> None:
    relay = relay_on(engine, Ticks())
    assert relay.epoch == engine.epoch
    assert relay.resume_after("bob", None, None) == (None, False)
    assert relay.resume_after("bob", 0, engine.epoch) == (0, False)
    assert relay.resume_after("bob", 5, engine.epoch) == (0, True)  # no id 5 was ever given out here
    assert relay.resume_after("bob", 0, "0" * 32) == (0, True)


def test_presence_is_reported_to_the_engine_and_read_back_from_it(engine: Engine) -> None:
    relay = relay_on(engine, Ticks(), presence="all")
    bob1, bob2, alice = RecordingSession("bob"), RecordingSession("bob"), RecordingSession("alice")
    relay.open_session(alice)
    relay.on_native_text(alice, p.encode(p.Watch(("bob",))))
    relay.open_session(bob1)
    relay.open_session(bob2)
    assert engine.presence.is_online("bob") and relay.online_users() == ["alice", "bob"]
    relay.close_session(bob1)
    assert engine.presence.is_online("bob")  # one session left
    relay.close_session(bob2)
    assert not engine.presence.is_online("bob")
    presence = [(f.user, f.online) for f in alice.frames() if isinstance(f, p.Presence)]
    assert presence == [("bob", False), ("bob", True), ("bob", False)]


def test_what_the_engine_hands_over_from_elsewhere_reaches_local_sessions(engine: Engine,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The hooks a multi-node engine calls: messages committed on another node (a run at a time), presence there."""
    relay = relay_on(engine, Ticks(), presence="all")
    bob, alice = RecordingSession("bob"), RecordingSession("alice")
    relay.open_session(bob)
    relay.open_session(alice)
    relay.on_native_text(alice, p.encode(p.Watch(("carol",))))
    relay.messages_committed_elsewhere("bob", [StoredMessage(7, "carol", "bob", "from node 2", 1000.0, None)])
    # Once more: a node may hand on a message a backlog page already had (read as it was committed); a row
    # that cannot be encoded (no sender) fails alone, the rest of its run arrives.
    with caplog.at_level(logging.ERROR, "chatcli.server"):
        relay.messages_committed_elsewhere("bob", [StoredMessage(7, "carol", "bob", "from node 2", 1000.0, None),
                                                   StoredMessage(9, "", "bob", "no sender", 1000.0, None),
                                                   StoredMessage(10, "carol", "bob", "and more", 1000.0, None)])
    relay.messages_committed_elsewhere("dave", [StoredMessage(8, "carol", "dave", "nobody here", 1000.0, None)])
    relay.presence_changed("carol", True)
    assert bob.texts() == ["from node 2", "and more"] and bob.written_upto == 10
    assert "cannot deliver stored message 9" in caplog.text
    assert [(f.user, f.online) for f in alice.frames() if isinstance(f, p.Presence)] == [("carol", False),
                                                                                         ("carol", True)]


def test_outcomes_map_to_ack_statuses() -> None:
    assert {o: o.status for o in Outcome} == {Outcome.DELIVERED: p.Status.DELIVERED, Outcome.STORED: p.Status.STORED,
                                              Outcome.DUPLICATE: p.Status.STORED, Outcome.OFFLINE: p.Status.REFUSED}


class SlowReader(RecordingSession):
    """A session that has not read its last page yet: the next one waits for ``drain()``."""

    def __init__(self, user: str) -> None:
        super().__init__(user)
        self.waiting: list[Callable[[], None]] = []

    def when_drained(self, callback: Callable[[], None]) -> None:
        self.waiting.append(callback)

    def drain(self) -> None:
        while self.waiting:
            self.waiting.pop(0)()


def bob_behind_a_backlog(tmp_path: Path) -> tuple[Ticks, Engine, Relay, RecordingSession, SlowReader, list[str]]:
    """Alice has sent bob 3,000 messages (more than one page); bob connects and reads slowly: the first page
    goes out, the next waits for him to read."""
    ticks = Ticks()
    engine = make_engine("sqlite", tmp_path)
    relay = relay_on(engine, ticks)
    alice = RecordingSession("alice")
    relay.open_session(alice, receive=False)
    backlog = [f"old {i}" for i in range(3000)]
    for i, text in enumerate(backlog):
        relay.submit(alice, f"o{i}", "bob", text)
    ticks.end()
    bob = SlowReader("bob")
    relay.open_session(bob)
    return ticks, engine, relay, alice, bob, backlog


def test_messages_from_another_node_wait_behind_the_backlog_being_sent(tmp_path: Path) -> None:
    ticks, engine, relay, _, bob, backlog = bob_behind_a_backlog(tmp_path)
    first_page = bob.texts()
    relay.messages_committed_elsewhere("bob", [StoredMessage(5001 + i, "carol", "bob", f"live {i}", 1000.0, None)
                                               for i in range(2)])
    assert bob.texts() == first_page and len(first_page) < len(backlog)  # held: nothing jumps the backlog
    while bob.waiting:
        bob.drain()
        ticks.end()
    engine.close()
    assert bob.texts() == [*backlog, "live 0", "live 1"]


def test_live_messages_held_during_a_slow_replay_are_bounded_yet_all_arrive_in_order(tmp_path: Path) -> None:
    ticks, engine, relay, alice, bob, backlog = bob_behind_a_backlog(tmp_path)
    live = [f"live {i} " + "x" * 20_000 for i in range(5)]  # 100,000 characters: past what is held
    for i, text in enumerate(live):
        relay.submit(alice, f"l{i}", "bob", text)
        ticks.end()
    replay = relay.replays[bob]  # type: ignore[index]
    assert replay.overflowed and not replay.held  # dropped from memory: storage has them
    while bob.waiting:
        bob.drain()
        ticks.end()
    engine.close()
    assert bob.texts() == backlog + live
