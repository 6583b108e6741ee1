"""chatcli.errors: each exception ends a command with its documented exit status."""

from __future__ import annotations

import pytest

from chatcli.errors import (
    AccountError,
    AnsweredNo,
    AnswerUnclear,
    AuthError,
    CertificateError,
    ChatcliError,
    ClientError,
    ConnectError,
    ExitStatus,
    InvalidUserId,
    LocalProtocolError,
    ProtocolError,
    RefusedError,
    RemoteProtocolError,
    StorageError,
    TimedOutError,
    UnknownFrameType,
    UsageError,
    exit_status_for,
)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (UsageError("empty message"), 2),
        (ConnectError("cannot reach ws://127.0.0.1:1"), 3),
        (CertificateError("the server's TLS certificate is not trusted"), 3),
        (AuthError("bad key"), 4),
        (RefusedError("recipient offline", reason="offline"), 5),
        (TimedOutError("no ack in 5 s"), 6),
        (AnsweredNo("alice answered no"), 7),
        (AnswerUnclear("neither yes nor no"), 8),
        (ClientError("something else"), 1),
        (KeyboardInterrupt(), 130),
        (LocalProtocolError("invalid user id 'a b'"), 2),  # bad usage, e.g. an invalid id on the command line
        (RemoteProtocolError("garbage from the server"), 1),
        (UnknownFrameType("unknown frame type 'x'"), 1),
        (InvalidUserId("invalid user id"), 1),
        (ProtocolError("protocol"), 1),
        (StorageError("not a chatcli database"), 1),
        (AccountError("name taken"), 9),  # `user add` of a taken name: a script can tell it apart
        (ChatcliError("chatcli"), 1),
        (ValueError("a bug"), 1),
        (OSError("disk"), 1),
    ],
)
def test_exit_status_for(exc: BaseException, status: int) -> None:
    assert exit_status_for(exc) == status
    assert isinstance(exit_status_for(exc), ExitStatus)


def test_protocol_error_codes() -> None:
    assert ProtocolError("x").code == "bad-frame"
    assert RemoteProtocolError("x", "bad-json").code == "bad-json"
    assert UnknownFrameType("x").code == "unknown-type"
    assert InvalidUserId("x").code == "bad-user-id"
    assert ProtocolError("x").message == "x"
    assert ProtocolError.__new__(ProtocolError).message == ""


def test_refused_error_carries_its_reason() -> None:
    assert RefusedError("no").reason == "refused"
    assert RefusedError("no", reason="too-large").reason == "too-large"


def test_the_readme_table_lists_every_exit_status() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(f"| {int(status)} |" in readme for status in ExitStatus)
