"""The Redis engine's key names and its server-side (Lua) scripts, kept apart from the code that calls them.

Keys (``docs/scaling.md`` draws the whole layout). Everything about one user lives under
the hash tag ``{u:ID}``, so a Redis Cluster, or sharding by the client, keeps a user's
keys on one node:

* ``{u:ID}:m``            meta hash: ``e`` the store epoch the inbox was made in, ``s`` the
                          inbox's sequence (messages ever added), ``c`` the user's cursor
                          (highest id acknowledged); the newest id is the inbox's last entry
* ``{u:ID}:in``           inbox stream: every message to ID, entry id ``<message id>-0``
* ``{u:ID}:p:PEER``       the ids of the messages PEER sent to ID (history reads two of these and
                          the texts from the inboxes: entry id = message id, one field ``f``)
* ``{u:ID}:k:SENDER:CID`` a client message id already committed (idempotency), with a TTL
* ``{u:ID}:c``            the users ID exchanged a message with, either way (``--presence contacts``)
* ``{u:ID}:ch``           the Pub/Sub channel of ID's new messages (one per user, never a global one)

Four keys are shared by the whole store: the epoch, the message id counter, the set
of users with an inbox, and the presence sorted set (``redis_presence.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
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
    "contacts_key",
    "idempotency_key",
    "inbox_key",
    "meta_key",
    "peer_key",
    "published_records",
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


def contacts_key(user: str) -> str:
    return f"{{u:{user}}}:c"


def idempotency_key(recipient: str, sender: str, client_id: str) -> str:
    return f"{{u:{recipient}}}:k:{sender}:{client_id}"


def channel(user: str) -> str:
    return f"{{u:{user}{_CHANNEL_SUFFIX}"


def channel_user(name: bytes) -> str:
    """The user whose channel ``name`` is (``{u:ID}:ch``)."""
    return name[3:-len(_CHANNEL_SUFFIX)].decode()


#: A tick's messages, committed by one script call: each message atomically (the whole batch, in fact),
#: with one command to parse and one AOF write (and fsync, under appendfsync always) for the batch. As
#: separate script calls in one pipeline, a batch of a few hundred messages arrived in many reads and cost
#: an fsync per read (measured: ~130 ms per 660-message batch against a few ms).
#: Per message: the original's id for a repeated client id; else the epoch if the inbox is new, the next
#: id and inbox sequence, XADD to the inbox and an id-only entry to the conversation stream ``:p:SENDER``
#: (history and unread counts need the ids; the text is read from the inbox: one copy per message), the
#: idempotency key. Then one PUBLISH per recipient of the batch, on the recipient's channel, carrying its
#: messages in order as records "id\nseq\nts\nsender\nBYTES\ntext" (user ids hold no newline; BYTES is
#: the text's length): one Pub/Sub message per recipient and batch, not per message (``published_records``).
#: Redis runs the whole cluster's commits on one core, and every string built or number formatted per
#: message shows, so each recipient's keys are built once per batch, each id and sequence formatted once,
#: and the answer is per batch, not per message. Numbers are formatted with '%d': Lua's own conversion
#: (tostring, ..) goes through '%.14g', twice the cost (measured in Redis: 0.30 against 0.15 us), and
#: writes ids from 10^14 on as '1e+14'.
#: The users' keys are derived here from the ids, as ``meta_key`` and friends do: a Redis Cluster would
#: need the batch split per slot and the keys declared (and per-user ids), see docs/scaling.md.
#: KEYS: epoch, ids, users, newest. ARGV: epoch, idempotency TTL, then per message sender, recipient,
#: text, ts, client id ('' for none). Returns {last id before the batch, {position (from 0), original id}
#: per duplicate, flattened, {recipient, inbox sequence before the batch} per recipient with a new message,
#: flattened}: the new messages took the following ids in batch order, and each recipient's the following
#: sequences (``Committed``). {-1} when the store's epoch is not ARGV[1] (wiped, e.g. FLUSHALL): nothing
#: was written.
COMMIT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
-- Counters are read once and written once per batch (not INCR/HINCRBY per message): fewer commands
-- to run and to append to the AOF. The script is atomic, so nothing can interleave.
local before = tonumber(redis.call('GET', KEYS[2]) or '0')
local format = string.format
local last_id, newest, last_ts, inboxes, order, duplicates = before, nil, nil, {}, {}, {}
for i = 3, #ARGV, 5 do
  local sender, recipient, text, ts, cid = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local prior = false
  if cid ~= '' then prior = redis.call('GET', '{u:' .. recipient .. '}:k:' .. sender .. ':' .. cid) end
  if prior then
    duplicates[#duplicates + 1] = (i - 3) / 5; duplicates[#duplicates + 1] = tonumber(prior)
  else
    local inbox = inboxes[recipient]
    if inbox == nil then  -- the recipient's first message in the batch
      local tag = '{u:' .. recipient .. '}'
      local seq = tonumber(redis.call('HGET', tag .. ':m', 's') or '0')
      if seq == 0 then  -- a new inbox: made in this store (the epoch), listed for retention and moves
        redis.call('HSET', tag .. ':m', 'e', ARGV[1])
        redis.call('SADD', KEYS[3], recipient)
      end
      inbox = {tag = tag, key = tag .. ':in', first = seq, seq = seq, records = {}, peers = {}}
      inboxes[recipient] = inbox; order[#order + 1] = recipient
    end
    last_id = last_id + 1
    inbox.seq = inbox.seq + 1
    local id, seq = format('%d', last_id), format('%d', inbox.seq)
    local entry = id .. '-0'
    redis.call('XADD', inbox.key, entry, 's', seq, 'f', sender, 't', text, 'ts', ts)
    local peer = inbox.peers[sender]
    if peer == nil then  -- contacts, both ways (--presence contacts): once per pair and batch
      peer = inbox.tag .. ':p:' .. sender
      inbox.peers[sender] = peer
      redis.call('SADD', inbox.tag .. ':c', sender)
      redis.call('SADD', '{u:' .. sender .. '}:c', recipient)
    end
    redis.call('XADD', peer, entry, 'f', sender)
    if cid ~= '' then redis.call('SET', inbox.tag .. ':k:' .. sender .. ':' .. cid, id, 'EX', ARGV[2]) end
    local records = inbox.records
    records[#records + 1] = id .. '\\n' .. seq .. '\\n' .. ts .. '\\n' .. sender .. '\\n' .. format('%d', #text)
      .. '\\n' .. text
    if ts ~= last_ts then  -- one accept time per batch as a rule: parsed only when it changes
      last_ts = ts
      if newest == nil or tonumber(ts) > tonumber(newest) then newest = ts end
    end
  end
end
local sequences = {}
if last_id ~= before then redis.call('SET', KEYS[2], format('%d', last_id)) end
for _, recipient in ipairs(order) do
  local inbox = inboxes[recipient]
  redis.call('HSET', inbox.tag .. ':m', 's', format('%d', inbox.seq))
  redis.call('PUBLISH', inbox.tag .. ':ch', table.concat(inbox.records))
  sequences[#sequences + 1] = recipient; sequences[#sequences + 1] = inbox.first
end
if newest ~= nil and tonumber(newest) > tonumber(redis.call('GET', KEYS[4]) or '0') then
  redis.call('SET', KEYS[4], newest)
end
return {before, duplicates, sequences}
"""

#: Move users' cursors forward, never back: every move of a tick in one call (a node delivering to many
#: users moves many cursors per tick; one call each cost Redis a command, and the node packing, per user).
#: KEYS: the users' meta hashes. ARGV: the acknowledged id of each, in the same order.
CURSOR: Final = """
for i, meta in ipairs(KEYS) do
  if tonumber(ARGV[i]) > tonumber(redis.call('HGET', meta, 'c') or '0') then redis.call('HSET', meta, 'c', ARGV[i]) end
end
return 0
"""


def published_records(payload: bytes) -> Iterator[tuple[int, int, float, str, str]]:
    """The messages of one published payload, in order: (id, seq, ts, sender, text).

    One regular expression match per record, and the time and sender (the same for most of a batch)
    converted only when they change: this runs for every message a node receives from another.
    """
    match = _RECORD_HEAD.match
    position, end = 0, len(payload)
    last_ts = last_sender = b""
    ts, sender = 0.0, ""
    while position < end:
        head = match(payload, position)
        if head is None:
            raise ValueError(f"not a published record at byte {position}")
        msg_id, seq, ts_bytes, sender_bytes, size = head.groups()
        if ts_bytes != last_ts:
            last_ts, ts = ts_bytes, float(ts_bytes)
        if sender_bytes != last_sender:
            last_sender, sender = sender_bytes, sender_bytes.decode()
        start = head.end()
        position = start + int(size)
        yield int(msg_id), int(seq), ts, sender, payload[start:position].decode()


#: A published record's head: "id\nseq\nts\nsender\nBYTES\n", the text's BYTES bytes follow.
_RECORD_HEAD: Final = re.compile(rb"(\d+)\n(\d+)\n([^\n]+)\n([^\n]+)\n(\d+)\n")
