"""Values both wire protocols share: limits, stable codes, user ids, texts, timestamps, handshake names.

The room below the frames: ``v1`` and ``legacy`` build on it, and the server's
admission reads the handshake names and ``parse_user_path`` before it knows
which protocol a session speaks. Pure: no I/O.

The stable codes are ``StrEnum``s: a member *is* its string, so it goes into
JSON as the bare value and compares equal to the plain string a parser read
off the wire (``Status.DELIVERED == "delivered"``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final
from urllib.parse import parse_qsl, unquote

from chatcli.errors import InvalidUserId, LocalProtocolError

__all__ = [
    "DEFAULT_AUTH_KEY",
    "DEFAULT_MAX_TEXT_BYTES",
    "EPOCH_HEADER",
    "EPOCH_RULE",
    "FRAME_OVERHEAD_BYTES",
    "MAX_INT",
    "RECEIVE_HEADER",
    "REPLAY_SINCE_HEADER",
    "RESUME_AFTER_HEADER",
    "TOKEN_QUERY_PARAM",
    "USER_ID_MAX_LEN",
    "USER_ID_RULE",
    "ErrorCode",
    "Feature",
    "Reason",
    "Status",
    "check_text",
    "check_user_id",
    "format_ts",
    "is_unicode",
    "is_valid_epoch",
    "is_valid_user_id",
    "parse_ts",
    "parse_user_path",
    "text_size",
]

DEFAULT_MAX_TEXT_BYTES: Final = 64 * 1024
#: Room for the JSON envelope around a maximal text; frames beyond it are closed with 1009.
FRAME_OVERHEAD_BYTES: Final = 4 * 1024
#: The largest integer a frame may carry (ids, cursors, limits): SQLite's INTEGER range, where the server keeps
#: them. A larger one would reach the store and fail there, after the frame was accepted.
MAX_INT: Final = 2**63 - 1
#: The seed's shared key, the default so that unchanged apps keep working.
DEFAULT_AUTH_KEY: Final = "addauthkeyifrequired"

# ---------------------------------------------------------------------------
# Handshake names
# ---------------------------------------------------------------------------

#: Query parameter carrying a user's token for clients that cannot set headers (the seed app's URL).
TOKEN_QUERY_PARAM: Final = "token"
#: Handshake header of a session that only sends or asks (``send``, ``history``): with the value
#: ``none`` it receives no messages and does not count as its user being online.
RECEIVE_HEADER: Final = "Chatcli-Receive"
#: Handshake header of a native client resuming after the last message id it handled.
RESUME_AFTER_HEADER: Final = "Chatcli-After"
#: Handshake header asking for a replay of the messages since an ISO 8601 time.
REPLAY_SINCE_HEADER: Final = "Chatcli-Since"
#: Handshake header naming the message store a ``Chatcli-After`` id came from (``hello.epoch``): a cursor
#: from another store must not skip this store's messages.
EPOCH_HEADER: Final = "Chatcli-Epoch"

# ---------------------------------------------------------------------------
# Stable codes
# ---------------------------------------------------------------------------


class Feature(StrEnum):
    """Capabilities a server announces in ``hello.features``."""

    STORE = "store"  # offline recipients' messages are stored; acks may say "stored"
    RESUME = "resume"  # the Chatcli-After / Chatcli-Since headers and the "received" frame
    HISTORY = "history"  # the "history" request
    PRESENCE = "presence"  # the "who" request and "watch" / "presence" frames
    TOKENS = "tokens"  # per-user accounts: sessions proved their user with a token
    # The chat experience (issue 12):
    READS = "reads"  # read positions kept per user and conversation, and the "inbox" request (needs storage)
    RECEIPTS = "receipts"  # a "read" is passed on to the peer as a "receipt"
    TYPING = "typing"  # "typing" is passed on to an online recipient
    # issue 13: scriptable chat
    REPLIES = "replies"  # send.reply_to is checked and kept; message.reply_to carries it
    SEARCH = "search"  # the "search" request


class Status(StrEnum):
    """Values of an ack's ``status``."""

    DELIVERED = "delivered"  # handed to at least one open session of the recipient
    STORED = "stored"  # kept for a recipient who is offline (durable servers)
    REFUSED = "refused"  # not accepted; ``reason`` says why


class Reason(StrEnum):
    """Stable codes of a refused ack's ``reason``."""

    OFFLINE = "offline"  # recipient has no open session and the server stores nothing
    TOO_LARGE = "too-large"
    EMPTY = "empty"
    BAD_AUTH = "bad-auth"
    BAD_RECIPIENT = "bad-recipient"
    RATE_LIMITED = "rate-limited"
    STORAGE_FAILED = "storage-failed"  # the server could not commit the message; nothing was stored
    BAD_REPLY = "bad-reply"  # reply_to names no message of this conversation that the sender can see
    UNAVAILABLE = "unavailable"  # the shared store (Redis) is out of reach for now; nothing was stored


class ErrorCode(StrEnum):
    """Stable codes of the ``error`` frame."""

    BAD_JSON = "bad-json"
    BAD_FRAME = "bad-frame"
    UNKNOWN_TYPE = "unknown-type"
    BINARY_UNSUPPORTED = "binary-unsupported"
    UNAVAILABLE = "unavailable"  # the request needs a feature this server runs without (e.g. history)
    RATE_LIMITED = "rate-limited"  # the user asks faster than --rate / --burst allow (who, history, watch)


# ---------------------------------------------------------------------------
# User ids and store identities
# ---------------------------------------------------------------------------

USER_ID_MAX_LEN: Final = 64
USER_ID_RULE: Final = "1-64 characters from A-Z a-z 0-9 . _ - @, starting with a letter or digit"
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")


EPOCH_RULE: Final = "1-64 characters from A-Z a-z 0-9 . _ -"
_EPOCH = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


def is_valid_epoch(value: object) -> bool:
    """A store's identity as the server announces it: opaque, but safe to echo in a header or a file."""
    return isinstance(value, str) and _EPOCH.match(value) is not None


def is_valid_user_id(value: object) -> bool:
    return isinstance(value, str) and _USER_ID.match(value) is not None


def check_user_id(value: object) -> str:
    """Return ``value`` if it is a valid user id, else raise ``LocalProtocolError``."""
    if not is_valid_user_id(value):
        raise LocalProtocolError(f"invalid user id {value!r}: use {USER_ID_RULE}")
    return value  # type: ignore[return-value]


def parse_user_path(target: str) -> tuple[str, dict[str, str]]:
    """Split a WebSocket request target into the user id and the query parameters.

    The id is the path without its leading ``/``, percent-decoded; the query
    string is reserved for credentials and is never part of the id.
    """
    path, _, query = target.partition("?")
    raw = path[1:] if path.startswith("/") else path
    try:
        user = unquote(raw, errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:  # e.g. /%ff: the bytes are not UTF-8, so no id could match
        raise InvalidUserId(f"invalid user id {raw[:80]!r}: use {USER_ID_RULE}") from None
    if not user:
        raise InvalidUserId(f"no user id in the URL: connect to /<your-id>, with {USER_ID_RULE}")
    if not is_valid_user_id(user):
        raise InvalidUserId(f"invalid user id {user[:80]!r}: use {USER_ID_RULE}")
    return user, dict(parse_qsl(query)) if query else {}


# ---------------------------------------------------------------------------
# Texts and timestamps
# ---------------------------------------------------------------------------


def is_unicode(text: str) -> bool:
    """False for strings with lone surrogates (JSON ``\\ud800`` escapes), which are not Unicode text: they
    cannot be stored, encoded or sent on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_size(text: str) -> int:
    """Size of a text in bytes as UTF-8, the unit of every text limit."""
    # A character is at most 4 bytes: skip the encoding when even that fits.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_text(text: str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Reason | None:
    """The refusal reason for a message text, or ``None`` when it is acceptable."""
    if not text:
        return Reason.EMPTY
    if len(text) > max_bytes or (len(text) * 4 > max_bytes and text_size(text) > max_bytes):
        return Reason.TOO_LARGE
    return None


def format_ts(epoch_seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T19:34:47.123Z``."""
    global _last_ts  # a one-entry cache, see _last_ts
    last_epoch, last_text = _last_ts
    if epoch_seconds == last_epoch:
        return last_text
    # isoformat truncates to milliseconds as ``microsecond // 1000`` did, and costs 1.6 µs against strftime's
    # 2.5; [:23] drops its "+00:00".
    text = datetime.fromtimestamp(epoch_seconds, UTC).isoformat(timespec="milliseconds")[:23] + "Z"
    _last_ts = (epoch_seconds, text)
    return text


#: The last timestamp formatted. The server stamps a whole commit batch with one time, and formats it once
#: per ack and per delivery: most calls repeat the previous one. One tuple, swapped in one assignment, so a
#: reader on another thread (replay pages are encoded on the storage thread) sees a matching pair.
_last_ts: tuple[float, str] = (float("nan"), "")


def parse_ts(value: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp with a zone (``Z`` or an offset)."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as exc:
        raise LocalProtocolError(f"invalid timestamp {value!r}") from exc
    if moment.tzinfo is None:
        raise LocalProtocolError(f"timestamp without a zone: {value!r}")
    return moment.timestamp()
