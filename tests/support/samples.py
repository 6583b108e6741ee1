"""Sample values the protocol tests share: a timestamp, a store epoch, and texts that broke the seed."""

from __future__ import annotations

__all__ = ["EPOCH", "NASTY_TEXTS", "TS"]

TS = "2026-11-25T19:34:47.123Z"
EPOCH = "5d1c0a3e9f7b4e21a8c6d2f0b3e94a17"

#: Texts that broke the seed server or its escaping: quotes, backslashes, braces, fake keys, controls, emoji.
NASTY_TEXTS = [
    "hi",
    "it's",
    "'",
    "''",
    "'''",
    '"',
    '"quoted"',
    '"""',
    "\\",
    "\\\\",
    "\\'",
    '\\"',
    "\\u0027",
    "\\n",
    "ends with a backslash\\",
    "{",
    "}",
    "{}",
    "'}",
    "'}'}",
    '"}',
    "{'cmd':'send','userid':'mallory', 'msgtext':'boo'}",
    '{"cmd":"send","userid":"mallory","msgtext":"boo"}',
    "x','userid':'mallory",
    "','auth':'other",
    "', 'msgtext':'evil'}",
    "'msgtext':'",
    "line one\nline two",
    "\r\n",
    "\t tab",
    "\x00nul",
    "\x1b[31mred\x1b[0m",
    "\x7f",
    "\u2028\u2029",
    "\ufeffbom",
    "zero\u200bwidth",
    "é",
    "日本語のテキスト",
    "😀",
    "👩‍👩‍👧 family",
    "🏳️‍🌈",
    "  ",
    " leading",
    "trailing ",
    "null",
    "true",
    "</script><script>alert(1)</script>",
    "%00%27",
    "send:success",
    "a" * 1000 + "'" + "b" * 1000,
    "'\"\\{}\n😀" * 200,
]
