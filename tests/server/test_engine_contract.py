"""The Engine contract: every engine passes the same assertions (the ``engine`` fixture runs each test once
per engine). What an engine cannot do, it says in ``capabilities``; the tests branch on those, never on
which engine it is, so a new engine (Redis) only has to join ``ENGINES``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatcli import protocol as p
from chatcli.errors import LocalProtocolError, StorageError
from chatcli.server.engine.base import Appended, BacklogPage, Capability, Engine, NewMessage
from chatcli.server.engine.pages import HISTORY_ANSWER_BYTES, REPLAY_PAGE, REPLAY_PAGE_BYTES
from tests.server.fakes import ENGINES, RecordingListener, account_admin, make_engine


def verifies(accounts: Any, name: str, token: str) -> bool:
    """Whether ``token`` is ``name``'s current token, as a handshake asks it."""
    return accounts.verified_token_id(name, token) is not None


def outcome(start: Callable[[Callable[[Any], None]], None]) -> Any:
    """What an engine call handed its ``done`` callback (the test engines finish before returning)."""
    results: list[Any] = []
    start(results.append)
    assert len(results) == 1, "done must be called exactly once"
    return results[0]


def append(engine: Engine, *messages: NewMessage, cursors: dict[str, int] | None = None) -> Appended:
    result = outcome(lambda done: engine.append(messages, cursors or {}, done))
    assert isinstance(result, Appended)
    return result


def backlog(engine: Engine, user: str, after: int | None = None, since_ts: float | None = None) -> BacklogPage:
    page = outcome(lambda done: engine.read_backlog(user, after, since_ts, lambda m: f"{m.sender}:{m.text}", done))
    assert isinstance(page, BacklogPage)
    return page


def msg(sender: str, recipient: str, text: str, ts: float = 1000.0, client_id: str | None = None) -> NewMessage:
    return NewMessage(sender, recipient, text, ts, client_id)


def stores(engine: Engine) -> bool:
    return Capability.STORE in engine.capabilities


def known_highest(engine: Engine) -> int:
    """``highest_id``, or for an engine that cannot know it without waiting (several nodes: another may
    have just given out a higher one, so it says MAX_INT once it has any), the highest it gave out itself."""
    highest = engine.highest_id()
    return getattr(engine, "_highest_id", highest) if highest == p.MAX_INT else highest


# -- identity -------------------------------------------------------------------------------------


def test_an_engine_has_an_epoch_of_128_random_bits(engine: Engine) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", engine.epoch)
    assert engine.highest_id() == 0 and engine.newest_ts == 0.0


def test_a_storing_engine_keeps_its_epoch_and_highest_id_across_a_restart(engine: Engine, tmp_path: Path) -> None:
    engine.presence.joined("bob")
    append(engine, msg("alice", "bob", "one"))
    kind = {"ephemeral": "memory"}.get(engine.name, engine.name)
    engine.close()
    again = make_engine(kind, tmp_path)
    try:
        if stores(engine):
            assert (again.epoch, known_highest(again), again.newest_ts) == (engine.epoch, 1, 1000.0)
        else:  # nothing survives: a new store, which a client's old cursor must not be trusted in
            assert again.epoch != engine.epoch and again.highest_id() == 0
    finally:
        again.close()


# -- commit -----------------------------------------------------------------------------------------


def test_ids_grow_in_batch_order_and_highest_id_follows(engine: Engine) -> None:
    engine.presence.joined("bob")
    first = append(engine, msg("alice", "bob", "1"), msg("carol", "bob", "2"))
    second = append(engine, msg("alice", "bob", "3"))
    assert list(first.ids) == [1, 2] and list(second.ids) == [3]
    assert not first.duplicates and not first.offline
    assert known_highest(engine) == 3


def test_an_offline_recipient_is_stored_for_or_refused(engine: Engine) -> None:
    engine.presence.joined("bob")
    appended = append(engine, msg("alice", "carol", "to carol, offline"), msg("alice", "bob", "to bob"))
    if stores(engine):
        assert list(appended.ids) == [1, 2] and not appended.offline
        assert backlog(engine, "carol").frames == [(1, "alice:to carol, offline")]
    else:
        assert appended.offline == {0} and list(appended.ids) == [0, 1]
        assert known_highest(engine) == 1  # a refused message takes no id


def test_a_retried_client_id_is_answered_with_the_original(engine: Engine) -> None:
    engine.presence.joined("bob")
    first = append(engine, msg("alice", "bob", "hi", client_id="c1"))
    again = append(engine, msg("alice", "bob", "hi", client_id="c1"), msg("carol", "bob", "x", client_id="c1"))
    if stores(engine):  # idempotency comes with storage: the original is what can be answered
        assert list(again.ids) == [first.ids[0], 2] and again.duplicates == {0}
    else:
        assert list(again.ids) == [2, 3] and not again.duplicates


def test_a_batch_that_cannot_be_stored_is_still_answered_and_the_next_one_committed(engine: Engine) -> None:
    # The protocol refuses lone surrogates; this one bypasses it, as any bug in a commit would. A batch left
    # unanswered once wedged a Redis node: its senders, and every later batch, waited for ever.
    engine.presence.joined("bob")
    broken = outcome(lambda done: engine.append([msg("alice", "bob", "a\ud800b")], {}, done))
    assert isinstance(broken, StorageError) or (isinstance(broken, Appended) and not stores(engine))
    after = append(engine, msg("carol", "bob", "after"))
    assert len(after.ids) == 1 and not after.offline
    if stores(engine):
        assert backlog(engine, "bob", after=0).frames == [(after.ids[0], "carol:after")]


# -- backlog and cursors ----------------------------------------------------------------------------


def test_the_backlog_starts_after_the_cursor_or_where_asked(engine: Engine) -> None:
    append(engine, *(msg("alice", "bob", str(n), ts=1000.0 + n) for n in range(1, 5)))
    append(engine, cursors={"bob": 2})
    if Capability.RESUME not in engine.capabilities:
        assert backlog(engine, "bob") == BacklogPage([], 0, True)
        return
    assert [i for i, _ in backlog(engine, "bob").frames] == [3, 4]
    assert [i for i, _ in backlog(engine, "bob", after=0).frames] == [1, 2, 3, 4]
    assert [i for i, _ in backlog(engine, "bob", since_ts=1003.0).frames] == [3, 4]
    assert backlog(engine, "bob", since_ts=2000.0) == BacklogPage([], 0, True)
    append(engine, cursors={"bob": 1})  # a cursor never moves back
    assert backlog(engine, "bob").after == 4


def test_a_backlog_page_is_bounded_in_count_and_bytes(engine: Engine) -> None:
    if Capability.RESUME not in engine.capabilities:
        assert backlog(engine, "bob", after=0).complete
        return
    big = "x" * (REPLAY_PAGE_BYTES // 2)
    append(engine, *(msg("alice", "bob", big) for _ in range(3)))
    first = backlog(engine, "bob", after=0)
    assert [i for i, _ in first.frames] == [1] and not first.complete  # a second would pass the byte bound
    assert [i for i, _ in backlog(engine, "bob", after=first.after).frames] == [2]
    append(engine, *(msg("alice", "carol", "s") for _ in range(REPLAY_PAGE + 1)))
    page = backlog(engine, "carol", after=0)
    assert len(page.frames) == REPLAY_PAGE and not page.complete
    assert backlog(engine, "carol", after=page.after).complete


def test_a_row_the_encoder_rejects_is_skipped_not_fatal(engine: Engine) -> None:
    engine.presence.joined("bob")
    append(engine, msg("alice", "bob", "bad"), msg("alice", "bob", "good"))

    def encode(message: Any) -> str:
        if message.text == "bad":
            raise LocalProtocolError("unencodable")
        return str(message.text)

    page = outcome(lambda done: engine.read_backlog("bob", 0, None, encode, done))
    expected = [(2, "good")] if Capability.RESUME in engine.capabilities else []
    assert page == BacklogPage(expected, 2 if expected else 0, True)


# -- history ----------------------------------------------------------------------------------------


def history(engine: Engine, user: str, peer: str, limit: int = 50,
            before: int | None = None) -> p.History | StorageError:
    answer = outcome(lambda done: engine.read_history(user, p.HistoryRequest("h1", peer, limit, before), done))
    if isinstance(answer, StorageError):
        return answer
    frame = p.parse_server_frame(answer)
    assert isinstance(frame, p.History)
    return frame


def test_history_is_both_directions_oldest_first_and_bounded(engine: Engine) -> None:
    engine.presence.joined("alice")
    engine.presence.joined("bob")
    append(engine, msg("alice", "bob", "a1"), msg("bob", "alice", "b1"), msg("carol", "bob", "c1"))
    answer = history(engine, "bob", "alice")
    if Capability.HISTORY not in engine.capabilities:
        assert isinstance(answer, StorageError)
        return
    assert isinstance(answer, p.History)
    assert [m.text for m in answer.messages] == ["a1", "b1"] and not answer.more
    big = "y" * (HISTORY_ANSWER_BYTES // 2)
    append(engine, *(msg("alice", "bob", big) for _ in range(3)))
    cut = history(engine, "bob", "alice")
    assert isinstance(cut, p.History) and cut.more and len(cut.messages) == 1


def test_history_pages_back_from_a_message_in_both_directions(engine: Engine) -> None:
    if Capability.HISTORY not in engine.capabilities:
        return
    append(engine, *(msg("alice", "bob", f"a{n}") if n % 2 else msg("bob", "alice", f"b{n}") for n in range(1, 8)),
           msg("carol", "bob", "not this conversation"))

    def page(user: str, peer: str, before: int | None = None) -> list[str]:
        answer = history(engine, user, peer, limit=3, before=before)
        assert isinstance(answer, p.History) and not answer.more  # "more": only when cut by the byte cap
        return [m.text for m in answer.messages]

    assert page("bob", "alice") == page("alice", "bob") == ["a5", "b6", "a7"]
    assert page("bob", "alice", before=5) == ["b2", "a3", "b4"]
    assert page("alice", "bob", before=2) == ["a1"]


# -- contacts, presence, accounts, listener --------------------------------------------------------


def test_contacts_are_who_exchanged_a_message(engine: Engine) -> None:
    for user in ("alice", "bob", "carol"):
        engine.presence.joined(user)
    append(engine, msg("alice", "bob", "hi"))
    expected = {"bob"} if Capability.CONTACTS in engine.capabilities else set()
    assert engine.contacts_among("alice", {"bob", "carol"}) == expected
    assert engine.contacts_among("alice", set()) == set()


def test_presence_counts_users_not_sessions(engine: Engine) -> None:
    presence = engine.presence
    presence.joined("alice")
    presence.joined("bob")
    presence.left("alice")
    assert presence.is_online("bob") and not presence.is_online("alice")
    assert set(presence.online()) == {"bob"}


def test_accounts_exist_only_where_announced(engine: Engine, tmp_path: Path) -> None:
    accounts = engine.accounts
    if Capability.ACCOUNTS not in engine.capabilities:
        assert accounts is None
        return
    assert accounts is not None and not accounts.any_accounts()
    with account_admin(engine, tmp_path) as admin:  # `chatcli user add` from another process
        token = admin.add("alice")
    assert accounts.any_accounts() and verifies(accounts, "alice", token)
    assert not verifies(accounts, "alice", token + "x") and not verifies(accounts, "nobody", token)


def test_accounts_say_when_a_token_changed_and_which_it_is(engine: Engine, tmp_path: Path) -> None:
    accounts = engine.accounts
    if accounts is None:
        return
    with account_admin(engine, tmp_path) as admin:  # `chatcli user add|rotate|remove` from another process
        before = accounts.generation()
        old, bob = admin.add("alice"), admin.add("bob")
        proved = accounts.verified_token_id("alice", old)
        assert proved is not None and accounts.verified_token_id("alice", old + "x") is None
        assert accounts.current_token_ids(["alice", "bob", "nobody"]) == {
            "alice": proved, "bob": accounts.verified_token_id("bob", bob)}
        added = accounts.generation()
        new = admin.rotate("alice")
        rotated = accounts.generation()
        assert accounts.current_token_ids(["alice"]) == {"alice": accounts.verified_token_id("alice", new)}
        assert accounts.current_token_ids(["alice"]) != {"alice": proved}
        admin.remove("alice")
        assert accounts.current_token_ids(["alice", "bob"]).keys() == {"bob"}
        assert len({before, added, rotated, accounts.generation()}) == 4


def test_a_single_process_engine_never_calls_its_listener(engine: Engine) -> None:
    listener = RecordingListener()
    engine.attach(listener)
    engine.presence.joined("bob")
    append(engine, msg("alice", "bob", "hi"))
    assert listener.messages == [] and listener.presence == []


# -- maintenance and health --------------------------------------------------------------------------


def test_prune_deletes_only_what_is_older(engine: Engine) -> None:
    engine.presence.joined("bob")
    append(engine, msg("alice", "bob", "old", ts=10.0), msg("alice", "bob", "new", ts=20.0))
    append(engine, cursors={"bob": 2})  # acknowledged: the Redis engine never prunes what is not
    deleted = asyncio.run(engine.prune(15.0, 100))
    asyncio.run(engine.settle())
    if stores(engine):
        assert deleted == 1 and [f for _, f in backlog(engine, "bob", after=0).frames] == ["alice:new"]
    else:
        assert deleted == 0


def test_health_is_ok_and_names_the_engine(engine: Engine) -> None:
    health = engine.health()
    assert health["ok"] is True and health["mode"] == engine.name and "error" not in health
    if stores(engine):
        assert health["db_bytes"] > 0


@pytest.mark.parametrize("capability", list(Capability))
def test_every_capability_is_held_by_some_engine(capability: Capability, tmp_path: Path) -> None:
    """No capability is dead weight: some engine in the suite has it, so its branch above is tested.
    Every engine here checks replies; the relay's path for one that does not is tested in
    tests/server/test_replies_search.py."""
    engines = [make_engine(kind, tmp_path / kind) for kind in ENGINES]
    try:
        assert any(capability in e.capabilities for e in engines)
        assert capability is Capability.REPLIES or any(capability not in e.capabilities for e in engines)
    finally:
        for e in engines:
            e.close()


# -- read positions and the inbox (issue 12) ------------------------------------------------------


def test_read_positions_move_up_only_and_count_the_peers_messages_beyond(engine: Engine) -> None:
    for user in ("alice", "bob", "carol"):
        engine.presence.joined(user)
    append(engine, msg("bob", "alice", "one"), msg("bob", "alice", "two"), msg("alice", "bob", "mine"),
           msg("carol", "alice", "x" * 500, ts=2000.0), msg("bob", "carol", "not alice's"))
    marked = outcome(lambda done: engine.mark_read({("alice", "bob"): (1, True), ("bob", "alice"): (2, True)}, done))
    lowered = outcome(lambda done: engine.mark_read({("alice", "bob"): (0, True)}, done))
    page = outcome(lambda done: engine.read_inbox("alice", 10, done))
    if Capability.READS not in engine.capabilities:
        assert all(isinstance(result, StorageError) for result in (marked, lowered, page))
        return
    assert (marked, lowered) == ({("alice", "bob"): 1, ("bob", "alice"): 2}, {("alice", "bob"): 1})  # never down
    # A conversation that does not exist keeps no position: what is kept grows with contacts, not with names.
    assert outcome(lambda done: engine.mark_read({("alice", "nobody"): (3, True)}, done)) == {("alice", "nobody"): 0}
    assert not page.more
    # The most recent conversation first; unread counts only the peer's messages above the position.
    assert [(c.peer, c.unread, c.read, c.last.id, c.last.sender) for c in page.conversations] == [
        ("carol", 1, 0, 4, "carol"), ("bob", 1, 1, 3, "alice")]
    assert page.conversations[0].last.text == "x" * 500 and page.conversations[0].last.ts == 2000.0
    first = outcome(lambda done: engine.read_inbox("alice", 1, done))
    assert [c.peer for c in first.conversations] == ["carol"] and first.more
    assert outcome(lambda done: engine.read_inbox("dave", 10, done)).conversations == []
    # Per user: bob's position with alice is his own.
    assert [(c.peer, c.unread) for c in outcome(lambda done: engine.read_inbox("bob", 10, done)).conversations] == [
        ("carol", 0), ("alice", 1)]
    # bob learns how far alice read, while her reads allow receipts; the latest read decides.
    assert [c.peer_read for c in outcome(lambda done: engine.read_inbox("bob", 10, done)).conversations] == [None, 1]
    assert outcome(lambda done: engine.mark_read({("alice", "bob"): (3, False)}, done)) == {("alice", "bob"): 3}
    assert [c.peer_read for c in outcome(lambda done: engine.read_inbox("bob", 10, done)).conversations] == [
        None, None]


# -- replies and search (issue 13) -------------------------------------------------------------


def reply(sender: str, recipient: str, text: str, reply_to: int) -> NewMessage:
    return NewMessage(sender, recipient, text, 1000.0, None, reply_to)


def test_a_reply_must_name_a_message_of_its_own_conversation(engine: Engine) -> None:
    if Capability.REPLIES not in engine.capabilities:  # the relay refuses replies before they reach it
        return
    for user in ("alice", "bob", "carol"):
        engine.presence.joined(user)
    question, other = append(engine, msg("alice", "bob", "deploy?"), msg("carol", "bob", "lunch?")).ids
    done = append(engine, reply("bob", "alice", "yes", question),  # the other side answers
                  reply("alice", "bob", "and also", question),  # the asker adds to their own message
                  reply("bob", "alice", "wrong one", other),  # carol's conversation with bob
                  reply("carol", "alice", "me too", question),  # not carol's conversation at all
                  reply("bob", "alice", "never sent", 999_999),
                  reply("bob", "alice", "zero", 0))
    assert done.bad_replies == {2, 3, 4, 5}
    assert [i == 0 for i in done.ids] == [False, False, True, True, True, True]
    assert done.ids[0] > other and done.ids[1] == done.ids[0] + 1
    if Capability.HISTORY in engine.capabilities:  # what was refused was not stored; replies keep reply_to
        answer = history(engine, "alice", "bob")
        assert isinstance(answer, p.History)
        assert [(m.text, m.reply_to) for m in answer.messages] == [
            ("deploy?", None), ("yes", question), ("and also", question)]


def test_a_reply_in_the_same_batch_as_its_message_and_a_retry_beside_it(engine: Engine) -> None:
    if Capability.REPLIES not in engine.capabilities:
        return
    engine.presence.joined("bob")
    engine.presence.joined("alice")
    (first,) = append(engine, msg("alice", "bob", "q", client_id="c1")).ids
    again = append(engine, msg("alice", "bob", "q", client_id="c1"), reply("bob", "alice", "a", first))
    assert again.bad_replies == frozenset() and again.ids[1] > first
    if stores(engine):
        assert again.duplicates == {0} and again.ids[0] == first


def test_a_reply_may_name_a_message_earlier_in_its_own_batch(engine: Engine) -> None:
    if Capability.REPLIES not in engine.capabilities:
        return
    for user in ("alice", "bob", "carol"):
        engine.presence.joined(user)
    append(engine, msg("alice", "bob", "before"))
    question = known_highest(engine) + 1  # the id the batch's first message takes
    batch = append(engine, msg("alice", "bob", "q"), reply("bob", "alice", "a", question),
                   reply("carol", "alice", "not hers", question), reply("alice", "bob", "not yet", question + 4))
    assert batch.ids[0] == question and batch.bad_replies == frozenset({2, 3})
    if stores(engine):
        answer = history(engine, "alice", "bob")
        assert isinstance(answer, p.History)
        assert [(m.text, m.reply_to) for m in answer.messages] == [("before", None), ("q", None), ("a", question)]


def search(engine: Engine, user: str, text: str, **fields: Any) -> p.Search | StorageError:
    answer = outcome(lambda done: engine.read_search(user, p.SearchRequest("s1", text, **fields), done))
    if isinstance(answer, StorageError):
        return answer
    frame = p.parse_server_frame(answer)
    assert isinstance(frame, p.Search)
    return frame


def found(engine: Engine, user: str, text: str, **fields: Any) -> list[str]:
    answer = search(engine, user, text, **fields)
    assert isinstance(answer, p.Search)
    return [m.text for m in answer.messages]


def test_search_finds_only_the_users_own_messages_newest_first(engine: Engine) -> None:
    for user in ("alice", "bob", "carol"):
        engine.presence.joined(user)
    append(engine, msg("alice", "bob", "Lunch at noon?", ts=1000.0), msg("bob", "alice", "lunch: yes, café", ts=1000.0),
           msg("carol", "dave", "secret lunch plans", ts=1000.0))
    append(engine, msg("carol", "alice", "LUNCH tomorrow", ts=2000.0), msg("alice", "alice", "note: lunch", ts=2000.0))
    if Capability.SEARCH not in engine.capabilities:
        assert isinstance(search(engine, "alice", "lunch"), StorageError)  # saying why, e.g. "no search"
        return
    assert found(engine, "alice", "lunch") == ["note: lunch", "LUNCH tomorrow", "lunch: yes, café", "Lunch at noon?"]
    assert found(engine, "dave", "lunch") == ["secret lunch plans"]  # and never alice's
    assert found(engine, "erin", "lunch") == []
    assert found(engine, "alice", "lunch", peer="bob") == ["lunch: yes, café", "Lunch at noon?"]
    assert found(engine, "alice", "lunch", peer="alice") == ["note: lunch"]
    assert found(engine, "alice", "cafe yes") == ["lunch: yes, café"]  # every word, any order, accents folded
    assert found(engine, "alice", "noon lunch") == ["Lunch at noon?"]
    assert found(engine, "alice", "lun") == []  # whole words, not prefixes
    assert found(engine, "alice", 'lunch" OR "secret') == []  # typed quotes and operators are plain words
    assert found(engine, "alice", "?!") == []
    assert found(engine, "alice", "lunch", limit=2) == ["note: lunch", "LUNCH tomorrow"]
    assert found(engine, "alice", "lunch", since=p.format_ts(1500.0)) == ["note: lunch", "LUNCH tomorrow"]
    assert found(engine, "alice", "lunch", since=p.format_ts(9999.0)) == []
    newest = search(engine, "alice", "lunch", limit=1)
    assert isinstance(newest, p.Search)
    assert found(engine, "alice", "lunch", before=newest.messages[0].id) == [
        "LUNCH tomorrow", "lunch: yes, café", "Lunch at noon?"]


def test_a_search_answer_is_capped_in_bytes_and_sees_every_commit(engine: Engine) -> None:
    engine.presence.joined("bob")
    if Capability.SEARCH not in engine.capabilities:
        return
    big = "needle " + "y" * (HISTORY_ANSWER_BYTES // 2)
    for _ in range(3):  # one commit each: the index catches up before a search, whatever its batch size
        append(engine, msg("alice", "bob", big))
    answer = search(engine, "bob", "needle", limit=10)
    assert isinstance(answer, p.Search) and answer.more and len(answer.messages) == 1
    append(engine, reply("bob", "alice", "needle too", answer.messages[0].id))
    latest = search(engine, "alice", "needle", limit=1)
    assert isinstance(latest, p.Search)
    assert [(m.text, m.reply_to) for m in latest.messages] == [("needle too", answer.messages[0].id)]
