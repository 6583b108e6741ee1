"""chatcli.protocol.legacy: the seed's frames, and what the Flutter app (tests/support/flutter_app.py) makes of them."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

from chatcli.errors import RemoteProtocolError
from chatcli.protocol import (
    DEFAULT_AUTH_KEY,
    LEGACY_CONNECTED,
    LEGACY_SEND_ERROR,
    LEGACY_SEND_SUCCESS,
    LegacyCommand,
    encode_legacy_message,
    legacy_error,
    parse_legacy_frame,
)
from tests.support.flutter_app import decode_legacy_message, encode_legacy_send
from tests.support.samples import NASTY_TEXTS

#: hypothesis is in the `test` extra; without it the nasty-string lists below still run.
HAS_HYPOTHESIS = find_spec("hypothesis") is not None


def test_nasty_texts_are_distinct() -> None:
    assert len(set(NASTY_TEXTS)) == len(NASTY_TEXTS)


def test_seed_template_exact() -> None:
    frame = "{'auth':'addauthkeyifrequired','cmd':'send','userid':'bob', 'msgtext':'hello'}"
    assert encode_legacy_send("bob", "hello") == frame
    assert parse_legacy_frame(frame) == LegacyCommand("send", DEFAULT_AUTH_KEY, "bob", "hello")


def test_encode_legacy_send_inserts_text_raw_like_the_app() -> None:
    frame = encode_legacy_send("bob", "it's", auth="k")
    assert frame == "{'auth':'k','cmd':'send','userid':'bob', 'msgtext':'it's'}"


@pytest.mark.parametrize("text", NASTY_TEXTS)
def test_template_keeps_text_and_recipient(text: str) -> None:
    command = parse_legacy_frame(encode_legacy_send("bob", text, auth="k3y"))
    assert command == LegacyCommand(cmd="send", auth="k3y", userid="bob", msgtext=text)


@pytest.mark.parametrize(
    ("frame", "command"),
    [
        ("{ 'auth' : 'k' , 'cmd' : 'send' , 'userid' : 'bob' , 'msgtext' : 'hi' } \n",
         LegacyCommand("send", "k", "bob", "hi")),
        ("{'auth':'','cmd':'send','userid':'', 'msgtext':''}", LegacyCommand("send", "", "", "")),
        ("{'auth':'k','cmd':'ping','userid':'bob', 'msgtext':'x'}", LegacyCommand("ping", "k", "bob", "x")),
        # strict JSON: any key order, escapes honoured
        ('{"msgtext":"it\'s \\"q\\"","userid":"bob","cmd":"send","auth":"k"}',
         LegacyCommand("send", "k", "bob", 'it\'s "q"')),
        ('{"cmd":"send","userid":"bob","msgtext":"hi"}', LegacyCommand("send", None, "bob", "hi")),
        ('{"cmd":"send","userid":"bob","msgtext":"hi","extra":[1]}',
         LegacyCommand("send", None, "bob", "hi")),
        # quote-replaced form: single quotes, other key order or missing keys
        ("{'cmd':'send','userid':'bob','msgtext':'hi','auth':'k'}", LegacyCommand("send", "k", "bob", "hi")),
        ("{'cmd':'list'}", LegacyCommand("list", None, None, None)),
        ("{'cmd':'send','userid':null,'msgtext':'hi'}", LegacyCommand("send", None, None, "hi")),
    ],
)
def test_legacy_forms(frame: str, command: LegacyCommand) -> None:
    assert parse_legacy_frame(frame) == command


@pytest.mark.parametrize(
    ("frame", "command"),
    [
        # the app's template without the space before 'msgtext'
        ("{'auth':'k','cmd':'send','userid':'bob','msgtext':'it's'}", LegacyCommand("send", "k", "bob", "it's")),
        # other spacing leaves the fast path for the general template
        ("{'auth':'k','cmd':'send','userid':'bob',  'msgtext':'it's'}", LegacyCommand("send", "k", "bob", "it's")),
        # template head and tail but no userid: read as quote-replaced JSON
        ("{'auth':'k','cmd':'send'}", LegacyCommand("send", "k", None, None)),
        ("{'auth':'k','cmd':'send','userid':'bob'}", LegacyCommand("send", "k", "bob", None)),
        # the userid ends at its first "'," (a quote inside it stays), never at a later one
        ("{'auth':'k','cmd':'send','userid':'o'b,x','msgtext':'hi'}", LegacyCommand("send", "k", "o'b,x", "hi")),
        ("{'auth':'k','cmd':'send','userid':'bob','msgtext':'a', 'msgtext':'b'}",
         LegacyCommand("send", "k", "bob", "a', 'msgtext':'b")),
    ],
)
def test_template_variants_read_like_the_template(frame: str, command: LegacyCommand) -> None:
    assert parse_legacy_frame(frame) == command


@pytest.mark.parametrize(
    "frame",
    [
        "{'auth':'a'b','cmd':'send','userid':'bob', 'msgtext':'hi'}",  # a quote inside auth
        "{'auth':'k','cmd':'se'nd','userid':'bob', 'msgtext':'hi'}",  # a quote inside cmd
        "{'auth':'k','cmd':'send','userid':'bob', 'msgtext':'}",  # cut off inside msgtext: not an empty text
    ],
)
def test_template_near_misses_are_refused(frame: str) -> None:
    with pytest.raises(RemoteProtocolError, match="not a seed frame"):
        parse_legacy_frame(frame)


@pytest.mark.parametrize(
    "frame",
    ["", "hello", "{", "}", "send:success", "[1,2]", '"str"', "null", "42", "{'cmd':", "{'auth':'k'",
     "{'auth':'k','cmd':'send','userid':'bob', 'msgtext':'no closing brace'", "[" * 100_000,
     "{'auth':'k','cmd':'send','userid':'bob','msgtext':'x'} trailing"],
)
def test_legacy_junk(frame: str) -> None:
    with pytest.raises(RemoteProtocolError, match="not a seed frame") as info:
        parse_legacy_frame(frame)
    assert info.value.code == "bad-frame"


@pytest.mark.parametrize(
    "frame",
    ['{"cmd":5,"userid":"bob"}', '{"userid":"bob","msgtext":"hi"}', '{"cmd":null}', "{}",
     '{"cmd":"send","userid":5,"msgtext":"hi"}', '{"cmd":"send","userid":"bob","msgtext":["hi"]}',
     '{"cmd":"send","auth":true}', "{'cmd':'send','msgtext':1}"],
)
def test_legacy_non_string_fields(frame: str) -> None:
    with pytest.raises(RemoteProtocolError, match="must be strings") as info:
        parse_legacy_frame(frame)
    assert info.value.code == "bad-frame"


@pytest.mark.parametrize(
    "frame",
    ['{"cmd":"send","auth":"k","userid":"bob","msgtext":"a\\ud800b"}',  # JSON
     "{'cmd':'send','auth':'k','userid':'bob','msgtext':'\\udfff'}",  # quote-replaced
     '{"cmd":"send\\ud83d","userid":"bob","msgtext":"hi"}', '{"cmd":"send","auth":"\\udc80"}',
     '{"cmd":"send","userid":"b\\ud800","msgtext":"hi"}'],
)
def test_legacy_lone_surrogates_are_refused(frame: str) -> None:
    # Text that cannot be encoded as UTF-8 could be neither stored nor delivered (it once crashed the commit).
    with pytest.raises(RemoteProtocolError, match="valid Unicode") as info:
        parse_legacy_frame(frame)
    assert info.value.code == "bad-frame"


def test_legacy_json_escapes_of_real_characters_are_kept() -> None:
    frame = '{"cmd":"send","auth":"k","userid":"bob","msgtext":"\\ud83d\\ude00 \\u00e9"}'  # a pair: one emoji
    assert parse_legacy_frame(frame) == LegacyCommand("send", "k", "bob", "\U0001f600 \u00e9")


@pytest.mark.parametrize(
    ("cmd", "ack"),
    [
        ("send", "send:error"),
        ("foo", "foo:error"),
        ("get_history-v2.1", "get_history-v2.1:error"),
        ("c" * 32, "c" * 32 + ":error"),
        ("", ":error"),
        ("c" * 33, LEGACY_SEND_ERROR),
        ("two words", LEGACY_SEND_ERROR),
        ("foo\n", LEGACY_SEND_ERROR),
        ("foo:error", LEGACY_SEND_ERROR),
        ("{'cmd'", LEGACY_SEND_ERROR),
        ("é", LEGACY_SEND_ERROR),
    ],
)
def test_legacy_error(cmd: str, ack: str) -> None:
    assert legacy_error(cmd) == ack


@pytest.mark.parametrize(
    ("sender", "text", "frame"),
    [
        ("alice", "hi", "{'cmd':'send','userid':'alice', 'msgtext':'hi'}"),
        ("alice", "é😀", "{'cmd':'send','userid':'alice', 'msgtext':'é😀'}"),
        ("alice", "it's", "{'cmd':'send','userid':'alice', 'msgtext':'it\\u0027s'}"),
        ("alice", 'say "hi"', "{'cmd':'send','userid':'alice', 'msgtext':'say \\\"hi\\\"'}"),
        ("alice", "a\\b", "{'cmd':'send','userid':'alice', 'msgtext':'a\\\\b'}"),
        ("alice", "1\n2\t\x00", "{'cmd':'send','userid':'alice', 'msgtext':'1\\n2\\t\\u0000'}"),
        ("alice", "\\'", "{'cmd':'send','userid':'alice', 'msgtext':'\\\\\\u0027'}"),
    ],
)
def test_encode_legacy_message_exact(sender: str, text: str, frame: str) -> None:
    assert encode_legacy_message(sender, text) == frame
    assert decode_legacy_message(frame) == (sender, text)


def _app_round_trip(sender: str, recipient: str, text: str) -> tuple[str, str] | None:
    """What the recipient's app shows after ``sender``'s app sent ``text`` through the relay."""
    command = parse_legacy_frame(encode_legacy_send(recipient, text))
    assert command.userid == recipient
    assert command.msgtext is not None
    return decode_legacy_message(encode_legacy_message(sender, command.msgtext))


@pytest.mark.parametrize("text", NASTY_TEXTS)
def test_legacy_round_trip_nasty_texts(text: str) -> None:
    assert _app_round_trip("alice", "bob", text) == ("alice", text)


if HAS_HYPOTHESIS:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    _FRAGMENTS = ["'", '"', "\\", "{", "}", ",", ":", "'userid':'", "'auth':'", "', 'msgtext':'", "'}",
                  "\\u0027", "\n", "\x00", "\x7f", "\u2028", "😀", "é", " "]
    _TEXTS = st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=8), max_size=20).map("".join)
    _IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", fullmatch=True)

    @settings(max_examples=400, deadline=None, database=None)
    @given(sender=_IDS, recipient=_IDS, text=_TEXTS | st.text())
    def test_legacy_round_trip_property(sender: str, recipient: str, text: str) -> None:
        assert _app_round_trip(sender, recipient, text) == (sender, text)

    @settings(max_examples=200, deadline=None, database=None)
    @given(cmd=st.text())
    def test_legacy_error_never_shorter_than_6_property(cmd: str) -> None:
        assert len(legacy_error(cmd)) >= 6
        assert decode_legacy_message(legacy_error(cmd)) is None


def test_no_legacy_server_frame_is_shorter_than_6_characters() -> None:
    frames = [LEGACY_CONNECTED, LEGACY_SEND_SUCCESS, LEGACY_SEND_ERROR, encode_legacy_message("a", "x")]
    frames += [legacy_error(cmd) for cmd in ("", "a", "send", "x" * 33, "\n")]
    assert min(len(frame) for frame in frames) == len(":error") == 6
    for frame in frames:
        decode_legacy_message(frame)  # the app's handler would throw on a shorter frame


@pytest.mark.parametrize("frame", [LEGACY_CONNECTED, LEGACY_SEND_SUCCESS, LEGACY_SEND_ERROR, "foo:error",
                                   "{\"cmd\":\"send\"}", "ping:error"])
def test_app_ignores_non_message_frames(frame: str) -> None:
    assert decode_legacy_message(frame) is None


@pytest.mark.parametrize("frame", ["", "a", "ok", "{'cmd"])
def test_app_throws_on_short_frames(frame: str) -> None:
    with pytest.raises(RemoteProtocolError, match="shorter than 6 characters"):
        decode_legacy_message(frame)


@pytest.mark.parametrize(
    "frame",
    [
        "{'cmd':'send','userid':'bob', 'msgtext':'it's'}",  # the seed server's raw apostrophe
        "{'cmd':'send','userid':'bob', 'msgtext':'a\nb'}",  # a raw control character
        "{'cmd':'send','userid':'bob', 'msgtext':'\\'}",
        "{'cmd':" + "[" * 100_000,
    ],
)
def test_app_throws_on_undecodable_frames(frame: str) -> None:
    with pytest.raises(RemoteProtocolError, match="the app cannot decode this frame"):
        decode_legacy_message(frame)


@pytest.mark.parametrize(
    "frame",
    ["{'cmd':'send','userid':'bob'}", "{'cmd':'send','msgtext':'hi'}",
     "{'cmd':'send','userid':1, 'msgtext':'x'}"],
)
def test_app_throws_without_string_author_and_text(frame: str) -> None:
    with pytest.raises(RemoteProtocolError, match="needs string userid and msgtext"):
        decode_legacy_message(frame)
