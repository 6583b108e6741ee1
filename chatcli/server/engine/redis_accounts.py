"""Accounts kept in Redis, shared by every node: ``chatcli user add --redis URL`` and the nodes' handshakes.

The same tokens as the SQLite accounts (``chatcli.server.accounts``: a random token,
only ``HMAC-SHA256(salt, token)`` stored), in one hash, ``chatcli:accounts``: field
the user, value ``SALT:HASH:CREATED`` (hex, hex, epoch seconds). Every change also
``INCR``s ``chatcli:accounts:generation`` in the same ``MULTI``: each node polls that
one key to learn that some token changed, and closes the sessions it no longer opens.

A blocking client, on purpose: the relay checks a token within the handshake, and
reading one hash field is one short round trip. Every check reads Redis, so a token
rotated from any machine stops working on every node at once.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

import redis

from chatcli.errors import AccountError, StorageError
from chatcli.protocol import check_user_id, is_valid_user_id
from chatcli.server.accounts import _DUMMY_SALT, Account, _new_secret, _token_hash
from chatcli.server.engine.redis_lua import ACCOUNTS_GENERATION_KEY, ACCOUNTS_KEY

__all__ = ["RedisAccountStore"]

#: A handshake waits at most this long for Redis before it is refused (503).
ACCOUNT_TIMEOUT_S: Final = 2.0
#: Names per HMGET in ``current_token_ids``: one round trip each, none of them long.
_NAMES_PER_QUERY: Final = 500

_Command: TypeAlias = Callable[["redis.Redis"], Any]


class RedisAccountStore:
    """``Accounts`` (and the ``user`` commands' store) in a Redis at ``url``."""

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=ACCOUNT_TIMEOUT_S,
                                           socket_connect_timeout=ACCOUNT_TIMEOUT_S)
        self._any: bool | None = None  # the last answer of any_accounts

    def __enter__(self) -> RedisAccountStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, name: str) -> str:
        check_user_id(name)
        token, salt, token_hash = _new_secret()
        added, _ = self._call(_with_generation_bump(
            lambda r: r.hsetnx(ACCOUNTS_KEY, name, _record(salt, token_hash, time.time()))))
        if not added:
            raise AccountError(f"account {name!r} already exists (use rotate for a new token)")
        return token

    def rotate(self, name: str) -> str:
        check_user_id(name)
        old = self._call(lambda r: r.hget(ACCOUNTS_KEY, name))
        if old is None:
            raise AccountError(f"no account {name!r}")
        token, salt, token_hash = _new_secret()
        created = float(old.decode().rsplit(":", 1)[1])
        self._call(_with_generation_bump(lambda r: r.hset(ACCOUNTS_KEY, name, _record(salt, token_hash, created))))
        return token

    def remove(self, name: str) -> bool:
        check_user_id(name)
        removed, _ = self._call(_with_generation_bump(lambda r: r.hdel(ACCOUNTS_KEY, name)))
        return bool(removed)

    def list(self) -> list[Account]:
        rows = self._call(lambda r: r.hgetall(ACCOUNTS_KEY))
        return sorted((Account(name.decode(), float(value.decode().rsplit(":", 1)[1]))
                       for name, value in rows.items()), key=lambda account: account.name)

    def any_accounts(self) -> bool:
        """Whether accounts exist. While Redis is out of reach, the last answer if it was "none" (none can
        be added meanwhile), so that sessions still open and are told why their sends are refused."""
        try:
            self._any = bool(self._call(lambda r: r.hlen(ACCOUNTS_KEY)))
        except StorageError:
            if self._any is not False:
                raise
        return self._any

    def verified_token_id(self, name: str, token: str) -> bytes | None:
        """The id (stored hash) of ``name``'s current token if ``token`` is it, else None."""
        if not isinstance(token, str):
            return None
        value = self._call(lambda r: r.hget(ACCOUNTS_KEY, name)) if is_valid_user_id(name) else None
        salt, expected = _DUMMY_SALT, b""
        if value is not None:
            salt, expected = _salt_and_hash(value)
        matches = hmac.compare_digest(_token_hash(salt, token), expected) and value is not None
        return expected if matches else None

    def current_token_ids(self, names: Iterable[str]) -> dict[str, bytes]:
        """The id of each named user's current token, one HMGET per 500 names; no account, no entry."""
        wanted = list(names)
        found: dict[str, bytes] = {}
        for start in range(0, len(wanted), _NAMES_PER_QUERY):
            chunk = wanted[start:start + _NAMES_PER_QUERY]
            values = self._call(_hmget(chunk))
            found.update((name, _salt_and_hash(value)[1]) for name, value in zip(chunk, values, strict=True)
                         if value is not None)
        return found

    def generation(self) -> int:
        """A counter that grows with every add, rotate and remove from any machine: one GET."""
        return int(self._call(lambda r: r.get(ACCOUNTS_GENERATION_KEY)) or 0)

    def close(self) -> None:
        self._redis.close()

    def _call(self, command: _Command) -> Any:
        try:
            return command(self._redis)
        except redis.RedisError as exc:
            raise StorageError(f"cannot reach the accounts in Redis: {exc}") from exc


def _record(salt: bytes, token_hash: bytes, created_ts: float) -> str:
    return f"{salt.hex()}:{token_hash.hex()}:{created_ts!r}"


def _salt_and_hash(record: bytes) -> tuple[bytes, bytes]:
    salt_hex, hash_hex, _ = record.decode().split(":")
    return bytes.fromhex(salt_hex), bytes.fromhex(hash_hex)


def _hmget(names: list[str]) -> _Command:
    return lambda r: r.hmget(ACCOUNTS_KEY, names)


def _with_generation_bump(change: _Command) -> _Command:
    """``change`` and the generation's INCR in one MULTI: a node that sees the new generation sees the change.
    The result: ``[change's reply, new generation]``. (A change that changed nothing bumps it too: a node
    then looks once for nothing.)"""
    def transaction(r: redis.Redis) -> Any:
        pipe = r.pipeline(transaction=True)
        change(pipe)
        pipe.incr(ACCOUNTS_GENERATION_KEY)
        return pipe.execute()
    return transaction
