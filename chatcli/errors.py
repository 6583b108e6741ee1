"""One exception tree for chatcli, and the one table that maps it to exit statuses.

    ChatcliError
    ├── ProtocolError                 a frame or a value breaks the protocol
    │   ├── LocalProtocolError        we tried to build or send something invalid (our bug or bad usage)
    │   └── RemoteProtocolError       the peer sent something invalid; carries a stable ``code``
    │       ├── UnknownFrameType      a well-formed frame of a type we don't know (newer peer)
    │       └── InvalidUserId         a user id outside the documented charset/length
    ├── StorageError                  the server's database is unusable (not a chatcli db, newer schema, I/O)
    │   └── EngineUnavailable         the shared store (Redis) is out of reach for now; sends are refused at once
    ├── AccountError               9  ``user add`` of a taken name, ``user remove``/``rotate`` of an unknown one
    └── ClientError                   what a client command can end with; each has an exit status
        ├── UsageError                2  bad arguments or input (empty message, no TEXT on a terminal)
        ├── ConnectError              3  cannot reach the server, or it went away
        │   └── CertificateError      3  the wss:// server's certificate is not trusted
        ├── AuthError                 4  the server refused our credentials
        ├── RefusedError              5  the server refused a message (reason in ``reason``)
        ├── TimedOutError             6  nothing happened in time
        ├── AnsweredNo                7  ``ask --yes-no``: the answer was no (no, n, deny)
        └── AnswerUnclear             8  ``ask --yes-no``: the answer was neither yes nor no

Command code raises these and never handles them; ``exit_status_for`` is the only
place that turns an exception into an exit status (as HTTPie does).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["AccountError", "AnswerUnclear", "AnsweredNo",
           "AuthError", "CertificateError", "ChatcliError", "ClientError", "ConnectError", "EngineUnavailable",
           "ExitStatus", "InvalidUserId", "LocalProtocolError", "ProtocolError", "RefusedError",
           "RemoteProtocolError", "StorageError", "TimedOutError", "UnknownFrameType", "UsageError",
           "exit_status_for"]

class ExitStatus(IntEnum):
    """Exit statuses of the client commands; the README has the same table."""

    SUCCESS = 0
    ERROR = 1
    USAGE = 2
    CONNECT = 3
    AUTH = 4
    REFUSED = 5
    TIMEOUT = 6
    ANSWERED_NO = 7
    ANSWER_UNCLEAR = 8
    ACCOUNT = 9
    INTERRUPTED = 130


class ChatcliError(Exception):
    """Root of every exception chatcli raises on purpose."""


class ProtocolError(ChatcliError):
    """A frame or value does not follow the protocol."""

    code = "bad-frame"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class LocalProtocolError(ProtocolError):
    """We were asked to build or encode something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class UnknownFrameType(RemoteProtocolError):
    """A well-formed frame whose type this version does not know."""

    code = "unknown-type"


class InvalidUserId(RemoteProtocolError):
    """A user id outside the documented charset or length."""

    code = "bad-user-id"


class StorageError(ChatcliError):
    """The message/accounts database cannot be opened, migrated or written."""


class EngineUnavailable(StorageError):
    """The store shared by several server processes (Redis) cannot be reached now; it may come back."""


class AccountError(ChatcliError):
    """An accounts operation found the wrong state: the name is taken, or there is no such account.

    A status of its own, so that a provisioning script can tell "already there" (or "already gone")
    from a failure.
    """


class ClientError(ChatcliError):
    """An outcome of a client command that has its own exit status."""

    exit_status = ExitStatus.ERROR


class UsageError(ClientError):
    exit_status = ExitStatus.USAGE


class ConnectError(ClientError):
    exit_status = ExitStatus.CONNECT


class CertificateError(ConnectError):
    """The wss:// server's certificate is not trusted (unknown CA, wrong host, expired).

    Retrying cannot fix it, so ``listen`` and ``chat`` stop instead of reconnecting.
    """


class AuthError(ClientError):
    exit_status = ExitStatus.AUTH


class RefusedError(ClientError):
    """The server refused a message; ``reason`` is its stable refusal code."""

    exit_status = ExitStatus.REFUSED

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class TimedOutError(ClientError):
    exit_status = ExitStatus.TIMEOUT


class AnsweredNo(ClientError):
    """``chatcli ask --yes-no`` got a no."""

    exit_status = ExitStatus.ANSWERED_NO


class AnswerUnclear(ClientError):
    """``chatcli ask --yes-no`` got an answer that is neither yes nor no (printed on stdout)."""

    exit_status = ExitStatus.ANSWER_UNCLEAR


def exit_status_for(exc: BaseException) -> ExitStatus:
    """The single mapping from an exception to a process exit status."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitStatus.INTERRUPTED
    if isinstance(exc, ClientError):
        return exc.exit_status
    if isinstance(exc, LocalProtocolError):
        return ExitStatus.USAGE
    if isinstance(exc, AccountError):
        return ExitStatus.ACCOUNT
    return ExitStatus.ERROR
