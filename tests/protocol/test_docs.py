"""docs/protocol.md shows what the code does: every example parses and re-encodes byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

from chatcli.protocol import (
    EPOCH_HEADER,
    EPOCH_RULE,
    MAX_INT,
    RECEIVE_HEADER,
    REPLAY_SINCE_HEADER,
    RESUME_AFTER_HEADER,
    TOKEN_QUERY_PARAM,
    ErrorCode,
    Feature,
    Frame,
    Reason,
    Status,
    encode,
    encode_legacy_message,
    parse_client_frame,
    parse_legacy_frame,
    parse_server_frame,
)
from tests.support.flutter_app import decode_legacy_message, encode_legacy_send

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


#: A frame section's heading says its direction, e.g. "### `history` request (client → server)".
_DIRECTION = re.compile(r"^### .*\((client|server) → (?:client|server)\)$")


def _doc_json_examples() -> list[tuple[str, str]]:
    """Every line of every ```json block, with the direction of the section it is in."""
    examples: list[tuple[str, str]] = []
    direction, in_block = "", False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = _DIRECTION.match(line)
        if line.startswith("#"):
            direction = heading.group(1) if heading else ""
        elif line.startswith("```"):
            in_block = line == "```json"
            assert not in_block or direction, "a JSON example outside a frame section with a direction"
        elif in_block and line:
            examples.append((direction, line))
    return examples


def test_doc_json_examples_are_exact_encodings() -> None:
    examples = _doc_json_examples()
    client = {json.loads(line)["type"] for direction, line in examples if direction == "client"}
    server = {json.loads(line)["type"] for direction, line in examples if direction == "server"}
    assert client == {"send", "received", "history", "who", "watch", "read", "typing", "inbox", "search"}
    assert server == {"hello", "ack", "message", "history", "who", "presence", "error", "read", "receipt", "typing",
                      "inbox", "search"}
    for direction, line in examples:
        parse = parse_client_frame if direction == "client" else parse_server_frame
        assert encode(parse(line)) == line


def test_doc_examples_show_every_frame_class() -> None:
    shown = set()
    for direction, line in _doc_json_examples():
        shown.add(type((parse_client_frame if direction == "client" else parse_server_frame)(line)))
    assert shown == set(get_args(Frame))


def test_doc_names_every_stable_code_and_handshake_name() -> None:
    doc = DOC.read_text(encoding="utf-8")
    names = [*Reason, *ErrorCode, *Status, *Feature, RESUME_AFTER_HEADER,
             REPLAY_SINCE_HEADER, RECEIVE_HEADER, EPOCH_HEADER, EPOCH_RULE, f"?{TOKEN_QUERY_PARAM}=<token>",
             "duplicate", '"reset":true', "hidden", str(MAX_INT)]
    assert [name for name in names if name not in doc] == []
    for reason in Reason:
        assert f"| `{reason}` |" in doc  # each reason has a row saying when
    for code in ErrorCode:
        assert f"| `{code}` |" in doc


def test_doc_legacy_examples_are_exact() -> None:
    doc = DOC.read_text(encoding="utf-8")
    indented = [line[4:] for line in doc.splitlines() if line.startswith("    {'")]
    assert indented == [
        encode_legacy_send("bob", "it's 5 o'clock"),
        encode_legacy_message("alice", "it's 5 o'clock"),
        encode_legacy_message("alice", 'a "quote", a \\ and\na newline'),
    ]
    assert decode_legacy_message(indented[1]) == ("alice", "it's 5 o'clock")
    assert f"`{indented[1].replace(chr(39), chr(34))}`" in doc
    for inline in ('{"cmd":"send","auth":"addauthkeyifrequired","userid":"bob","msgtext":"hi"}',
                   "{'cmd':'send','userid':'bob','msgtext':'hi','auth':'k'}"):
        assert f"`{inline}`" in doc
        assert parse_legacy_frame(inline).msgtext == "hi"
