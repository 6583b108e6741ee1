"""chatcli.protocol._values: user ids, texts, timestamps, stable codes and handshake names."""

from __future__ import annotations

from typing import Any

import pytest

from chatcli.errors import InvalidUserId, LocalProtocolError, RemoteProtocolError
from chatcli.protocol import (
    DEFAULT_MAX_TEXT_BYTES,
    EPOCH_HEADER,
    RECEIVE_HEADER,
    REPLAY_SINCE_HEADER,
    RESUME_AFTER_HEADER,
    TOKEN_QUERY_PARAM,
    USER_ID_RULE,
    ErrorCode,
    Feature,
    Reason,
    Status,
    check_text,
    check_user_id,
    format_ts,
    is_valid_epoch,
    is_valid_user_id,
    parse_ts,
    parse_user_path,
    text_size,
)
from tests.support.samples import EPOCH

# ---------------------------------------------------------------------------
# Stable codes and handshake names
# ---------------------------------------------------------------------------


def test_stable_codes() -> None:
    assert list(Reason) == ["offline", "too-large", "empty", "bad-auth", "bad-recipient", "rate-limited",
                            "storage-failed", "bad-reply", "unavailable"]
    assert list(ErrorCode) == ["bad-json", "bad-frame", "unknown-type", "binary-unsupported", "unavailable",
                               "rate-limited"]
    assert sorted(Status) == ["delivered", "refused", "stored"]
    assert list(Feature) == ["store", "resume", "history", "presence", "tokens", "reads", "receipts", "typing",
                             "replies", "search"]


def test_handshake_names() -> None:
    assert (RESUME_AFTER_HEADER, REPLAY_SINCE_HEADER, RECEIVE_HEADER, EPOCH_HEADER) == (
        "Chatcli-After", "Chatcli-Since", "Chatcli-Receive", "Chatcli-Epoch")
    assert TOKEN_QUERY_PARAM == "token"
    assert parse_user_path(f"/alice?{TOKEN_QUERY_PARAM}=t%2Bk") == ("alice", {"token": "t+k"})


@pytest.mark.parametrize(("value", "valid"), [
    (EPOCH, True), ("a", True), ("A-z_0.9", True), ("x" * 64, True),
    ("", False), ("x" * 65, False), ("two words", False), ("é", False), ("a\r\nX-Evil: 1", False), (7, False),
    (None, False),
])
def test_epoch_rule(value: object, valid: bool) -> None:
    assert is_valid_epoch(value) is valid


# ---------------------------------------------------------------------------
# User ids
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "user", "query"),
    [
        ("/alice", "alice", {}),
        ("alice", "alice", {}),
        ("/al%69ce", "alice", {}),
        ("/a.b_c-d@e", "a.b_c-d@e", {}),
        ("/555?x=1", "555", {"x": "1"}),
        ("/bob?token=s3cr%20t&x=1", "bob", {"token": "s3cr t", "x": "1"}),
        ("/bob?", "bob", {}),
        ("/constructor", "constructor", {}),
        ("/toString", "toString", {}),
        ("/hasOwnProperty", "hasOwnProperty", {}),
        ("/" + "a" * 64, "a" * 64, {}),
    ],
)
def test_parse_user_path_accepts(target: str, user: str, query: dict[str, str]) -> None:
    assert parse_user_path(target) == (user, query)


@pytest.mark.parametrize(
    "target",
    [
        "/" + "a" * 65,
        "/a/b",
        "/a%2Fb",
        "//alice",
        "/.alice",
        "/-alice",
        "/_alice",
        "/@alice",
        "/al ice",
        "/al%20ice",
        "/alice%0A",
        "/é",
        "/%C3%A9",
        "/%ff",
        "/%zz",
        "/__proto__",
        "/alice#x",
    ],
)
def test_parse_user_path_refuses_bad_ids(target: str) -> None:
    with pytest.raises(InvalidUserId) as info:
        parse_user_path(target)
    assert info.value.code == "bad-user-id"
    assert isinstance(info.value, RemoteProtocolError)
    assert USER_ID_RULE in str(info.value)


@pytest.mark.parametrize("target", ["", "/", "/?token=x"])
def test_parse_user_path_refuses_empty_ids(target: str) -> None:
    with pytest.raises(InvalidUserId, match="no user id in the URL"):
        parse_user_path(target)


def test_invalid_id_in_error_message_is_truncated() -> None:
    with pytest.raises(InvalidUserId) as info:
        parse_user_path("/" + "x" * 500)
    assert "x" * 81 not in str(info.value)


def test_user_id_checks() -> None:
    assert check_user_id("alice") == "alice"
    assert is_valid_user_id("0")
    assert not is_valid_user_id("alice\n")
    assert not is_valid_user_id("")
    assert not is_valid_user_id(None)
    assert not is_valid_user_id(5)
    with pytest.raises(LocalProtocolError, match="invalid user id 5"):
        check_user_id(5)
    with pytest.raises(LocalProtocolError, match="invalid user id 'a b'"):
        check_user_id("a b")


# ---------------------------------------------------------------------------
# Texts and timestamps
# ---------------------------------------------------------------------------


def test_text_size_counts_utf8_bytes() -> None:
    assert text_size("") == 0
    assert text_size("abc") == 3
    assert text_size("aé😀") == 1 + 2 + 4
    assert text_size("\ud800") == 3  # a lone surrogate is counted, never a crash


@pytest.mark.parametrize(
    ("text", "limit", "verdict"),
    [
        ("", 8, Reason.EMPTY),
        ("a", 8, None),
        ("a" * 8, 8, None),
        ("a" * 9, 8, Reason.TOO_LARGE),
        ("é" * 4, 8, None),  # 8 bytes, exactly at the limit
        ("é" * 4 + "a", 8, Reason.TOO_LARGE),  # 9 bytes in 5 characters
        ("a" * 7 + "é", 8, Reason.TOO_LARGE),  # the 2-byte character straddles the limit
        ("a" * 6 + "é", 8, None),
        ("😀" * 2, 8, None),
        ("a" + "😀" * 2, 8, Reason.TOO_LARGE),
        ("😀", 3, Reason.TOO_LARGE),  # one character, four bytes
        ("a" * DEFAULT_MAX_TEXT_BYTES, DEFAULT_MAX_TEXT_BYTES, None),
        ("a" * (DEFAULT_MAX_TEXT_BYTES + 1), DEFAULT_MAX_TEXT_BYTES, Reason.TOO_LARGE),
        ("é" * (DEFAULT_MAX_TEXT_BYTES // 2), DEFAULT_MAX_TEXT_BYTES, None),
        ("é" * (DEFAULT_MAX_TEXT_BYTES // 2) + "a", DEFAULT_MAX_TEXT_BYTES, Reason.TOO_LARGE),
    ],
)
def test_check_text(text: str, limit: int, verdict: str | None) -> None:
    assert check_text(text, limit) == verdict


def test_check_text_default_limit_is_64_kib() -> None:
    assert check_text("a" * 65536) is None
    assert check_text("a" * 65537) == "too-large"


def test_format_ts() -> None:
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert format_ts(1795635287.5) == "2026-11-25T19:34:47.500Z"
    assert format_ts(1795635287.0015) == "2026-11-25T19:34:47.001Z"  # truncated to milliseconds
    assert format_ts(1795635287.0015) == "2026-11-25T19:34:47.001Z"  # the same time again: the cached text
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"  # and a new one is formatted afresh


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("1970-01-01T00:00:00.000Z", 0.0),
        ("1970-01-01T01:00:00+01:00", 0.0),
        ("2026-11-25T19:34:47.500Z", 1795635287.5),
        ("2026-11-25T14:34:47.500-05:00", 1795635287.5),
    ],
)
def test_parse_ts(value: str, epoch: float) -> None:
    assert parse_ts(value) == epoch


def test_timestamps_round_trip() -> None:
    for epoch in (0.0, 1.25, 1795635287.5, 4102444800.999):
        assert parse_ts(format_ts(epoch)) == pytest.approx(epoch, abs=1e-6)


@pytest.mark.parametrize("value", ["", "yesterday", "2026-13-01T00:00:00Z", None, 5])
def test_parse_ts_refuses_garbage(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="invalid timestamp"):
        parse_ts(value)


def test_parse_ts_refuses_naive_timestamps() -> None:
    with pytest.raises(LocalProtocolError, match="without a zone"):
        parse_ts("2026-11-25T19:34:47")
