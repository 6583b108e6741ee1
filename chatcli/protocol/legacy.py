"""The seed's legacy frames, as the server parses and sends them: byte-exact for the unchanged Flutter app.

The app offers no subprotocol and speaks single-quoted pseudo-JSON with the
message text inserted raw (``{'auth':…,'cmd':'send','userid':…, 'msgtext':…}``);
the server answers with bare acknowledgements (``send:success``) and delivers
with ``encode_legacy_message``. Only the server speaks this protocol: the
package loads this module on first use, so client commands never pay for it.
Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NamedTuple

from chatcli.errors import RemoteProtocolError
from chatcli.protocol._values import ErrorCode, is_unicode

__all__ = [
    "LEGACY_CONNECTED",
    "LEGACY_SEND_ERROR",
    "LEGACY_SEND_SUCCESS",
    "LegacyCommand",
    "encode_legacy_message",
    "legacy_error",
    "parse_legacy_frame",
]

LEGACY_CONNECTED: Final = "connected"
LEGACY_SEND_SUCCESS: Final = "send:success"
LEGACY_SEND_ERROR: Final = "send:error"


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


#: The app's template byte for byte: what ``str.find`` found before, as one match (0.6 against 1.1 us a frame).
#: The userid ends at the first ``',`` (atomic group: no later one is tried); the text is everything up to the
#: final ``'}``.
_EXACT_TEMPLATE: Final = re.compile(
    r"\{'auth':'([^']*)','cmd':'([^']*)','userid':'(?>(.*?)',) ?'msgtext':'(.*)'\}\Z", re.DOTALL)


def _parse_exact_template(data: str) -> LegacyCommand | None:
    """The app's template byte for byte: the per-message fast path.

    Anything that deviates (other spacing, key order) returns ``None`` for the general parsers.
    """
    match = _EXACT_TEMPLATE.match(data)
    if match is None:
        return None
    auth, cmd, userid, text = match.groups()
    # tuple.__new__: LegacyCommand(...) is a NamedTuple's Python-level constructor, ~0.2 us more per message.
    return tuple.__new__(LegacyCommand, (cmd, auth, userid, text))


def _legacy_from_object(obj: dict[str, Any]) -> LegacyCommand:
    cmd, auth, userid, msgtext = (obj.get(key) for key in ("cmd", "auth", "userid", "msgtext"))
    if not isinstance(cmd, str) or not all(v is None or isinstance(v, str) for v in (auth, userid, msgtext)):
        raise RemoteProtocolError("seed frame fields must be strings", ErrorCode.BAD_FRAME)
    # Only JSON's escapes can make a lone surrogate (the frame itself arrived as UTF-8): such a "text"
    # could be neither stored nor delivered, so it is refused here, before anything acts on it.
    if not all(v is None or is_unicode(v) for v in (cmd, auth, userid, msgtext)):
        raise RemoteProtocolError("seed frame fields must be valid Unicode (no lone surrogates such as \\ud800)",
                                  ErrorCode.BAD_FRAME)
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

