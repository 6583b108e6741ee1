"""Who is online across every node on one Redis: one sorted set with expiring entries.

Each node adds ``NODE|USER`` to the sorted set ``chatcli:online`` for every user with
a receiving session on it, scored with the time the entry stops counting
(now + ``PRESENCE_TTL_S``), and refreshes its entries every ``REFRESH_S``. A node that
dies without a word stops refreshing: its users stop counting within the TTL, and the
other nodes see that at their next read of the set (every ``REFRESH_S``), so within
``PRESENCE_TTL_S + REFRESH_S`` (12 s) in all.

The relay asks presence synchronously (``who``, ``watch`` answer within the frame), so
every node keeps a mirror: its own users, plus the other nodes' users as read from the
set and as told by their join/leave events on the ``chatcli:presence`` channel (a
connect or disconnect, not a message, so one channel for all is cheap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Set
from typing import Final

__all__ = ["PRESENCE_CHANNEL", "PRESENCE_KEY", "PRESENCE_TTL_S", "REFRESH_S", "ClusterPresence"]

PRESENCE_KEY: Final = "chatcli:online"
PRESENCE_CHANNEL: Final = "chatcli:presence"
#: An entry counts this long after its node last refreshed it (four refreshes: a slow one is forgiven).
PRESENCE_TTL_S: Final = 9.0
#: How often a node refreshes its entries and reads the whole set (and checks its subscriptions).
REFRESH_S: Final = 2.0


class ClusterPresence:
    """The ``Presence`` of one node: its own users, and a mirror of everyone else's.

    ``on_change(user, online)`` is called when a user comes or goes because of another
    node; ``on_local(user, joined)`` when this node's first session of a user opens or its
    last closes (the engine subscribes, publishes and writes the set).
    """

    def __init__(self, node: str, on_change: Callable[[str, bool], None],
                 on_local: Callable[[str, bool], None]) -> None:
        self.node = node
        self.local: set[str] = set()
        self._remote: dict[str, set[str]] = {}  # user -> the other nodes it is on
        self._online: set[str] = set()
        self._on_change = on_change
        self._on_local = on_local

    # -- Presence (what the relay calls) ---------------------------------------------------

    def joined(self, user: str) -> None:
        self.local.add(user)
        self._online.add(user)
        self._on_local(user, True)

    def left(self, user: str) -> None:
        self.local.discard(user)
        if user not in self._remote:
            self._online.discard(user)
        self._on_local(user, False)

    def is_online(self, user: str) -> bool:
        return user in self._online

    def elsewhere(self, user: str) -> bool:
        """Whether ``user`` has a receiving session on another node (live events are published for them)."""
        return user in self._remote

    def online(self) -> Set[str]:
        return self._online

    # -- what the other nodes say ---------------------------------------------------------

    def member(self, user: str) -> str:
        """This node's entry for ``user`` in the sorted set and in events."""
        return f"{self.node}|{user}"

    def on_event(self, payload: bytes) -> None:
        """Another node's event: ``+NODE|USER`` (joined) or ``-NODE|USER`` (left)."""
        text = payload.decode()
        node, _, user = text[1:].partition("|")
        if node == self.node or not user:
            return
        nodes = self._remote.setdefault(user, set())
        if text[0] == "+":
            nodes.add(node)
        else:
            nodes.discard(node)
            if not nodes:
                del self._remote[user]
        self._settle(user)

    def replace_remote(self, members: Iterable[bytes]) -> None:
        """The set as just read (live entries only): the other nodes' users, for a fresh mirror."""
        remote: dict[str, set[str]] = {}
        for member in members:
            node, _, user = member.decode().partition("|")
            if node != self.node and user:
                remote.setdefault(user, set()).add(node)
        changed = set(remote).symmetric_difference(self._remote)
        self._remote = remote
        for user in changed:
            self._settle(user)

    def _settle(self, user: str) -> None:
        online = user in self.local or user in self._remote
        if online != (user in self._online):
            if online:
                self._online.add(user)
            else:
                self._online.discard(user)
            self._on_change(user, online)
