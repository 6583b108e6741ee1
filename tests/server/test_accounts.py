"""The accounts store, on real database files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcli.errors import AccountError, LocalProtocolError
from chatcli.server.accounts import ACCOUNTS_COMPONENT, AccountStore
from chatcli.server.storage import NewMessage, SQLiteStore, open_database, schema_version


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
def accounts(db_path: Path) -> Iterator[AccountStore]:
    with AccountStore(db_path) as opened:
        yield opened


def test_a_new_account_verifies_with_its_token_only(accounts: AccountStore) -> None:
    assert not accounts.any_accounts()
    token = accounts.add("alice")

    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    assert accounts.any_accounts()
    assert accounts.verify("alice", token)
    assert not accounts.verify("alice", token + "x")
    assert not accounts.verify("alice", "")
    assert not accounts.verify("bob", token)


def test_verify_is_false_for_names_that_are_not_user_ids(accounts: AccountStore) -> None:
    token = accounts.add("alice")
    assert not accounts.verify("../alice", token)
    assert not accounts.verify("", token)


def test_adding_an_existing_name_fails_and_keeps_the_token(accounts: AccountStore) -> None:
    token = accounts.add("alice")
    with pytest.raises(AccountError, match="already exists"):
        accounts.add("alice")
    assert accounts.verify("alice", token)


def test_names_must_be_user_ids(accounts: AccountStore) -> None:
    with pytest.raises(LocalProtocolError, match="invalid user id"):
        accounts.add("not a name")
    assert not accounts.any_accounts()


def test_rotate_replaces_the_token(accounts: AccountStore) -> None:
    old = accounts.add("alice")
    new = accounts.rotate("alice")

    assert new != old
    assert accounts.verify("alice", new)
    assert not accounts.verify("alice", old)
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
    assert not accounts.verify("bob", token)


def test_only_a_hash_of_the_token_reaches_the_file(db_path: Path) -> None:
    with AccountStore(db_path) as accounts:
        token = accounts.add("alice")
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]

    assert b"alice" in b"".join(p.read_bytes() for p in files)
    assert all(token.encode() not in p.read_bytes() for p in files)


def test_a_change_in_another_process_is_seen_at_once(db_path: Path) -> None:
    with AccountStore(db_path) as server_side, AccountStore(db_path) as cli_side:
        old = cli_side.add("alice")
        assert server_side.verify("alice", old)
        new = cli_side.rotate("alice")
        assert not server_side.verify("alice", old)
        assert server_side.verify("alice", new)


def test_accounts_and_messages_share_one_file(db_path: Path) -> None:
    with AccountStore(db_path) as accounts:
        token = accounts.add("alice")
    with SQLiteStore(db_path) as store:
        store.append([NewMessage("alice", "bob", "hi", 1.0, None)])
    with AccountStore(db_path) as accounts:
        assert accounts.verify("alice", token)
    conn = open_database(db_path)
    try:
        assert schema_version(conn, ACCOUNTS_COMPONENT) == 1
    finally:
        conn.close()
