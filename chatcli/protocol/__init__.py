"""The chatcli wire protocols, sans I/O: parse, validate and encode frames.

Two protocols share one WebSocket port; the server and every client feed text
in and get text out, and nothing here touches a socket or an event loop.
``docs/protocol.md`` describes both with an example of every frame. The rooms:

* ``_values``: what both protocols share: limits (``MAX_INT``,
  ``DEFAULT_MAX_TEXT_BYTES``), the stable codes as ``StrEnum``s (``Feature``,
  ``Status``, ``Reason``, ``ErrorCode``), user ids and the request path,
  texts, timestamps, and the handshake's header and query names.
* ``v1``: ``chatcli.v1``, negotiated as the WebSocket subprotocol: JSON text
  frames as frozen, self-checking objects, each with ``from_dict`` beside
  ``to_dict``; ``encode``, ``parse_client_frame``, ``parse_server_frame``.
* ``legacy``: the seed's frames, spoken by unchanged clients of the old Flutter
  app (they offer no subprotocol): single-quoted pseudo-JSON with raw text, and
  bare acknowledgements such as ``send:success``. Loaded on first use: only
  the server speaks it, and client commands should not pay for its import.

Import from here (``from chatcli import protocol as p; p.Send(...)``); the
modules are the package's inside. The test-only emulation of the Flutter app
lives in ``tests/support/flutter_app.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from chatcli.protocol._values import (
    DEFAULT_AUTH_KEY,
    DEFAULT_MAX_TEXT_BYTES,
    EPOCH_HEADER,
    EPOCH_RULE,
    FRAME_OVERHEAD_BYTES,
    MAX_INT,
    RECEIVE_HEADER,
    REPLAY_SINCE_HEADER,
    RESUME_AFTER_HEADER,
    TOKEN_QUERY_PARAM,
    USER_ID_MAX_LEN,
    USER_ID_RULE,
    ErrorCode,
    Feature,
    Reason,
    Status,
    check_text,
    check_user_id,
    format_ts,
    is_unicode,
    is_valid_epoch,
    is_valid_user_id,
    parse_ts,
    parse_user_path,
    text_size,
)
from chatcli.protocol.v1 import (
    CLIENT_ID_MAX_LEN,
    HISTORY_MAX_LIMIT,
    INBOX_MAX_LIMIT,
    PREVIEW_MAX_CHARS,
    PROTOCOL_VERSION,
    SEARCH_MAX_LIMIT,
    SEARCH_TEXT_MAX_LEN,
    SUBPROTOCOL,
    Ack,
    ClientFrame,
    Conversation,
    Error,
    Frame,
    Hello,
    History,
    HistoryRequest,
    Inbox,
    InboxRequest,
    MarkRead,
    Message,
    PeerTyping,
    Presence,
    ReadPosition,
    Receipt,
    Received,
    Search,
    SearchRequest,
    Send,
    SendFields,
    ServerFrame,
    Typing,
    Watch,
    Who,
    WhoRequest,
    encode,
    encode_ack,
    encode_message,
    parse_client_frame,
    parse_server_frame,
    read_client_frame,
)

if TYPE_CHECKING:
    from chatcli.protocol.legacy import (
        LEGACY_CONNECTED,
        LEGACY_SEND_ERROR,
        LEGACY_SEND_SUCCESS,
        LegacyCommand,
        encode_legacy_message,
        legacy_error,
        parse_legacy_frame,
    )

__all__ = [
    "CLIENT_ID_MAX_LEN",
    "DEFAULT_AUTH_KEY",
    "DEFAULT_MAX_TEXT_BYTES",
    "EPOCH_HEADER",
    "EPOCH_RULE",
    "FRAME_OVERHEAD_BYTES",
    "HISTORY_MAX_LIMIT",
    "INBOX_MAX_LIMIT",
    "LEGACY_CONNECTED",
    "LEGACY_SEND_ERROR",
    "LEGACY_SEND_SUCCESS",
    "MAX_INT",
    "PREVIEW_MAX_CHARS",
    "PROTOCOL_VERSION",
    "RECEIVE_HEADER",
    "REPLAY_SINCE_HEADER",
    "RESUME_AFTER_HEADER",
    "SEARCH_MAX_LIMIT",
    "SEARCH_TEXT_MAX_LEN",
    "SUBPROTOCOL",
    "TOKEN_QUERY_PARAM",
    "USER_ID_MAX_LEN",
    "USER_ID_RULE",
    "Ack",
    "ClientFrame",
    "Conversation",
    "Error",
    "ErrorCode",
    "Feature",
    "Frame",
    "Hello",
    "History",
    "HistoryRequest",
    "Inbox",
    "InboxRequest",
    "LegacyCommand",
    "MarkRead",
    "Message",
    "PeerTyping",
    "Presence",
    "ReadPosition",
    "Reason",
    "Receipt",
    "Received",
    "Search",
    "SearchRequest",
    "Send",
    "SendFields",
    "ServerFrame",
    "Status",
    "Typing",
    "Watch",
    "Who",
    "WhoRequest",
    "check_text",
    "check_user_id",
    "encode",
    "encode_ack",
    "encode_legacy_message",
    "encode_message",
    "format_ts",
    "is_unicode",
    "is_valid_epoch",
    "is_valid_user_id",
    "legacy_error",
    "parse_client_frame",
    "parse_legacy_frame",
    "parse_server_frame",
    "parse_ts",
    "parse_user_path",
    "read_client_frame",
    "text_size",
]

#: What ``legacy`` exports, re-exported here on first use.
_LEGACY_NAMES: Final = frozenset({
    "LEGACY_CONNECTED", "LEGACY_SEND_ERROR", "LEGACY_SEND_SUCCESS", "LegacyCommand", "encode_legacy_message",
    "legacy_error", "parse_legacy_frame",
})


def __getattr__(name: str) -> object:
    """Load ``legacy`` when one of its names is first asked for (PEP 562), then keep them here.

    Its template regexes are most of the package's import time and only the server
    needs them. Once copied into this module's namespace, the names are found without
    this function, so the server's per-message uses cost a plain attribute lookup.
    """
    if name not in _LEGACY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from chatcli.protocol import legacy

    globals().update({exported: getattr(legacy, exported) for exported in _LEGACY_NAMES})
    return getattr(legacy, name)
