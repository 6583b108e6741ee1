"""Per-user access tokens, kept in the server's database file (own table, own schema version).

A token is ``secrets.token_urlsafe(32)`` (256 random bits), shown once when it
is made. Only ``HMAC-SHA256(salt, token)`` with a random per-user salt is
stored: for a random 256-bit secret a slow password hash adds nothing but
latency, and the salt keeps equal tokens from having equal hashes.

Every call reads the file, so ``chatcli user rotate`` in another process
takes effect on the running server's next ``verify``. Every change also bumps
one counter (``generation``) in the same transaction: a running server polls
it to learn cheaply that some token changed, and then closes the sessions that
a rotated or removed token opened. The SQLite engine (``engine/sqlite.py``)
serves them to the relay as its ``Accounts``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from chatcli.errors import AccountError, StorageError
from chatcli.protocol import check_user_id, is_valid_user_id
from chatcli.server.engine.options import Fsync
from chatcli.server.storage import Migration, open_component, write_transaction

__all__ = ["ACCOUNTS_COMPONENT", "Account", "AccountStore"]

ACCOUNTS_COMPONENT: Final = "accounts"
ACCOUNT_MIGRATIONS: Final[tuple[Migration, ...]] = (
    # v1
    (
        """CREATE TABLE accounts (
            name TEXT PRIMARY KEY,
            salt BLOB NOT NULL,
            token_hash BLOB NOT NULL,
            created_ts REAL NOT NULL
        ) WITHOUT ROWID""",
    ),
    # v2: a change counter, bumped with every add, rotate and remove, polled by running servers.
    (
        "CREATE TABLE account_generation (id INTEGER PRIMARY KEY CHECK (id = 0), generation INTEGER NOT NULL)",
        "INSERT INTO account_generation (id, generation) VALUES (0, 0)",
    ),
)

TOKEN_BYTES: Final = 32
SALT_BYTES: Final = 16
# Hashed for unknown names too, so a miss takes as long as a wrong token.
_DUMMY_SALT: Final = bytes(SALT_BYTES)
#: Names per lookup in ``current_token_ids``: well under SQLite's oldest limit of 999 parameters.
_NAMES_PER_QUERY: Final = 500


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    created_ts: float  # epoch seconds


def _token_hash(salt: bytes, token: str) -> bytes:
    return hmac.new(salt, token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def _new_secret() -> tuple[str, bytes, bytes]:
    """A fresh token, its salt and its hash."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    salt = secrets.token_bytes(SALT_BYTES)
    return token, salt, _token_hash(salt, token)


class AccountStore:
    """Accounts in a chatcli database file. Not thread-safe: one call at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Account changes are rare and a token is shown only once: always fsync them.
        self._conn = open_component(path, Fsync.full, ACCOUNTS_COMPONENT, ACCOUNT_MIGRATIONS)

    def __enter__(self) -> AccountStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, name: str) -> str:
        """Create ``name``'s account; its token, the only time it is available."""
        check_user_id(name)
        token, salt, token_hash = _new_secret()
        added = self._write(
            "INSERT INTO accounts (name, salt, token_hash, created_ts) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (name, salt, token_hash, time.time()),
        )
        if not added:
            raise AccountError(f"account {name!r} already exists (use rotate for a new token)")
        return token

    def rotate(self, name: str) -> str:
        """Give ``name`` a new token; the old one opens no new session from now on."""
        check_user_id(name)
        token, salt, token_hash = _new_secret()
        changed = self._write("UPDATE accounts SET salt = ?, token_hash = ? WHERE name = ?", (salt, token_hash, name))
        if not changed:
            raise AccountError(f"no account {name!r}")
        return token

    def remove(self, name: str) -> bool:
        """Delete ``name``'s account; False if there was none."""
        check_user_id(name)
        return self._write("DELETE FROM accounts WHERE name = ?", (name,)) > 0

    def list(self) -> list[Account]:
        """Every account, by name."""
        rows = self._read("SELECT name, created_ts FROM accounts ORDER BY name", ()).fetchall()
        return [Account(name, created_ts) for name, created_ts in rows]

    def any_accounts(self) -> bool:
        return self._read("SELECT 1 FROM accounts LIMIT 1", ()).fetchone() is not None

    def verified_token_id(self, name: str, token: str) -> bytes | None:
        """The id of ``name``'s current token if ``token`` is it, else None (unknown or invalid names too).

        A token's id is its stored hash: it tells a user's successive tokens apart without revealing them.
        """
        if not isinstance(token, str):
            return None
        row = None
        if is_valid_user_id(name):
            row = self._read("SELECT salt, token_hash FROM accounts WHERE name = ?", (name,)).fetchone()
        salt, expected = row if row is not None else (_DUMMY_SALT, b"")
        # compare_digest with b"" is False; computing the hash anyway keeps the timing of a miss.
        matches = hmac.compare_digest(_token_hash(salt, token), expected) and row is not None
        return bytes(expected) if matches else None

    def current_token_ids(self, names: Iterable[str]) -> dict[str, bytes]:
        """The id of each named user's current token; names without an account are left out."""
        wanted = list(names)
        found: dict[str, bytes] = {}
        for start in range(0, len(wanted), _NAMES_PER_QUERY):
            chunk = wanted[start:start + _NAMES_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(f"SELECT name, token_hash FROM accounts WHERE name IN ({marks})", tuple(chunk))
            found.update((name, bytes(token_hash)) for name, token_hash in rows)
        return found

    def generation(self) -> int:
        """A counter that grows with every add, rotate and remove, in any process: one cheap read."""
        row = self._read("SELECT generation FROM account_generation WHERE id = 0", ()).fetchone()
        return int(row[0]) if row is not None else 0

    def close(self) -> None:
        self._conn.close()

    def _read(self, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read accounts: {exc}") from exc

    def _write(self, sql: str, params: tuple[object, ...]) -> int:
        """Run one change in its own transaction, with the generation bump that makes running servers
        look; the number of rows it changed."""
        with write_transaction(self._conn, "change accounts"):
            changed: int = self._conn.execute(sql, params).rowcount
            if changed:
                self._conn.execute("UPDATE account_generation SET generation = generation + 1 WHERE id = 0")
        return changed
