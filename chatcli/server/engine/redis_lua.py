"""The Redis engine's key names and its server-side (Lua) scripts, kept apart from the code that calls them.

Keys (``docs/scaling.md`` draws the whole layout). Everything about one user lives under
the hash tag ``{u:ID}``, so a Redis Cluster, or sharding by the client, keeps a user's
keys on one node:

* ``{u:ID}:m``            meta hash: ``e`` the store epoch the inbox was made in, ``s`` the
                          inbox's sequence (messages ever added), ``top`` its newest message id,
                          ``c`` the user's cursor (highest id acknowledged)
* ``{u:ID}:in``           inbox stream: every message to ID, entry id ``<message id>-0``
* ``{u:ID}:p:PEER``       the messages PEER sent to ID (history reads two of these)
* ``{u:ID}:k:SENDER:CID`` a client message id already committed (idempotency), with a TTL
* ``{u:ID}:ch``           the Pub/Sub channel of ID's new messages (one per user, never a global one)

Four keys are shared by the whole store: the epoch, the message id counter, the set
of users with an inbox, and the presence sorted set (``redis_presence.py``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACCOUNTS_KEY",
    "COMMIT",
    "CURSOR",
    "EPOCH_KEY",
    "IDEMPOTENCY_TTL_S",
    "IDS_KEY",
    "NEWEST_KEY",
    "USERS_KEY",
    "channel",
    "channel_user",
    "idempotency_key",
    "inbox_key",
    "meta_key",
    "peer_key",
]

EPOCH_KEY: Final = "chatcli:epoch"
IDS_KEY: Final = "chatcli:ids"
USERS_KEY: Final = "chatcli:users"
#: The newest accept time committed (per batch): a node continues from it.
NEWEST_KEY: Final = "chatcli:newest_ts"
ACCOUNTS_KEY: Final = "chatcli:accounts"
#: How long a client message id is remembered: a client retries within minutes, not days.
IDEMPOTENCY_TTL_S: Final = 7 * 24 * 3600

_CHANNEL_SUFFIX: Final = "}:ch"


def meta_key(user: str) -> str:
    return f"{{u:{user}}}:m"


def inbox_key(user: str) -> str:
    return f"{{u:{user}}}:in"


def peer_key(user: str, peer: str) -> str:
    """The messages ``peer`` sent to ``user``."""
    return f"{{u:{user}}}:p:{peer}"


def idempotency_key(recipient: str, sender: str, client_id: str) -> str:
    return f"{{u:{recipient}}}:k:{sender}:{client_id}"


def channel(user: str) -> str:
    return f"{{u:{user}{_CHANNEL_SUFFIX}"


def channel_user(name: bytes) -> str:
    """The user whose channel ``name`` is (``{u:ID}:ch``)."""
    return name[3:-len(_CHANNEL_SUFFIX)].decode()


#: One message's commit, atomic. KEYS: epoch, ids, users, meta, inbox, peer, idempotency.
#: ARGV: epoch, sender, recipient, text, ts, client id ('' for none), idempotency TTL, channel.
#: Returns {id, duplicate (0/1), seq}; {-1, 0, 0} when the store's epoch is not ARGV[1] (wiped,
#: e.g. FLUSHALL): the node must learn the new store before committing anything into it.
#: The published payload is "id\nseq\nts\nsender\ntext" (user ids hold no newline; the text is last).
COMMIT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, 0, 0} end
local cid = ARGV[6]
if cid ~= '' then
  local prior = redis.call('GET', KEYS[7])
  if prior then return {tonumber(prior), 1, 0} end
end
local id = redis.call('INCR', KEYS[2])
if redis.call('HSETNX', KEYS[4], 'e', ARGV[1]) == 1 then redis.call('SADD', KEYS[3], ARGV[3]) end
local seq = redis.call('HINCRBY', KEYS[4], 's', 1)
redis.call('HSET', KEYS[4], 'top', id)
local entry = id .. '-0'
redis.call('XADD', KEYS[5], entry, 's', seq, 'f', ARGV[2], 't', ARGV[4], 'ts', ARGV[5])
redis.call('XADD', KEYS[6], entry, 'f', ARGV[2], 't', ARGV[4], 'ts', ARGV[5])
if cid ~= '' then redis.call('SET', KEYS[7], id, 'EX', ARGV[7]) end
redis.call('PUBLISH', ARGV[8], id .. '\\n' .. seq .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[4])
return {id, 0, seq}
"""

#: Move a user's cursor forward, never back. KEYS: meta. ARGV: the acknowledged id.
CURSOR: Final = """
local now = tonumber(redis.call('HGET', KEYS[1], 'c') or '0')
if tonumber(ARGV[1]) > now then redis.call('HSET', KEYS[1], 'c', ARGV[1]) end
return 0
"""
