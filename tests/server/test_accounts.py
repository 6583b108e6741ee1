"""The accounts store, on real database files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatcli.errors import AccountError, LocalProtocolError
from chatcli.server.accounts import ACCOUNT_MIGRATIONS, ACCOUNTS_COMPONENT, AccountStore, _token_hash
from chatcli.server.engine.options import Fsync
from chatcli.server.storage import NewMessage, SQLiteStore, open_component, open_database, schema_version


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
def accounts(db_path: Path) -> Iterator[AccountStore]:
    with AccountStore(db_path) as opened:
        yield opened


def verifies(accounts: Any, name: str, token: str) -> bool:
    """Whether ``token`` is ``name``'s current token, as a handshake asks it."""
    return accounts.verified_token_id(name, token) is not None


def test_a_new_account_verifies_with_its_token_only(accounts: AccountStore) -> None:
    assert not accounts.any_accounts()
    token = accounts.add("alice")

    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    assert accounts.any_accounts()
    assert verifies(accounts, "alice", token)
    assert not verifies(accounts, "alice", token + "x")
    assert not verifies(accounts, "alice", "")
    assert not verifies(accounts, "bob", token)


def test_verify_is_false_for_names_that_are_not_user_ids(accounts: AccountStore) -> None:
    token = accounts.add("alice")
    assert not verifies(accounts, "../alice", token)
    assert not verifies(accounts, "", token)


def test_adding_an_existing_name_fails_and_keeps_the_token(accounts: AccountStore) -> None:
    token = accounts.add("alice")
    with pytest.raises(AccountError, match="already exists"):
        accounts.add("alice")
    assert verifies(accounts, "alice", token)


def test_names_must_be_user_ids(accounts: AccountStore) -> None:
    with pytest.raises(LocalProtocolError, match="invalid user id"):
        accounts.add("not a name")
    assert not accounts.any_accounts()


def test_rotate_replaces_the_token(accounts: AccountStore) -> None:
    old = accounts.add("alice")
    new = accounts.rotate("alice")

    assert new != old
    assert verifies(accounts, "alice", new)
    assert not verifies(accounts, "alice", old)
    with pytest.raises(AccountError, match="no account"):
        accounts.rotate("bob")


def test_remove_and_list(accounts: AccountStore) -> None:
    before = time.time()
    token = accounts.add("bob")
    accounts.add("alice")

    listed = accounts.list()
    assert [a.name for a in listed] == ["alice", "bob"]
    assert all(before <= a.created_ts <= time.time() for a in listed)

    assert accounts.remove("bob") is True
    assert accounts.remove("bob") is False
    assert [a.name for a in accounts.list()] == ["alice"]
    assert not verifies(accounts, "bob", token)


def test_only_a_hash_of_the_token_reaches_the_file(db_path: Path) -> None:
    with AccountStore(db_path) as accounts:
        token = accounts.add("alice")
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]

    assert b"alice" in b"".join(p.read_bytes() for p in files)
    assert all(token.encode() not in p.read_bytes() for p in files)


def test_a_change_in_another_process_is_seen_at_once(db_path: Path) -> None:
    with AccountStore(db_path) as server_side, AccountStore(db_path) as cli_side:
        old = cli_side.add("alice")
        assert verifies(server_side, "alice", old)
        new = cli_side.rotate("alice")
        assert not verifies(server_side, "alice", old)
        assert verifies(server_side, "alice", new)


def test_accounts_and_messages_share_one_file(db_path: Path) -> None:
    with AccountStore(db_path) as accounts:
        token = accounts.add("alice")
    with SQLiteStore(db_path) as store:
        store.append([NewMessage("alice", "bob", "hi", 1.0, None)])
    with AccountStore(db_path) as accounts:
        assert verifies(accounts, "alice", token)
    conn = open_database(db_path)
    try:
        assert schema_version(conn, ACCOUNTS_COMPONENT) == len(ACCOUNT_MIGRATIONS)
    finally:
        conn.close()


def test_the_generation_grows_with_each_change_only(db_path: Path) -> None:
    with AccountStore(db_path) as server_side, AccountStore(db_path) as cli_side:
        seen = [server_side.generation()]
        cli_side.add("alice")
        cli_side.rotate("alice")
        cli_side.remove("alice")
        seen.append(server_side.generation())
        # What changed nothing leaves it alone: a server would look up its users for nothing.
        with pytest.raises(AccountError):
            cli_side.rotate("alice")
        assert cli_side.remove("alice") is False
        seen.append(server_side.generation())
    assert seen == [0, 3, 3]


def test_token_ids_tell_the_current_token_from_a_rotated_one(accounts: AccountStore) -> None:
    old = accounts.add("alice")
    bob = accounts.add("bob")
    proved = accounts.verified_token_id("alice", old)
    assert proved is not None and proved != accounts.verified_token_id("bob", bob)
    assert accounts.verified_token_id("alice", bob) is None and accounts.verified_token_id("nobody", old) is None
    assert accounts.current_token_ids(["alice", "bob", "nobody"]) == {
        "alice": proved, "bob": accounts.verified_token_id("bob", bob)}

    new = accounts.rotate("alice")
    assert accounts.verified_token_id("alice", old) is None
    assert accounts.current_token_ids(["alice"]) == {"alice": accounts.verified_token_id("alice", new)} != {
        "alice": proved}
    accounts.remove("alice")
    assert accounts.current_token_ids(["alice"]) == {}


def test_token_ids_of_more_users_than_one_query_takes(accounts: AccountStore) -> None:
    names = [f"user{i}" for i in range(1200)]
    for name in names[::100]:
        accounts.add(name)
    assert sorted(accounts.current_token_ids(names)) == sorted(names[::100])


def test_a_database_from_before_the_generation_still_opens(db_path: Path) -> None:
    # Accounts as the first release wrote them: schema v1, no generation table.
    conn = open_component(db_path, Fsync.full, ACCOUNTS_COMPONENT, ACCOUNT_MIGRATIONS[:1])
    salt = bytes(range(16))
    with conn:
        conn.execute("INSERT INTO accounts VALUES ('alice', ?, ?, 1.0)", (salt, _token_hash(salt, "old-token")))
    conn.close()

    with AccountStore(db_path) as accounts:
        assert verifies(accounts, "alice", "old-token") and accounts.generation() == 0
        accounts.rotate("alice")
        assert accounts.generation() == 1 and not verifies(accounts, "alice", "old-token")
    conn = open_database(db_path)
    try:
        assert schema_version(conn, ACCOUNTS_COMPONENT) == len(ACCOUNT_MIGRATIONS)
    finally:
        conn.close()
