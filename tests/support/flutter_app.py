"""The seed Flutter app's side of the legacy protocol, emulated for tests: what it sends and what it reads.

The server never needs these (it parses what the app sends and encodes what the
app reads, in ``chatcli.protocol.legacy``); tests use them to prove the app
would display exactly what was sent.
"""

from __future__ import annotations

import json

from chatcli.errors import RemoteProtocolError
from chatcli.protocol import DEFAULT_AUTH_KEY, LEGACY_CONNECTED, LEGACY_SEND_ERROR, LEGACY_SEND_SUCCESS

__all__ = ["decode_legacy_message", "encode_legacy_send"]


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
