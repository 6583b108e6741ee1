"""Engine settings named on the command line, in a module with no imports of its own.

``chatcli.cli`` builds its ``--fsync`` choices from ``Fsync`` at import time, and
``chatcli send`` must start fast: this module costs nothing beyond ``enum``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Fsync", "RedisDurability"]


class Fsync(StrEnum):
    """How hard the SQLite engine pushes a commit to disk (``PRAGMA synchronous``).

    The one declaration of the choices: the CLI, ``ServerConfig`` and the storage use it.
    """

    #: Every committed batch survives a crash of the process (kill -9).
    normal = "normal"
    #: ... and a power loss too, at the price of an fsync per commit.
    full = "full"


class RedisDurability(StrEnum):
    """What a Redis node requires of Redis's persistence before it starts (``--redis-durability``)."""

    #: Start whatever Redis persists, and log what that guarantees.
    relaxed = "relaxed"
    #: Refuse to start unless Redis fsyncs every write before answering (appendonly yes, appendfsync always).
    strict = "strict"
