"""What a node can promise, read from Redis's own settings at start-up, and said in the log.

An acknowledged message is in Redis's memory; whether it survives depends on Redis:

============================  ==================================================================
``appendonly yes``,           survives ``kill -9`` of Redis or of any node, and a power loss
``appendfsync always``        (Redis fsyncs before it answers)
``appendfsync everysec``      survives ``kill -9`` of any node; a Redis crash or power loss can
                              lose about the last second
``appendfsync no``            the operating system decides when: an OS crash can lose ~30 s
``appendonly no``             a Redis restart loses every message (RDB snapshots, if any, keep
                              only what they caught)
============================  ==================================================================

``--redis-durability strict`` refuses to start unless it is the first row. A
``maxmemory-policy`` other than ``noeviction`` lets Redis delete keys (inboxes,
idempotency keys) silently when memory is full: the node refuses to start on one
(an evicting Redis is a cache, not a message store), whatever the durability asked.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from chatcli.errors import StorageError

__all__ = ["Guarantee", "check_guarantee", "redact"]

log = logging.getLogger("chatcli.server")


@dataclass(frozen=True, slots=True)
class Guarantee:
    appendonly: str
    appendfsync: str
    maxmemory_policy: str

    @property
    def every_write_persisted(self) -> bool:
        return self.appendonly == "yes" and self.appendfsync == "always"

    @property
    def summary(self) -> str:
        if self.every_write_persisted:
            return "an acknowledged message survives kill -9 of Redis or of any node, and a power loss"
        if self.appendonly != "yes":
            return "no AOF: a Redis restart loses messages (only RDB snapshots, if any, are kept)"
        if self.appendfsync == "everysec":
            return "appendfsync everysec: a Redis crash or power loss can lose about the last second"
        return f"appendfsync {self.appendfsync}: an operating-system crash can lose recent messages"


async def check_guarantee(client: Any, strict: bool) -> Guarantee:
    """Read Redis's persistence and eviction settings, log what they promise; raise StorageError when the
    node must not start (an evicting policy; with ``strict``, anything short of fsync on every write)."""
    from redis.exceptions import ResponseError  # this module's redact() is used without redis-py installed

    try:
        settings: dict[Any, Any] = {}
        for name in ("appendonly", "appendfsync", "maxmemory-policy"):
            settings.update(await client.config_get(name))
    except ResponseError as exc:  # managed services may disable CONFIG
        if strict:
            raise StorageError(f"--redis-durability strict: cannot read Redis's persistence settings ({exc})") from exc
        log.warning("cannot read Redis's persistence settings (%s): the durability of acknowledged messages is "
                    "unknown", exc, extra={"event": "redis-guarantee"})
        return Guarantee("unknown", "unknown", "unknown")
    values = {_text(k): _text(v) for k, v in settings.items()}
    guarantee = Guarantee(values.get("appendonly", "no"), values.get("appendfsync", "everysec"),
                          values.get("maxmemory-policy", "noeviction"))
    if guarantee.maxmemory_policy != "noeviction":
        raise StorageError(f"Redis's maxmemory-policy is {guarantee.maxmemory_policy}: Redis would delete stored "
                           "messages silently when memory runs out. Set it to noeviction "
                           "(CONFIG SET maxmemory-policy noeviction, and in redis.conf)")
    if strict and not guarantee.every_write_persisted:
        raise StorageError(f"--redis-durability strict: Redis has appendonly {guarantee.appendonly}, appendfsync "
                           f"{guarantee.appendfsync}; strict needs appendonly yes and appendfsync always")
    level = logging.INFO if guarantee.every_write_persisted else logging.WARNING
    log.log(level, "Redis persistence: appendonly %s, appendfsync %s, maxmemory-policy %s: %s",
            guarantee.appendonly, guarantee.appendfsync, guarantee.maxmemory_policy, guarantee.summary,
            extra={"event": "redis-guarantee", "appendonly": guarantee.appendonly,
                   "appendfsync": guarantee.appendfsync, "maxmemory_policy": guarantee.maxmemory_policy})
    return guarantee


def redact(url: str) -> str:
    """``url`` without its password, for logs and /healthz."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    netloc = f"{user}{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
