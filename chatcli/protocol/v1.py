"""The chatcli wire protocols, sans I/O: parse, validate and encode frames.

Two protocols share one WebSocket port:

* ``chatcli.v1`` (negotiated as the WebSocket subprotocol): JSON text frames,
  one object each, with a ``type`` field. Typed, frozen frame objects below.
* the seed's legacy frames, spoken by unchanged clients of the old Flutter app
  (they offer no subprotocol): single-quoted pseudo-JSON with raw, unescaped
  text, and bare acknowledgements such as ``send:success``.

Nothing here touches a socket or an event loop; the server and every client
feed text in and get text out. ``docs/protocol.md`` describes both protocols
with an example of every frame.

Compatibility rules of ``chatcli.v1`` (so later features need no v2): unknown
fields are ignored, unknown frame types are answered with an ``unknown-type``
error without closing the session, and new capabilities are announced in the
server's ``hello`` under ``features``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, NamedTuple
from urllib.parse import parse_qsl, unquote

from chatcli.errors import InvalidUserId, LocalProtocolError, RemoteProtocolError, UnknownFrameType

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "chatcli.v1"
DEFAULT_MAX_TEXT_BYTES: Final = 64 * 1024
#: Room for the JSON envelope around a maximal text; frames beyond it are closed with 1009.
FRAME_OVERHEAD_BYTES: Final = 4 * 1024
CLIENT_ID_MAX_LEN: Final = 128
#: The largest integer a frame may carry (ids, cursors, limits): SQLite's INTEGER range, where the server keeps
#: them. A larger one would reach the store and fail there, after the frame was accepted.
MAX_INT: Final = 2**63 - 1
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


class Feature:
    """Capabilities a server announces in ``hello.features``."""

    STORE: Final = "store"  # offline recipients' messages are stored; acks may say "stored"
    RESUME: Final = "resume"  # the Chatcli-After / Chatcli-Since headers and the "received" frame
    HISTORY: Final = "history"  # the "history" request
    PRESENCE: Final = "presence"  # the "who" request and "watch" / "presence" frames
    TOKENS: Final = "tokens"  # per-user accounts: sessions proved their user with a token


class Status:
    """Values of an ack's ``status``."""

    DELIVERED: Final = "delivered"  # handed to at least one open session of the recipient
    STORED: Final = "stored"  # kept for a recipient who is offline (durable servers)
    REFUSED: Final = "refused"  # not accepted; ``reason`` says why

    ALL: ClassVar[frozenset[str]] = frozenset({"delivered", "stored", "refused"})


class Reason:
    """Stable codes of a refused ack's ``reason``."""

    OFFLINE: Final = "offline"  # recipient has no open session and the server stores nothing
    TOO_LARGE: Final = "too-large"
    EMPTY: Final = "empty"
    BAD_AUTH: Final = "bad-auth"
    BAD_RECIPIENT: Final = "bad-recipient"
    RATE_LIMITED: Final = "rate-limited"
    STORAGE_FAILED: Final = "storage-failed"  # the server could not commit the message; nothing was stored


class ErrorCode:
    """Stable codes of the ``error`` frame."""

    BAD_JSON: Final = "bad-json"
    BAD_FRAME: Final = "bad-frame"
    UNKNOWN_TYPE: Final = "unknown-type"
    BINARY_UNSUPPORTED: Final = "binary-unsupported"
    UNAVAILABLE: Final = "unavailable"  # the request needs a feature this server runs without (e.g. history)
    RATE_LIMITED: Final = "rate-limited"  # the user asks faster than --rate / --burst allow (who, history, watch)


# ---------------------------------------------------------------------------
# Values: user ids, texts, timestamps
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


def text_size(text: str) -> int:
    """Size of a text in bytes as UTF-8, the unit of every text limit."""
    # A character is at most 4 bytes: skip the encoding when even that fits.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_text(text: str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> str | None:
    """The refusal reason for a message text, or ``None`` when it is acceptable."""
    if not text:
        return Reason.EMPTY
    if len(text) > max_bytes or (len(text) * 4 > max_bytes and text_size(text) > max_bytes):
        return Reason.TOO_LARGE
    return None


def _is_unicode(text: str) -> bool:
    """False for strings with lone surrogates (JSON ``\\ud800`` escapes), which are not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def format_ts(epoch_seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T19:34:47.123Z``."""
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_ts(value: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp with a zone (``Z`` or an offset)."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as exc:
        raise LocalProtocolError(f"invalid timestamp {value!r}") from exc
    if moment.tzinfo is None:
        raise LocalProtocolError(f"timestamp without a zone: {value!r}")
    return moment.timestamp()


# ---------------------------------------------------------------------------
# chatcli.v1: frame objects
# ---------------------------------------------------------------------------


def _require_str(name: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise LocalProtocolError(f"{name} must be a {'' if allow_empty else 'non-empty '}string")
    return value


def _require_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise LocalProtocolError(f"{name} must be an integer from 0 to {MAX_INT}")
    return value


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

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        if len(self.id) > CLIENT_ID_MAX_LEN or not self.id.isprintable():
            raise LocalProtocolError(f"id must be at most {CLIENT_ID_MAX_LEN} printable characters")
        check_user_id(self.to)
        _require_str("text", self.text, allow_empty=True)
        if not _is_unicode(self.text):
            raise LocalProtocolError("text must be valid Unicode (no lone surrogates)")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "to": self.to, "text": self.text}


@dataclass(frozen=True, slots=True)
class Ack:
    """Server → client: the outcome of a ``send``, matched by the client's ``id``."""

    TYPE: ClassVar[str] = "ack"
    id: str
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
        if self.status not in Status.ALL:
            raise LocalProtocolError(f"status must be one of {sorted(Status.ALL)}")
        if self.status == Status.REFUSED:
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
        return self.status != Status.REFUSED

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

    def __post_init__(self) -> None:
        _require_int("id", self.id)
        check_user_id(self.sender)
        check_user_id(self.to)
        _require_str("text", self.text)
        if not _is_unicode(self.text):
            raise LocalProtocolError("text must be valid Unicode (no lone surrogates)")
        _require_str("ts", self.ts)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "from": self.sender, "to": self.to, "text": self.text,
                "ts": self.ts}


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

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id}


HISTORY_MAX_LIMIT: Final = 1000


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

    def __post_init__(self) -> None:
        _require_str("id", self.id)
        check_user_id(self.peer)
        if not isinstance(self.messages, tuple) or not all(isinstance(m, Message) for m in self.messages):
            raise LocalProtocolError("messages must be a tuple of Message")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "peer": self.peer,
                "messages": [m.to_dict() for m in self.messages]}


@dataclass(frozen=True, slots=True)
class WhoRequest:
    """Client → server: who is online? Answered by ``Who`` with the same ``id``."""

    TYPE: ClassVar[str] = "who"
    id: str

    def __post_init__(self) -> None:
        _require_str("id", self.id)

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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "user": self.user, "online": self.online}
        if self.hidden:
            out["hidden"] = True
        return out


ClientFrame = Send | Received | HistoryRequest | WhoRequest | Watch
ServerFrame = Hello | Ack | Message | Error | History | Who | Presence
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


def _build(cls: Callable[..., Frame], **fields: Any) -> Frame:
    """Build a frame from peer data, turning a validation failure into the peer's fault."""
    try:
        return cls(**fields)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {getattr(cls, 'TYPE', 'frame')} frame: {exc}",
                                  ErrorCode.BAD_FRAME) from None


def _parse_send(obj: dict[str, Any]) -> Frame:
    return _build(Send, id=obj.get("id"), to=obj.get("to"), text=obj.get("text"))


def _parse_hello(obj: dict[str, Any]) -> Frame:
    features = obj.get("features", [])
    return _build(Hello, user=obj.get("user"), session=obj.get("session"), server=obj.get("server"),
                  protocol=obj.get("protocol"),
                  max_text_bytes=obj.get("max_text_bytes", DEFAULT_MAX_TEXT_BYTES),
                  features=tuple(features) if isinstance(features, list) else None,
                  epoch=obj.get("epoch"), reset=obj.get("reset", False))


def _parse_ack(obj: dict[str, Any]) -> Frame:
    return _build(Ack, id=obj.get("id"), status=obj.get("status"), msg_id=obj.get("msg_id"),
                  reason=obj.get("reason"), ts=obj.get("ts"), duplicate=obj.get("duplicate", False))


def _parse_message(obj: dict[str, Any]) -> Frame:
    return _build(Message, id=obj.get("id"), sender=obj.get("from"), to=obj.get("to"), text=obj.get("text"),
                  ts=obj.get("ts"))


def _parse_error(obj: dict[str, Any]) -> Frame:
    details = {k: v for k, v in obj.items() if k not in _ERROR_FIELDS}
    return _build(Error, code=obj.get("code"), message=obj.get("message"), details=details)


def _parse_received(obj: dict[str, Any]) -> Frame:
    return _build(Received, id=obj.get("id"))


def _parse_history_request(obj: dict[str, Any]) -> Frame:
    return _build(HistoryRequest, id=obj.get("id"), peer=obj.get("peer"), limit=obj.get("limit", 50),
                  before=obj.get("before"))


def _parse_history(obj: dict[str, Any]) -> Frame:
    items = obj.get("messages")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise RemoteProtocolError("invalid history frame: messages must be a list of objects", ErrorCode.BAD_FRAME)
    try:
        messages = tuple(_parse_message(item) for item in items)
    except RemoteProtocolError as exc:  # name the frame the peer sent, not the object nested in it
        raise RemoteProtocolError(f"invalid history frame: in messages: {exc.message}", ErrorCode.BAD_FRAME) from None
    return _build(History, id=obj.get("id"), peer=obj.get("peer"), messages=messages)


def _user_list(obj: dict[str, Any]) -> tuple[str, ...] | None:
    users = obj.get("users")
    return tuple(users) if isinstance(users, list) else None


def _parse_who_request(obj: dict[str, Any]) -> Frame:
    return _build(WhoRequest, id=obj.get("id"))


def _parse_who(obj: dict[str, Any]) -> Frame:
    return _build(Who, id=obj.get("id"), users=_user_list(obj))


def _parse_watch(obj: dict[str, Any]) -> Frame:
    return _build(Watch, users=_user_list(obj))


def _parse_presence(obj: dict[str, Any]) -> Frame:
    return _build(Presence, user=obj.get("user"), online=obj.get("online"), hidden=obj.get("hidden", False))


_CLIENT_PARSERS: Final = {"send": _parse_send, "received": _parse_received, "history": _parse_history_request,
                          "who": _parse_who_request, "watch": _parse_watch}
_SERVER_PARSERS: Final = {"hello": _parse_hello, "ack": _parse_ack, "message": _parse_message,
                          "history": _parse_history, "error": _parse_error, "who": _parse_who,
                          "presence": _parse_presence}


def parse_client_frame(data: str | bytes) -> ClientFrame:
    """Parse a frame a client sent. Raises ``RemoteProtocolError`` (``UnknownFrameType`` for new types)."""
    obj = _load_object(data)
    parser = _CLIENT_PARSERS.get(obj["type"])
    if parser is None:
        raise UnknownFrameType(f"unknown frame type {obj['type'][:40]!r}")
    return parser(obj)  # type: ignore[return-value]


def parse_server_frame(data: str | bytes) -> ServerFrame:
    """Parse a frame the server sent. Clients skip ``UnknownFrameType``: it comes from a newer server."""
    obj = _load_object(data)
    parser = _SERVER_PARSERS.get(obj["type"])
    if parser is None:
        raise UnknownFrameType(f"unknown frame type {obj['type'][:40]!r}")
    return parser(obj)  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The seed's legacy frames
# ---------------------------------------------------------------------------

LEGACY_CONNECTED: Final = "connected"
LEGACY_SEND_SUCCESS: Final = "send:success"
LEGACY_SEND_ERROR: Final = "send:error"
#: The seed's shared key, the default so that unchanged apps keep working.
DEFAULT_AUTH_KEY: Final = "addauthkeyifrequired"


class LegacyCommand(NamedTuple):
    """A command from a seed client, as sent. A NamedTuple: built once per message on the hot path.

    ``userid`` is the RECIPIENT of a ``send``. Fields the frame lacked are ``None``.
    """

    cmd: str
    auth: str | None
    userid: str | None
    msgtext: str | None


# The Flutter app's template, with the text inserted raw: everything between
# 'msgtext':' and the final '} is the text, whatever quotes or keys it holds.
_LEGACY_TEMPLATE = re.compile(
    r"\{\s*'auth'\s*:\s*'([^']*)'\s*,\s*'cmd'\s*:\s*'([^']*)'\s*,\s*'userid'\s*:\s*'([^']*)'\s*,"
    r"\s*'msgtext'\s*:\s*'(.*)'\s*\}\s*\Z",
    re.DOTALL,
)


def parse_legacy_frame(data: str) -> LegacyCommand:
    """Parse a seed client's frame: the Flutter template, then strict JSON, then the quote-replaced form."""
    exact = _parse_exact_template(data)
    if exact is not None:
        return exact
    match = _LEGACY_TEMPLATE.match(data)
    if match is not None:
        auth, cmd, userid, text = match.groups()
        return LegacyCommand(cmd, auth, userid, text)
    for candidate in (data, data.replace("'", '"')):
        try:
            obj = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return _legacy_from_object(obj)
    raise RemoteProtocolError("not a seed frame: expected {'auth':…,'cmd':…,'userid':…,'msgtext':…}",
                              ErrorCode.BAD_FRAME)


_TEMPLATE_HEAD: Final = "{'auth':'"
_TEMPLATE_CMD: Final = "','cmd':'"
_TEMPLATE_USERID: Final = "','userid':'"
_TEMPLATE_TAIL: Final = "'}"


def _parse_exact_template(data: str) -> LegacyCommand | None:
    """The app's template byte for byte, with plain string searches: the per-message fast path.

    Anything that deviates (other spacing, key order) returns ``None`` for the general parsers.
    """
    if not data.startswith(_TEMPLATE_HEAD) or not data.endswith(_TEMPLATE_TAIL):
        return None
    cmd_at = data.find(_TEMPLATE_CMD, 9)
    userid_at = data.find(_TEMPLATE_USERID, cmd_at + 9) if cmd_at >= 0 else -1
    userid_end = data.find("',", userid_at + 12) if userid_at >= 0 else -1
    if userid_end < 0:
        return None
    if data.startswith(" 'msgtext':'", userid_end + 2):
        text_at = userid_end + 14
    elif data.startswith("'msgtext':'", userid_end + 2):
        text_at = userid_end + 13
    else:
        return None
    auth, cmd, userid = data[9:cmd_at], data[cmd_at + 9:userid_at], data[userid_at + 12:userid_end]
    if "'" in auth or "'" in cmd or text_at > len(data) - 2:
        return None
    return LegacyCommand(cmd, auth, userid, data[text_at:-2])


def _legacy_from_object(obj: dict[str, Any]) -> LegacyCommand:
    cmd, auth, userid, msgtext = (obj.get(key) for key in ("cmd", "auth", "userid", "msgtext"))
    if not isinstance(cmd, str) or not all(v is None or isinstance(v, str) for v in (auth, userid, msgtext)):
        raise RemoteProtocolError("seed frame fields must be strings", ErrorCode.BAD_FRAME)
    return LegacyCommand(cmd, auth, userid, msgtext)


_LEGACY_CMD = re.compile(r"[A-Za-z0-9_.-]{0,32}\Z")


def legacy_error(cmd: str) -> str:
    """The ``<cmd>:error`` ack; a cmd that is not a plain word is answered as ``send:error``."""
    return f"{cmd}:error" if _LEGACY_CMD.match(cmd) else LEGACY_SEND_ERROR


_LEGACY_NEEDS_ESCAPE = re.compile(r"['\"\\\x00-\x1f\x7f\u2028\u2029]")


def encode_legacy_message(sender: str, text: str) -> str:
    """The frame that delivers ``text`` from ``sender`` to a seed client.

    The app checks the frame starts with ``{'cmd'``, replaces every ``'`` with
    ``"`` and decodes strict JSON, reading ``userid`` as the author. So the text
    is JSON-escaped with its apostrophes as ``\\u0027``: after the app's
    replacement it decodes to exactly the original text.
    """
    if _LEGACY_NEEDS_ESCAPE.search(text) is not None:
        text = json.dumps(text, ensure_ascii=False)[1:-1].replace("'", "\\u0027")
    return "{'cmd':'send','userid':'" + sender + "', 'msgtext':'" + text + "'}"


def encode_legacy_send(to: str, text: str, auth: str = DEFAULT_AUTH_KEY) -> str:
    """The frame the Flutter app sends: its template with the text inserted raw."""
    return "{'auth':'" + auth + "','cmd':'send','userid':'" + to + "', 'msgtext':'" + text + "'}"


def decode_legacy_message(data: str) -> tuple[str, str] | None:
    """What the Flutter app reads from a frame: ``(author, text)``, or ``None`` for a non-message frame.

    Mirrors the app exactly (prefix check, quote replacement, strict JSON), so
    tests can prove the app would display what was sent. Raises
    ``RemoteProtocolError`` where the app would throw.
    """
    if data in (LEGACY_CONNECTED, LEGACY_SEND_SUCCESS, LEGACY_SEND_ERROR):
        return None
    if len(data) < 6:
        raise RemoteProtocolError(f"frame {data!r} is shorter than 6 characters: the app throws on it")
    if not data.startswith("{'cmd'"):
        return None
    try:
        obj = json.loads(data.replace("'", '"'))
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"the app cannot decode this frame: {exc}") from None
    author, text = obj.get("userid"), obj.get("msgtext")
    if not isinstance(author, str) or not isinstance(text, str):
        raise RemoteProtocolError("the app needs string userid and msgtext")
    return author, text
