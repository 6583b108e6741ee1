"""Presence for one process: the users with a receiving session here are the users online.

Shared by the single-process engines (memory, SQLite). A multi-node engine keeps
its own, cluster-wide, behind the same ``Presence`` protocol (``base.py``).
"""

from __future__ import annotations

from collections.abc import Set

__all__ = ["LocalPresence"]


class LocalPresence:
    """Who is online in this process, told by the relay as users' first sessions open and last close."""

    __slots__ = ("_users",)

    def __init__(self) -> None:
        self._users: set[str] = set()

    def joined(self, user: str) -> None:
        self._users.add(user)

    def left(self, user: str) -> None:
        self._users.discard(user)

    def is_online(self, user: str) -> bool:
        return user in self._users

    def online(self) -> Set[str]:
        return self._users
