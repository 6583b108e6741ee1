"""The Redis engine's key names and its server-side (Lua) scripts, kept apart from the code that calls them.

Keys (``docs/scaling.md`` draws the whole layout). Everything about one user lives under
the hash tag ``{u:ID}``, so a Redis Cluster, or sharding by the client, keeps a user's
keys on one node:

* ``{u:ID}:m``            meta hash: ``e`` the store epoch the inbox was made in, ``s`` the
                          inbox's sequence (messages ever added), ``c`` the user's cursor
                          (highest id acknowledged); the newest id is the inbox's last entry
* ``{u:ID}:in``           inbox stream: every message to ID, entry id ``<message id>-0``
* ``{u:ID}:p:PEER``       the ids of the messages PEER sent to ID (history reads two of these and
                          the texts from the inboxes): one entry per commit batch, a run of ids
                          (``run_ids``): entry id = its first message id, field ``f`` PEER, field
                          ``n`` the run's further ids, space-separated (none: a run of one, as every
                          entry written before runs is)
* ``{u:ID}:n``            hash PEER -> the ids of ``{u:ID}:p:PEER``'s runs beyond their first: its
                          messages are its length plus that (unread counts)
* ``{u:ID}:k:SENDER:CID`` a client message id already committed (idempotency), with a TTL
* ``{u:ID}:c``            the users ID exchanged a message with, either way (``--presence contacts``)
* ``{u:ID}:ch``           the Pub/Sub channel of ID's new messages (one per user, never a global one)
* ``{u:ID}:r``            read positions (issue 12): PEER -> ``<id>:<1|0>``, how far ID has read the
                          conversation with PEER and whether PEER may learn it (receipts)
* ``{u:ID}:ev``           the Pub/Sub channel of live events for ID's sessions (typing, receipts, read
                          positions): never stored, only passed on to the nodes ID is connected to

Four keys are shared by the whole store: the epoch, the message id counter, the set
of users with an inbox, and the presence sorted set (``redis_presence.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

__all__ = [
    "ACCOUNTS_GENERATION_KEY",
    "ACCOUNTS_KEY",
    "COMMIT",
    "CURSOR",
    "EPOCH_KEY",
    "IDEMPOTENCY_TTL_S",
    "IDS_KEY",
    "LAST_IDS",
    "MARK_READ",
    "NEWEST_KEY",
    "PRUNE_RUNS",
    "RUN_MAX",
    "UNREAD",
    "UNREAD_COUNT_MAX",
    "USERS_KEY",
    "channel",
    "channel_user",
    "contacts_key",
    "counts_key",
    "entry_number",
    "events_channel",
    "events_user",
    "idempotency_key",
    "inbox_key",
    "meta_key",
    "peer_key",
    "published_records",
    "reads_key",
    "run_ids",
]

EPOCH_KEY: Final = "chatcli:epoch"
IDS_KEY: Final = "chatcli:ids"
USERS_KEY: Final = "chatcli:users"
#: The newest accept time committed (per batch): a node continues from it.
NEWEST_KEY: Final = "chatcli:newest_ts"
ACCOUNTS_KEY: Final = "chatcli:accounts"
#: Bumped with every change of ACCOUNTS_KEY, in the same MULTI: nodes poll it for rotated or removed tokens.
ACCOUNTS_GENERATION_KEY: Final = "chatcli:accounts:generation"
#: How long a client message id is remembered: a client retries within minutes, not days.
IDEMPOTENCY_TTL_S: Final = 7 * 24 * 3600

_CHANNEL_SUFFIX: Final = "}:ch"
_EVENTS_SUFFIX: Final = "}:ev"
_EVENTS_SUFFIX_BYTES: Final = _EVENTS_SUFFIX.encode()


def meta_key(user: str) -> str:
    return f"{{u:{user}}}:m"


def inbox_key(user: str) -> str:
    return f"{{u:{user}}}:in"


def peer_key(user: str, peer: str) -> str:
    """The messages ``peer`` sent to ``user``."""
    return f"{{u:{user}}}:p:{peer}"


def counts_key(user: str) -> str:
    return f"{{u:{user}}}:n"


def contacts_key(user: str) -> str:
    return f"{{u:{user}}}:c"


def idempotency_key(recipient: str, sender: str, client_id: str) -> str:
    return f"{{u:{recipient}}}:k:{sender}:{client_id}"


def channel(user: str) -> str:
    return f"{{u:{user}{_CHANNEL_SUFFIX}"


def channel_user(name: bytes) -> str:
    """The user whose channel ``name`` is (``{u:ID}:ch``, or ``{u:ID}:ev``: the suffixes have one length)."""
    return name[3:-len(_CHANNEL_SUFFIX)].decode()


def reads_key(user: str) -> str:
    return f"{{u:{user}}}:r"


def events_channel(user: str) -> str:
    return f"{{u:{user}{_EVENTS_SUFFIX}"


def events_user(name: bytes) -> str | None:
    """The user whose live-events channel ``name`` is, or None for another channel."""
    return name[3:-len(_EVENTS_SUFFIX)].decode() if name.endswith(_EVENTS_SUFFIX_BYTES) else None


#: A tick's messages, committed by one script call: each message atomically (the whole batch, in fact),
#: with one command to parse and one AOF write (and fsync, under appendfsync always) for the batch. As
#: separate script calls in one pipeline, a batch of a few hundred messages arrived in many reads and cost
#: an fsync per read (measured: ~130 ms per 660-message batch against a few ms).
#: Per message: the original's id for a repeated client id; else the epoch if the inbox is new, the next
#: id and inbox sequence, XADD to the inbox, the idempotency key. Per recipient and sender of the batch,
#: one entry of the conversation stream ``:p:SENDER`` holding the run of their ids (history and unread
#: counts need the ids; the text is read from the inbox: one copy per message), and its count: an entry
#: per message cost Redis 1.4 us a message, a quarter of the script (``benchmarks/redis_commit_parts.py``).
#: Then one PUBLISH per recipient of the batch, on the recipient's channel, carrying its
#: messages in order as records "\xffid\xffseq\xffts\xffsender\xfftext" (byte 0xFF is never in UTF-8, so
#: nothing in a record holds it and the node splits the payload in one call: ~0.4 us a message less than
#: a length-prefixed text read record by record; a reply's seq is "SEQ REPLY_ID", so that the format and
#: its cost are unchanged for every other message): one Pub/Sub message per recipient and batch, not per
#: message (``published_records``).
#: Redis runs the whole cluster's commits on one core, and every string built or number formatted per
#: message shows, so each recipient's keys are built once per batch, each id and sequence formatted once,
#: and the answer is per batch, not per message. Numbers are formatted with '%d': Lua's own conversion
#: (tostring, ..) goes through '%.14g', twice the cost (measured in Redis: 0.30 against 0.15 us), and
#: writes ids from 10^14 on as '1e+14'.
#: The users' keys are derived here from the ids, as ``meta_key`` and friends do: a Redis Cluster would
#: need the batch split per slot and the keys declared (and per-user ids), see docs/scaling.md.
#: Replies (issue 13): a message with a reply id is refused unless that id is in one of the two streams of
#: its conversation (``{u:R}:p:S``, ``{u:S}:p:R``), or went to that conversation earlier in the batch (its
#: run is written at the end); a kept reply carries it as the inbox field ``r``. The
#: reply ids come apart from the messages, as "POSITION ID ..." (positions in the batch from 0; '' for
#: none, the rule), so that a batch without replies costs nothing more per message.
#: KEYS: epoch, ids, users, newest. ARGV: epoch, idempotency TTL, the reply ids, then per message sender,
#: recipient, text, ts, client id ('' for none). Returns {last id before the batch, {position (from 0),
#: original id} per duplicate, flattened, {recipient, inbox sequence before the batch} per recipient with a
#: new message, flattened, {position} per refused reply}: the new messages took the following ids in batch
#: order, and each recipient's the following sequences. {-1} when the store's epoch is not ARGV[1] (wiped,
#: e.g. FLUSHALL): nothing was written.
#: Ids in one conversation-stream entry at most: what a read of an entry costs stays small (a sender's burst
#: to one recipient can put thousands of messages in one batch); a seed load's batch has 5-15 per pair.
RUN_MAX: Final = 32
COMMIT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
-- Counters are read once and written once per batch (not INCR/HINCRBY per message): fewer commands
-- to run and to append to the AOF. The script is atomic, so nothing can interleave.
local before = tonumber(redis.call('GET', KEYS[2]) or '0')
local format = string.format
local last_id, newest, last_ts, inboxes, order, duplicates, refused = before, nil, nil, {}, {}, {}, {}
local replies = {}
for position, reply in string.gmatch(ARGV[3], '(%d+) (%d+)') do replies[4 + 5 * tonumber(position)] = reply end
-- One conversation entry per pair and batch (up to RUN_MAX ids): its first id, then 'n' the others; the ids
-- beyond entries' firsts are counted in {u:ID}:n (the stream's messages: its length plus that).
local RUN_MAX = {run_max}
local function write_run(tag, run)
  local key, sender = tag .. ':p:' .. run.sender, run.sender
  if #run == 1 then
    redis.call('XADD', key, run[1] .. '-0', 'f', sender)
  else
    redis.call('XADD', key, run[1] .. '-0', 'f', sender, 'n', table.concat(run, ' ', 2))
    redis.call('HINCRBY', tag .. ':n', sender, #run - 1)
  end
end
-- Replies only: which conversation each message of this batch went to (its run is written at the end).
local batch_pairs = (ARGV[3] ~= '') and {} or nil
local function in_stream(key, reply)  -- the run of the stream ``key`` that holds ``reply``, if any
  local entry = redis.call('XREVRANGE', key, reply .. '-0', '-', 'COUNT', 1)[1]
  if entry == nil then return false end
  if string.match(entry[1], '^(%d+)') == reply then return true end
  local fields = entry[2]
  for k = 1, #fields, 2 do
    if fields[k] == 'n' then return string.find(' ' .. fields[k + 1] .. ' ', ' ' .. reply .. ' ', 1, true) ~= nil end
  end
  return false
end
local function in_conversation(a, b, reply)  -- the message replied to lies between a and b, either way
  local pair = batch_pairs[reply]
  if pair then return pair == a .. '\\255' .. b or pair == b .. '\\255' .. a end
  return in_stream('{u:' .. a .. '}:p:' .. b, reply) or in_stream('{u:' .. b .. '}:p:' .. a, reply)
end
for i = 4, #ARGV, 5 do
  local sender, recipient, text, ts, cid = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local reply = replies[i]
  local prior = false
  if cid ~= '' then prior = redis.call('GET', '{u:' .. recipient .. '}:k:' .. sender .. ':' .. cid) end
  if prior then
    duplicates[#duplicates + 1] = (i - 4) / 5; duplicates[#duplicates + 1] = tonumber(prior)
  elseif reply and not in_conversation(recipient, sender, reply) then
    refused[#refused + 1] = (i - 4) / 5
  else
    local inbox = inboxes[recipient]
    if inbox == nil then  -- the recipient's first message in the batch
      local tag = '{u:' .. recipient .. '}'
      local seq = tonumber(redis.call('HGET', tag .. ':m', 's') or '0')
      if seq == 0 then  -- a new inbox: made in this store (the epoch), listed for retention and moves
        redis.call('HSET', tag .. ':m', 'e', ARGV[1])
        redis.call('SADD', KEYS[3], recipient)
      end
      inbox = {tag = tag, key = tag .. ':in', first = seq, seq = seq, records = {}, peers = {}, runs = {}}
      inboxes[recipient] = inbox; order[#order + 1] = recipient
    end
    last_id = last_id + 1
    inbox.seq = inbox.seq + 1
    local id, seq = format('%d', last_id), format('%d', inbox.seq)
    local entry = id .. '-0'
    local head = seq
    if not reply then
      redis.call('XADD', inbox.key, entry, 's', seq, 'f', sender, 't', text, 'ts', ts)
    else
      redis.call('XADD', inbox.key, entry, 's', seq, 'f', sender, 't', text, 'ts', ts, 'r', reply)
      head = seq .. ' ' .. reply
    end
    local run = inbox.peers[sender]
    if run == nil then  -- contacts, both ways (--presence contacts): once per pair and batch
      run = {sender = sender}
      inbox.peers[sender] = run; inbox.runs[#inbox.runs + 1] = run
      redis.call('SADD', inbox.tag .. ':c', sender)
      redis.call('SADD', '{u:' .. sender .. '}:c', recipient)
    end
    run[#run + 1] = id
    if #run == RUN_MAX then  -- a full run is written now; the pair's next id starts another
      write_run(inbox.tag, run)
      local fresh = {sender = sender}
      inbox.peers[sender] = fresh; inbox.runs[#inbox.runs + 1] = fresh
    end
    if batch_pairs then batch_pairs[id] = recipient .. '\\255' .. sender end
    if cid ~= '' then redis.call('SET', inbox.tag .. ':k:' .. sender .. ':' .. cid, id, 'EX', ARGV[2]) end
    local records = inbox.records
    records[#records + 1] = '\\255' .. id .. '\\255' .. head .. '\\255' .. ts .. '\\255' .. sender .. '\\255' .. text
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
  for _, run in ipairs(inbox.runs) do
    if #run > 0 and #run < RUN_MAX then write_run(inbox.tag, run) end  -- (a full one is written already)
  end
  redis.call('PUBLISH', inbox.tag .. ':ch', table.concat(inbox.records))
  sequences[#sequences + 1] = recipient; sequences[#sequences + 1] = inbox.first
end
if newest ~= nil and tonumber(newest) > tonumber(redis.call('GET', KEYS[4]) or '0') then
  redis.call('SET', KEYS[4], newest)
end
return {before, duplicates, sequences, refused}
""".replace("{run_max}", str(RUN_MAX))

#: Move users' cursors forward, never back: every move of a tick in one call (a node delivering to many
#: users moves many cursors per tick; one call each cost Redis a command, and the node packing, per user).
#: KEYS: the users' meta hashes. ARGV: the acknowledged id of each, in the same order.
CURSOR: Final = """
for i, meta in ipairs(KEYS) do
  if tonumber(ARGV[i]) > tonumber(redis.call('HGET', meta, 'c') or '0') then redis.call('HSET', meta, 'c', ARGV[i]) end
end
return 0
"""


# -- read positions and the inbox (issue 12) -------------------------------------------------------------

#: Move one user's read positions up, never down, and never past the highest id given out (a client's
#: id is not trusted beyond it). Only conversations that exist are kept: a peer the user never exchanged
#: a message with (not in their contacts) keeps nothing (position 0), so the hash is bounded by the
#: contacts, not by what a client makes up. One call per user and tick. KEYS: the user's read hash, the
#: id counter, the user's contacts. ARGV: per conversation peer, id, receipt flag (1/0; latest wins).
#: Returns the position now kept per conversation, as strings (ids compared as numbers, written as
#: given: no float formatting).
MARK_READ: Final = """
local top = redis.call('GET', KEYS[2]) or '0'
local out = {}
for i = 1, #ARGV, 3 do
  local peer, wanted = ARGV[i], ARGV[i + 1]
  if redis.call('SISMEMBER', KEYS[3], peer) == 0 then
    wanted = '0'
  else
    if tonumber(wanted) > tonumber(top) then wanted = top end
    local now = string.match(redis.call('HGET', KEYS[1], peer) or '0:1', '^(%d+)')
    if tonumber(now) > tonumber(wanted) then wanted = now end
    redis.call('HSET', KEYS[1], peer, wanted .. ':' .. ARGV[i + 2])
  end
  out[#out + 1] = wanted
end
return out
"""

#: Lua shared by the scripts that read conversation runs: a run entry's message ids, as strings, ascending
#: (its own id, then field ``n``'s; ``run_ids`` below is the same in Python).
_RUN_IDS: Final = """
local function run_ids(entry)
  local ids = {string.match(entry[1], '^(%d+)')}
  local fields = entry[2]
  for k = 1, #fields, 2 do
    if fields[k] == 'n' then for id in string.gmatch(fields[k + 1], '%d+') do ids[#ids + 1] = id end end
  end
  return ids
end
"""

#: Unread messages counted per conversation at most this far from either end (see ``UNREAD``).
UNREAD_COUNT_MAX: Final = 100

#: One conversation's read position and unread count for the inbox, without reading its history: the
#: messages PEER sent to the user are the stream ``{u:ID}:p:PEER``, runs of ids (``run_ids``); their number
#: is the stream's length plus the ids beyond each run's first, kept in ``{u:ID}:n``. Nothing read (a
#: position before the first run) is that number, everything read (at or after the last id) is 0; otherwise
#: the ids after the position are counted, reading ``UNREAD_COUNT_MAX`` runs at most; past that the ids up to it are
#: counted (unread = the number minus them), and only when both sides hold more than ``UNREAD_COUNT_MAX``
#: runs is the answer that bound (a lower bound: "100 or more"). At most 2 x 100 entries read per
#: conversation, whatever its length. KEYS: that stream, the user's read hash, the user's counts. ARGV:
#: the peer, ``UNREAD_COUNT_MAX``. Returns {position, unread}.
UNREAD: Final = _RUN_IDS + """
local position = string.match(redis.call('HGET', KEYS[2], ARGV[1]) or '0:1', '^(%d+)')
local pos = tonumber(position)
local function count_above(ids)  -- how many of a run's ids are after the position
  local n = 0
  for _, id in ipairs(ids) do if tonumber(id) > pos then n = n + 1 end end
  return n
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last == nil then return {position, 0} end
local last_ids = run_ids(last)
if pos >= tonumber(last_ids[#last_ids]) then return {position, 0} end
local total = redis.call('XLEN', KEYS[1]) + tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local holding = redis.call('XREVRANGE', KEYS[1], position .. '-0', '-', 'COUNT', 1)[1]
if holding == nil then return {position, total} end
local bound = tonumber(ARGV[2])
local newer = redis.call('XRANGE', KEYS[1], '(' .. position .. '-0', '+', 'COUNT', bound)
local above = count_above(run_ids(holding))
if #newer < bound then
  for _, entry in ipairs(newer) do above = above + #run_ids(entry) end
  return {position, above}
end
local older = redis.call('XRANGE', KEYS[1], '-', position .. '-0', 'COUNT', bound)
if #older < bound then
  local upto = -above
  for _, entry in ipairs(older) do upto = upto + #run_ids(entry) end
  return {position, total - upto}
end
return {position, bound}
"""

#: The newest message id of each stream ('' for an empty or missing stream): an inbox's last entry id, a
#: conversation stream's last run's last id. The inbox orders conversations by these without sending texts
#: over the network. KEYS: the streams.
LAST_IDS: Final = """
local out = {}
for i, key in ipairs(KEYS) do
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if newest == nil then
    out[i] = ''
  else
    out[i] = string.match(newest[1], '^(%d+)')
    local fields = newest[2]
    for k = 1, #fields, 2 do
      if fields[k] == 'n' then out[i] = string.match(fields[k + 1], '(%d+)$') end
    end
  end
end
return out
"""

#: Take what retention pruned off one conversation stream: each run whose ids are all gone (pruned now, or by
#: an earlier pass: no longer in the inbox) is deleted, and the stream's count (its length plus
#: ``{u:ID}:n``) drops by the ids pruned now, whether their run goes or stays (a run partly pruned stays until
#: the rest of it goes; history and search pass over its pruned ids, which have no text in the inbox).
#: KEYS: the stream, the recipient's counts, the recipient's inbox (pruned already). ARGV: the sender, then
#: the ids pruned, ascending.
PRUNE_RUNS: Final = _RUN_IDS + """
local pruned = {}
for i = 2, #ARGV do pruned[ARGV[i]] = true end
local extra = 0  -- the change to {u:ID}:n
-- Bounded: the runs that hold pruned ids, and a few left partly pruned by a pass before (retention prunes the
-- oldest first: one such run per conversation, as a rule); more go at the next pass.
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', ARGV[#ARGV] .. '-0', 'COUNT', #ARGV + 16)) do
  local now, whole = 0, true
  for _, id in ipairs(run_ids(entry)) do
    if pruned[id] then now = now + 1 elseif whole and #redis.call('XRANGE', KEYS[3], id .. '-0', id .. '-0') > 0 then
      whole = false
    end
  end
  if whole then  -- the entry goes: the length counts one of the ids pruned now
    redis.call('XDEL', KEYS[1], entry[1])
    extra = extra - (now - 1)
  else
    extra = extra - now
  end
end
if extra ~= 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], extra) end
return 0
"""


def entry_number(entry_id: bytes) -> int:
    """The message id of an entry id: every entry of the inboxes and conversation streams is ``<id>-0``."""
    return int(entry_id[:-2])


def run_ids(entry_id: bytes, fields: dict[bytes, bytes]) -> list[int]:
    """The message ids of one conversation-stream entry, ascending: its own, then field ``n``'s."""
    first = entry_number(entry_id)
    more = fields.get(b"n")
    return [first, *map(int, more.split())] if more else [first]


def published_records(payload: bytes) -> Iterator[tuple[int, int, float, str, int | None, str]]:
    """The messages of one published payload, in order: (id, seq, ts, sender, reply_to, text).

    One split for the payload, and the time and sender (the same for most of a batch) converted only when
    they change: this runs for every message a node receives from another. A payload of a node before
    this format ("id\nseq\nts\nsender\nBYTES\ntext" records) is read too, for a cluster being upgraded.
    """
    if not payload.startswith(_MARK):
        yield from _length_prefixed_records(payload)
        return
    parts = payload.split(_MARK)
    if (len(parts) - 1) % 5:
        raise ValueError(f"not a whole number of published records: {len(parts) - 1} fields")
    last_ts = last_sender = b""
    ts, sender = 0.0, ""
    for at in range(1, len(parts), 5):
        msg_id, head, ts_bytes, sender_bytes, text = parts[at:at + 5]
        seq, _, reply_to = head.partition(b" ")
        if ts_bytes != last_ts:
            last_ts, ts = ts_bytes, float(ts_bytes)
        if sender_bytes != last_sender:
            last_sender, sender = sender_bytes, sender_bytes.decode()
        yield int(msg_id), int(seq), ts, sender, int(reply_to) if reply_to else None, text.decode()


_MARK: Final = b"\xff"


def _length_prefixed_records(payload: bytes) -> Iterator[tuple[int, int, float, str, int | None, str]]:
    """``published_records`` for the format before (nodes being upgraded): one match per record."""
    position, end = 0, len(payload)
    while position < end:
        head = _RECORD_HEAD.match(payload, position)
        if head is None:
            raise ValueError(f"not a published record at byte {position}")
        msg_id, seq, reply_to, ts, sender, size = head.groups()
        start = head.end()
        position = start + int(size)
        yield int(msg_id), int(seq), float(ts), sender.decode(), int(reply_to) if reply_to else None, \
            payload[start:position].decode()


#: A record's head in the format before: "id\nseq\nts\nsender\nBYTES\n" (a reply's seq: "SEQ REPLY_ID"), the
#: text's BYTES bytes follow.
_RECORD_HEAD: Final = re.compile(rb"(\d+)\n(\d+)(?: (\d+))?\n([^\n]+)\n([^\n]+)\n(\d+)\n")
