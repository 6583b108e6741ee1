"""``chatcli.v1``, the native protocol: frozen frame objects that check themselves, parsed and encoded side by side.

Negotiated as the WebSocket subprotocol ``chatcli.v1``: JSON text frames, one
object each, with a ``type`` field. Each frame class has ``from_dict`` (the
peer's object → a checked frame) beside ``to_dict`` (the frame → the object
``encode`` serialises), as websockets' ``Frame.parse`` / ``serialize``.
``parse_client_frame`` and ``parse_server_frame`` pick the class from a table
by ``type`` and direction (``history``, ``who``, ``read``, ``typing`` and ``inbox`` name a
request and what the server sends).
Pure: no I/O.

Compatibility rules (so later features need no v2): unknown fields are
ignored, unknown frame types raise ``UnknownFrameType`` (the server answers
with an ``unknown-type`` error without closing the session), and new
capabilities are announced in the server's ``hello`` under ``features``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self, TypeVar

from chatcli.errors import LocalProtocolError, RemoteProtocolError, UnknownFrameType
from chatcli.protocol._values import (
    DEFAULT_MAX_TEXT_BYTES,
    EPOCH_RULE,
    MAX_INT,
    ErrorCode,
    Status,
    check_user_id,
    is_unicode,
    is_valid_epoch,
    is_valid_user_id,
    parse_ts,
)

__all__ = [
    "CLIENT_ID_MAX_LEN",
    "HISTORY_MAX_LIMIT",
    "INBOX_MAX_LIMIT",
    "PREVIEW_MAX_CHARS",
    "PROTOCOL_VERSION",
    # scriptable chat (issue 13)
    "SEARCH_MAX_LIMIT",
    "SEARCH_TEXT_MAX_LEN",
    "SUBPROTOCOL",
    "Ack",
    "ClientFrame",
    # the chat experience (issue 12)
    "Conversation",
    "Error",
    "Frame",
    "Hello",
    "History",
    "HistoryRequest",
    "Inbox",
    "InboxRequest",
    "MarkRead",
    "Message",
    "PeerTyping",
    "Presence",
    "ReadPosition",
    "Receipt",
    "Received",
    "Search",
    "SearchRequest",
    "Send",
    "SendFields",
    "ServerFrame",
    "Typing",
    "Watch",
    "Who",
    "WhoRequest",
    "encode",
    "encode_ack",
    "encode_message",
    "parse_client_frame",
    "parse_server_frame",
    "read_client_frame",
]

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "chatcli.v1"
CLIENT_ID_MAX_LEN: Final = 128
HISTORY_MAX_LIMIT: Final = 1000
#: The most messages one search answer holds, and the longest search text (characters).
SEARCH_MAX_LIMIT: Final = 200
SEARCH_TEXT_MAX_LEN: Final = 256

#: An ack's status is checked on every ack built or read: against plain strings, which hash and compare
#: faster than the enum members (and the error message lists the wire values).
_STATUSES: Final = frozenset(status.value for status in Status)
_REFUSED: Final = Status.REFUSED.value
_ACCEPTED: Final = _STATUSES - {_REFUSED}

_F = TypeVar("_F")


def _require_str(name: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise LocalProtocolError(f"{name} must be a {'' if allow_empty else 'non-empty '}string")
    return value


def _require_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise LocalProtocolError(f"{name} must be an integer from 0 to {MAX_INT}")
    return value


def _build(cls: Callable[..., _F], **fields: Any) -> _F:
    """Build a frame from peer data, turning a validation failure into the peer's fault."""
    try:
        return cls(**fields)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {getattr(cls, 'TYPE', 'frame')} frame: {exc}",
                                  ErrorCode.BAD_FRAME) from None


def _user_list(obj: dict[str, Any]) -> tuple[str, ...] | None:
    users = obj.get("users")
    return tuple(users) if isinstance(users, list) else None


@dataclass(frozen=True, slots=True)
class Hello:
    """Server → client, first frame of a native session."""

    TYPE: ClassVar[str] = "hello"
    user: str
    session: str
    server: str
    protocol: int = PROTOCOL_VERSION
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    features: tuple[str, ...] = ()
    #: The identity of the server's message store; changes when the store is replaced. None: an older server.
    epoch: str | None = None
    #: True when the client's resume point (``Chatcli-After`` / ``Chatcli-Epoch``) came from another store:
    #: the server ignored it and the backlog starts at this store's beginning.
    reset: bool = False

    def __post_init__(self) -> None:
        check_user_id(self.user)
        _require_str("session", self.session)
        _require_str("server", self.server)
        _require_int("protocol", self.protocol)
        _require_int("max_text_bytes", self.max_text_bytes)
        if not isinstance(self.features, tuple) or not all(isinstance(f, str) for f in self.features):
            raise LocalProtocolError("features must be strings")
        if self.epoch is not None and not is_valid_epoch(self.epoch):
            raise LocalProtocolError(f"epoch must be {EPOCH_RULE}")
        if not isinstance(self.reset, bool):
            raise LocalProtocolError("reset must be a boolean")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        features = obj.get("features", [])
        return _build(cls, user=obj.get("user"), session=obj.get("session"), server=obj.get("server"),
                      protocol=obj.get("protocol"),
                      max_text_bytes=obj.get("max_text_bytes", DEFAULT_MAX_TEXT_BYTES),
                      features=tuple(features) if isinstance(features, list) else None,
                      epoch=obj.get("epoch"), reset=obj.get("reset", False))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.TYPE,
            "protocol": self.protocol,
            "server": self.server,
            "user": self.user,
            "session": self.session,
            "max_text_bytes": self.max_text_bytes,
            "features": list(self.features),
        }
        if self.epoch is not None:
            out["epoch"] = self.epoch
        if self.reset:
            out["reset"] = True
        return out


@dataclass(frozen=True, slots=True)
class Send:
    """Client → server: send ``text`` to user ``to``; ``id`` is chosen by the client and echoed in the ack."""

    TYPE: ClassVar[str] = "send"
    id: str
    to: str
    text: str
    #: The id of an earlier message of this conversation that this one answers (feature ``replies``).
    reply_to: int | None = None

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        if len(self.id) > CLIENT_ID_MAX_LEN or not self.id.isprintable():
            raise LocalProtocolError(f"id must be at most {CLIENT_ID_MAX_LEN} printable characters")
        check_user_id(self.to)
        _require_str("text", self.text, allow_empty=True)
        if not is_unicode(self.text):
            raise LocalProtocolError("text must be valid Unicode (no lone surrogates)")
        if self.reply_to is not None:
            _require_int("reply_to", self.reply_to)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), to=obj.get("to"), text=obj.get("text"), reply_to=obj.get("reply_to"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id, "to": self.to, "text": self.text}
        if self.reply_to is not None:
            out["reply_to"] = self.reply_to
        return out


@dataclass(frozen=True, slots=True)
class Ack:
    """Server → client: the outcome of a ``send``, matched by the client's ``id``."""

    TYPE: ClassVar[str] = "ack"
    id: str
    #: A ``Status``; a parsed ack holds the wire's plain string, which equals the member.
    status: str
    msg_id: int | None = None
    reason: str | None = None
    ts: str | None = None
    #: True when this answers a retried ``id`` already stored: msg_id is the original's.
    duplicate: bool = False

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        if not isinstance(self.duplicate, bool):
            raise LocalProtocolError("duplicate must be a boolean")
        if self.status not in _STATUSES:
            raise LocalProtocolError(f"status must be one of {sorted(_STATUSES)}")
        if self.status == _REFUSED:
            _require_str("reason", self.reason)
        elif self.msg_id is None:
            raise LocalProtocolError("an accepted ack needs msg_id")
        if self.msg_id is not None:
            _require_int("msg_id", self.msg_id)
        if self.reason is not None:
            _require_str("reason", self.reason)
        if self.ts is not None:
            _require_str("ts", self.ts)

    @property
    def accepted(self) -> bool:
        return self.status != _REFUSED

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), status=obj.get("status"), msg_id=obj.get("msg_id"),
                      reason=obj.get("reason"), ts=obj.get("ts"), duplicate=obj.get("duplicate", False))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id, "status": self.status}
        if self.msg_id is not None:
            out["msg_id"] = self.msg_id
        if self.reason is not None:
            out["reason"] = self.reason
        if self.ts is not None:
            out["ts"] = self.ts
        if self.duplicate:
            out["duplicate"] = True
        return out


@dataclass(frozen=True, slots=True)
class Message:
    """Server → client: a message for this user; ``id`` is the server's, increasing (a cursor)."""

    TYPE: ClassVar[str] = "message"
    id: int
    sender: str  # "from" on the wire
    to: str
    text: str
    ts: str
    #: The id of the message this one answers (``send.reply_to``, checked by the server), or None.
    reply_to: int | None = None

    def __post_init__(self) -> None:
        _require_int("id", self.id)
        check_user_id(self.sender)
        check_user_id(self.to)
        _require_str("text", self.text)
        if not is_unicode(self.text):
            raise LocalProtocolError("text must be valid Unicode (no lone surrogates)")
        _require_str("ts", self.ts)
        if self.reply_to is not None:
            _require_int("reply_to", self.reply_to)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), sender=obj.get("from"), to=obj.get("to"), text=obj.get("text"),
                      ts=obj.get("ts"), reply_to=obj.get("reply_to"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id, "from": self.sender, "to": self.to,
                               "text": self.text, "ts": self.ts}
        if self.reply_to is not None:
            out["reply_to"] = self.reply_to
        return out


_ERROR_FIELDS: Final = frozenset({"type", "code", "message"})


@dataclass(frozen=True, slots=True)
class Error:
    """Server → client: a frame could not be handled; the session stays open."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_str("code", self.code)
        _require_str("message", self.message)
        if not _ERROR_FIELDS.isdisjoint(self.details):  # details must not forge the frame's own fields
            raise LocalProtocolError(f"details must not contain {sorted(_ERROR_FIELDS)}")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        details = {k: v for k, v in obj.items() if k not in _ERROR_FIELDS}
        return _build(cls, code=obj.get("code"), message=obj.get("message"), details=details)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "code": self.code, "message": self.message}
        out.update(self.details)
        return out


@dataclass(frozen=True, slots=True)
class Received:
    """Client → server: every message up to ``id`` has been handled; the server advances the user's cursor.

    A later connection without a resume point gets only messages after the cursor.
    """

    TYPE: ClassVar[str] = "received"
    id: int

    def __post_init__(self) -> None:
        _require_int("id", self.id)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id}


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """Client → server: the last ``limit`` messages between me and ``peer`` (before message ``before``)."""

    TYPE: ClassVar[str] = "history"
    id: str
    peer: str
    limit: int = 50
    before: int | None = None

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        check_user_id(self.peer)
        _require_int("limit", self.limit)
        if self.limit > HISTORY_MAX_LIMIT:
            raise LocalProtocolError(f"limit must be at most {HISTORY_MAX_LIMIT}")
        if self.before is not None:
            _require_int("before", self.before)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), peer=obj.get("peer"), limit=obj.get("limit", 50),
                      before=obj.get("before"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id, "peer": self.peer, "limit": self.limit}
        if self.before is not None:
            out["before"] = self.before
        return out


@dataclass(frozen=True, slots=True)
class History:
    """Server → client: the answer to a ``history`` request, oldest message first."""

    TYPE: ClassVar[str] = "history"
    id: str
    peer: str
    messages: tuple[Message, ...]
    #: The server's size cap cut the answer short: older messages exist; ask again with ``before``.
    more: bool = False

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        check_user_id(self.peer)
        if not isinstance(self.messages, tuple) or not all(isinstance(m, Message) for m in self.messages):
            raise LocalProtocolError("messages must be a tuple of Message")
        if not isinstance(self.more, bool):
            raise LocalProtocolError("more must be a boolean")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        messages = _messages_of(obj, cls.TYPE)
        return _build(cls, id=obj.get("id"), peer=obj.get("peer"), messages=messages, more=obj.get("more", False))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id, "peer": self.peer,
                               "messages": [m.to_dict() for m in self.messages]}
        if self.more:
            out["more"] = True
        return out

    def older_than(self, asked: int) -> int | None:
        """The ``before`` of the next page back, or None if this answer reached the conversation's start.

        Older messages may exist when the server cut the answer short (``more``) or when it holds all
        ``asked`` messages; an answer with fewer, not cut, holds everything there was.
        """
        if self.messages and (self.more or len(self.messages) >= asked):
            return self.messages[0].id
        return None


def _messages_of(obj: dict[str, Any], frame_type: str) -> tuple[Message, ...]:
    """The ``messages`` list of a ``history`` or ``search`` answer, as checked frames."""
    items = obj.get("messages")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise RemoteProtocolError(f"invalid {frame_type} frame: messages must be a list of objects",
                                  ErrorCode.BAD_FRAME)
    try:
        return tuple(Message.from_dict(item) for item in items)
    except RemoteProtocolError as exc:  # name the frame the peer sent, not the object nested in it
        raise RemoteProtocolError(f"invalid {frame_type} frame: in messages: {exc.message}",
                                  ErrorCode.BAD_FRAME) from None


@dataclass(frozen=True, slots=True)
class WhoRequest:
    """Client → server: who is online? Answered by ``Who`` with the same ``id``."""

    TYPE: ClassVar[str] = "who"
    id: str

    def __post_init__(self) -> None:
        _require_str("id", self.id)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id}


@dataclass(frozen=True, slots=True)
class Who:
    """Server → client: the users with at least one open session, sorted."""

    TYPE: ClassVar[str] = "who"
    id: str
    users: tuple[str, ...]

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        if not isinstance(self.users, tuple) or not all(is_valid_user_id(u) for u in self.users):
            raise LocalProtocolError("users must be a tuple of user ids")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), users=_user_list(obj))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "users": list(self.users)}


@dataclass(frozen=True, slots=True)
class Watch:
    """Client → server: tell me now, and whenever it changes, whether these users are online."""

    TYPE: ClassVar[str] = "watch"
    users: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.users, tuple) or not all(is_valid_user_id(u) for u in self.users):
            raise LocalProtocolError("users must be a tuple of user ids")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, users=_user_list(obj))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "users": list(self.users)}


@dataclass(frozen=True, slots=True)
class Presence:
    """Server → client: a watched user came online (first session) or went offline (last session closed)."""

    TYPE: ClassVar[str] = "presence"
    user: str
    online: bool
    #: True when the server does not show this user's presence to you (``--presence contacts`` and no
    #: message exchanged yet): ``online`` is then always false.
    hidden: bool = False

    def __post_init__(self) -> None:
        check_user_id(self.user)
        if not isinstance(self.online, bool) or not isinstance(self.hidden, bool):
            raise LocalProtocolError("online and hidden must be booleans")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, user=obj.get("user"), online=obj.get("online"), hidden=obj.get("hidden", False))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "user": self.user, "online": self.online}
        if self.hidden:
            out["hidden"] = True
        return out


# ---------------------------------------------------------------------------
# The chat experience (issue 12): read positions, receipts, typing, the inbox. Announced by the features
# ``reads`` (read positions and the inbox: a storing server), ``receipts`` and ``typing``.
# ---------------------------------------------------------------------------

#: Conversations one ``inbox`` answer lists at most, and the characters of each one's preview.
INBOX_MAX_LIMIT: Final = 200
PREVIEW_MAX_CHARS: Final = 80


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise LocalProtocolError(f"{name} must be a boolean")
    return value


@dataclass(frozen=True, slots=True)
class MarkRead:
    """Client → server: I have read the conversation with ``peer`` up to message ``id``.

    The server keeps the highest such id per user and conversation (the read position, apart from the
    delivery cursor), tells the user's other sessions, and sends ``peer`` a ``receipt`` unless ``receipt``
    is false (the user opted out of receipts).
    """

    TYPE: ClassVar[str] = "read"
    peer: str
    id: int
    receipt: bool = True

    def __post_init__(self) -> None:
        check_user_id(self.peer)
        _require_int("id", self.id)
        _require_bool("receipt", self.receipt)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, peer=obj.get("peer"), id=obj.get("id"), receipt=obj.get("receipt", True))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "peer": self.peer, "id": self.id}
        if not self.receipt:
            out["receipt"] = False
        return out


@dataclass(frozen=True, slots=True)
class ReadPosition:
    """Server → client: your read position in the conversation with ``peer`` is now ``id`` (another
    session of yours marked it)."""

    TYPE: ClassVar[str] = "read"
    peer: str
    id: int

    def __post_init__(self) -> None:
        check_user_id(self.peer)
        _require_int("id", self.id)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, peer=obj.get("peer"), id=obj.get("id"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "peer": self.peer, "id": self.id}


@dataclass(frozen=True, slots=True)
class Receipt:
    """Server → client: ``sender`` has read your messages to them up to message ``id``."""

    TYPE: ClassVar[str] = "receipt"
    sender: str  # "from" on the wire
    id: int

    def __post_init__(self) -> None:
        check_user_id(self.sender)
        _require_int("id", self.id)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, sender=obj.get("from"), id=obj.get("id"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "from": self.sender, "id": self.id}


@dataclass(frozen=True, slots=True)
class Typing:
    """Client → server: I am typing a message to ``to``. Not stored; sent on only to an online recipient."""

    TYPE: ClassVar[str] = "typing"
    to: str

    def __post_init__(self) -> None:
        check_user_id(self.to)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, to=obj.get("to"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "to": self.to}


@dataclass(frozen=True, slots=True)
class PeerTyping:
    """Server → client: ``sender`` is typing a message to you (until a pause or their message)."""

    TYPE: ClassVar[str] = "typing"
    sender: str  # "from" on the wire

    def __post_init__(self) -> None:
        check_user_id(self.sender)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, sender=obj.get("from"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "from": self.sender}


@dataclass(frozen=True, slots=True)
class InboxRequest:
    """Client → server: my conversations, most recent first, with unread counts. Answered by ``Inbox``."""

    TYPE: ClassVar[str] = "inbox"
    id: str
    limit: int = 50

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        _require_int("limit", self.limit)
        if self.limit > INBOX_MAX_LIMIT:
            raise LocalProtocolError(f"limit must be at most {INBOX_MAX_LIMIT}")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), limit=obj.get("limit", 50))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "limit": self.limit}


@dataclass(frozen=True, slots=True)
class Conversation:
    """One line of an ``inbox`` answer: the conversation with ``peer``.

    ``unread``: messages from ``peer`` after ``read`` (your read position); ``last_*``: the newest message
    either way, ``preview`` its first ``PREVIEW_MAX_CHARS`` characters; ``peer_read``: how far ``peer`` has
    read it, when they send receipts (None otherwise).
    """

    TYPE: ClassVar[str] = "conversation"  # names it in errors; not a frame of its own
    peer: str
    unread: int
    read: int
    last_id: int
    last_from: str
    last_ts: str
    preview: str
    peer_read: int | None = None

    def __post_init__(self) -> None:
        check_user_id(self.peer)
        if self.peer_read is not None:
            _require_int("peer_read", self.peer_read)
        for name in ("unread", "read", "last_id"):
            _require_int(name, getattr(self, name))
        check_user_id(self.last_from)
        _require_str("last_ts", self.last_ts)
        _require_str("preview", self.preview, allow_empty=True)
        if len(self.preview) > PREVIEW_MAX_CHARS or not is_unicode(self.preview):
            raise LocalProtocolError(f"preview must be at most {PREVIEW_MAX_CHARS} characters of Unicode text")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, peer=obj.get("peer"), unread=obj.get("unread"), read=obj.get("read"),
                      last_id=obj.get("last_id"), last_from=obj.get("last_from"), last_ts=obj.get("last_ts"),
                      preview=obj.get("preview"), peer_read=obj.get("peer_read"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peer": self.peer, "unread": self.unread, "read": self.read, "last_id": self.last_id,
                               "last_from": self.last_from, "last_ts": self.last_ts, "preview": self.preview}
        if self.peer_read is not None:
            out["peer_read"] = self.peer_read
        return out


@dataclass(frozen=True, slots=True)
class Inbox:
    """Server → client: the answer to an ``inbox`` request, the most recent conversation first.

    ``more``: the user has more conversations than ``limit``.
    """

    TYPE: ClassVar[str] = "inbox"
    id: str
    conversations: tuple[Conversation, ...]
    more: bool = False

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        if not isinstance(self.conversations, tuple) or not all(
                isinstance(c, Conversation) for c in self.conversations):
            raise LocalProtocolError("conversations must be a tuple of Conversation")
        _require_bool("more", self.more)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        items = obj.get("conversations")
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise RemoteProtocolError("invalid inbox frame: conversations must be a list of objects",
                                      ErrorCode.BAD_FRAME)
        try:
            conversations = tuple(Conversation.from_dict(item) for item in items)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"invalid inbox frame: in conversations: {exc.message}",
                                      ErrorCode.BAD_FRAME) from None
        return _build(cls, id=obj.get("id"), conversations=conversations, more=obj.get("more", False))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id,
                               "conversations": [c.to_dict() for c in self.conversations]}
        if self.more:
            out["more"] = True
        return out


# -- issue 13: search (feature ``search``) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """Client → server: my messages (both directions) whose text matches every word of ``text``, newest first.

    ``peer`` keeps one conversation; ``since`` (ISO 8601 with a zone) keeps messages accepted at or
    after it; ``before`` pages back (only smaller ids), like history.
    """

    TYPE: ClassVar[str] = "search"
    id: str
    text: str
    limit: int = 20
    peer: str | None = None
    since: str | None = None
    before: int | None = None

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        _require_str("text", self.text)
        if len(self.text) > SEARCH_TEXT_MAX_LEN or not self.text.strip() or not is_unicode(self.text):
            raise LocalProtocolError(f"text must hold a word and at most {SEARCH_TEXT_MAX_LEN} characters")
        _require_int("limit", self.limit)
        if not 1 <= self.limit <= SEARCH_MAX_LIMIT:
            raise LocalProtocolError(f"limit must be from 1 to {SEARCH_MAX_LIMIT}")
        if self.peer is not None:
            check_user_id(self.peer)
        if self.since is not None:
            parse_ts(_require_str("since", self.since))
        if self.before is not None:
            _require_int("before", self.before)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), text=obj.get("text"), limit=obj.get("limit", 20),
                      peer=obj.get("peer"), since=obj.get("since"), before=obj.get("before"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id, "text": self.text, "limit": self.limit}
        for name in ("peer", "since", "before"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Search:
    """Server → client: the answer to a ``search``, newest message first; ``more`` when a cap cut it."""

    TYPE: ClassVar[str] = "search"
    id: str
    messages: tuple[Message, ...]
    more: bool = False

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        if not isinstance(self.messages, tuple) or not all(isinstance(m, Message) for m in self.messages):
            raise LocalProtocolError("messages must be a tuple of Message")
        if not isinstance(self.more, bool):
            raise LocalProtocolError("more must be a boolean")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        return _build(cls, id=obj.get("id"), messages=_messages_of(obj, cls.TYPE), more=obj.get("more", False))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "id": self.id, "messages": [m.to_dict() for m in self.messages]}
        if self.more:
            out["more"] = True
        return out


ClientFrame = (Send | Received | HistoryRequest | WhoRequest | Watch | MarkRead | Typing | InboxRequest
               | SearchRequest)
ServerFrame = (Hello | Ack | Message | Error | History | Who | Presence | ReadPosition | Receipt | PeerTyping
               | Inbox | Search)
Frame = ClientFrame | ServerFrame


def encode(frame: Frame) -> str:
    """The JSON text of a native frame."""
    return json.dumps(frame.to_dict(), ensure_ascii=False, separators=(",", ":"))


def _load_object(data: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"not JSON: {exc}", ErrorCode.BAD_JSON) from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("a frame must be a JSON object", ErrorCode.BAD_FRAME)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise RemoteProtocolError("a frame needs a string 'type'", ErrorCode.BAD_FRAME)
    return obj


#: The parsers by ``type``, one table per direction: ``history`` and ``who`` name a request and its answer.
_CLIENT_PARSERS: Final[dict[str, Callable[[dict[str, Any]], ClientFrame]]] = {
    cls.TYPE: cls.from_dict for cls in (Send, Received, HistoryRequest, WhoRequest, Watch, MarkRead, Typing,
                                        InboxRequest, SearchRequest)}
_SERVER_PARSERS: Final[dict[str, Callable[[dict[str, Any]], ServerFrame]]] = {
    cls.TYPE: cls.from_dict for cls in (Hello, Ack, Message, History, Error, Who, Presence, ReadPosition,
                                        Receipt, PeerTyping, Inbox, Search)}


def parse_client_frame(data: str | bytes) -> ClientFrame:
    """Parse a frame a client sent. Raises ``RemoteProtocolError`` (``UnknownFrameType`` for new types)."""
    obj = _load_object(data)
    parser = _CLIENT_PARSERS.get(obj["type"])
    if parser is None:
        raise UnknownFrameType(f"unknown frame type {obj['type'][:40]!r}")
    return parser(obj)


#: The fields of a well-formed ``send`` frame: (id, to, text).
SendFields = tuple[str, str, str]


def read_client_frame(data: str | bytes) -> ClientFrame | SendFields:
    """``parse_client_frame``, with a ``send`` that passes every check of ``Send`` returned as its fields.

    The server's hot path: a send is most of what clients say, and building the frozen dataclass cost
    more than the checks. Validation is the same (a frame failing any check goes through ``Send`` and
    gets its precise error); only the object built differs.
    """
    obj = _load_object(data)
    if obj["type"] == "send" and "reply_to" not in obj:  # a reply is rare: it goes through Send
        client_id, to, text = obj.get("id"), obj.get("to"), obj.get("text")
        # json.loads builds exact str, so type() is isinstance here; ASCII text is always valid Unicode.
        if (type(client_id) is str and client_id and len(client_id) <= CLIENT_ID_MAX_LEN
                and client_id.isprintable() and is_valid_user_id(to) and type(text) is str
                and (text.isascii() or is_unicode(text))):
            return client_id, to, text  # type: ignore[return-value]  # to: checked by is_valid_user_id
    parser = _CLIENT_PARSERS.get(obj["type"])
    if parser is None:
        raise UnknownFrameType(f"unknown frame type {obj['type'][:40]!r}")
    return parser(obj)


def _json_str(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``. Printable ASCII without ``"`` or ``\\`` (ids, timestamps,
    most texts) has nothing to escape, and four C-level checks cost a fraction of json.dumps."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


def encode_ack(client_id: str, status: str, msg_id: int, ts: str, duplicate: bool) -> str:
    """``encode(Ack(client_id, status, msg_id=msg_id, ts=ts, duplicate=duplicate))`` for an accepted ack,
    byte for byte, from a template: json.dumps only for the strings. Values ``Ack`` would refuse go through
    it, so they raise as before."""
    if (type(client_id) is not str or not client_id or status not in _ACCEPTED or type(msg_id) is not int
            or not 0 <= msg_id <= MAX_INT or type(ts) is not str or type(duplicate) is not bool):
        return encode(Ack(client_id, status, msg_id=msg_id, ts=ts, duplicate=duplicate))
    tail = ',"duplicate":true}' if duplicate else "}"
    return (f'{{"type":"ack","id":{_json_str(client_id)},"status":"{status}","msg_id":{msg_id},'
            f'"ts":{_json_str(ts)}{tail}')


def encode_message(msg_id: int, sender: str, to: str, text: str, ts: str, reply_to: int | None = None) -> str:
    """``encode(Message(msg_id, sender, to, text, ts, reply_to))`` byte for byte, from a template, with the same
    checks (a value ``Message`` would refuse raises ``LocalProtocolError`` as before)."""
    if (type(msg_id) is not int or not 0 <= msg_id <= MAX_INT or not is_valid_user_id(sender)
            or not is_valid_user_id(to) or type(text) is not str or not (text.isascii() or is_unicode(text))
            or type(ts) is not str or reply_to is not None):
        return encode(Message(msg_id, sender, to, text, ts, reply_to))
    # Valid user ids are [A-Za-z0-9._@-]: nothing JSON escapes, so they go in as they are.
    return (f'{{"type":"message","id":{msg_id},"from":"{sender}","to":"{to}","text":{_json_str(text)},'
            f'"ts":{_json_str(ts)}}}')


def parse_server_frame(data: str | bytes) -> ServerFrame:
    """Parse a frame the server sent. Clients skip ``UnknownFrameType``: it comes from a newer server."""
    obj = _load_object(data)
    parser = _SERVER_PARSERS.get(obj["type"])
    if parser is None:
        raise UnknownFrameType(f"unknown frame type {obj['type'][:40]!r}")
    return parser(obj)


