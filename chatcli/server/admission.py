"""Handshake admission: who may open a session, decided from the request and the server's state.

Pure: no I/O, and nothing changes. ``admit`` returns ``Admitted`` (with the
session's parameters) or ``Refused`` (an HTTP status and a one-line reason);
the transport sends the answer and records a failed authentication itself.
This is the one entry point of the rule "nothing is acted on before admission":
the transport sets a connection's user from ``Admitted`` and from nothing else.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Protocol

from websockets.datastructures import Headers

from chatcli import protocol as p
from chatcli.errors import InvalidUserId, LocalProtocolError, StorageError
from chatcli.server.config import ServerConfig

__all__ = ["AdmissionState", "Admitted", "Refused", "admit"]

#: Headers that must appear at most once: with two, which one wins would be a guess.
SINGLE_HEADERS: Final = ("Authorization", p.RECEIVE_HEADER, p.RESUME_AFTER_HEADER, p.REPLAY_SINCE_HEADER,
                          p.EPOCH_HEADER)
#: Digits of the largest message id (MAX_INT); checked before int(), which is slow on thousands of digits.
_MAX_ID_DIGITS: Final = len(str(p.MAX_INT))


@dataclass(frozen=True, slots=True)
class Admitted:
    """A handshake that passed every check, with the session's parameters."""

    user: str
    #: The id of the per-user token the session proved its user with (accounts on); None without accounts.
    #: The server closes the session once that is no longer the user's token (rotated, or account removed).
    token_id: bytes | None
    after: int | None = None
    since_ts: float | None = None
    #: The store the client's ``after`` belongs to (Chatcli-Epoch), if it said.
    epoch: str | None = None
    receive: bool = True

    @property
    def authenticated(self) -> bool:
        """The session proved its user with a per-user token."""
        return self.token_id is not None


@dataclass(frozen=True, slots=True)
class Refused:
    status: HTTPStatus
    reason: str
    #: Wrong credentials were offered: the caller counts it against the peer's address.
    auth_failure: bool = False


class AdmissionState(Protocol):
    """What admission reads of the server."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def connection_count(self) -> int: ...

    def accounts_on(self) -> bool: ...

    def verify_token(self, user: str, token: str) -> bytes | None:
        """The id of ``user``'s token if ``token`` is it, else None; raises StorageError when the accounts
        cannot be read."""
        ...

    def sessions_of(self, user: str) -> int: ...

    def auth_retry_after(self, address: str) -> float:
        """Seconds until ``address`` may authenticate again (0: now)."""
        ...


def admit(path: str, headers: Headers, *, legacy: bool, peer_address: str,
          state: AdmissionState) -> Admitted | Refused:
    """Decide a handshake whose WebSocket upgrade websockets already accepted.

    ``legacy``: the client offered no subprotocol (the seed app). Checks run cheapest and least
    revealing first: the path, repeated headers, capacity, the address's failed attempts, then the
    credentials, then the resume headers.
    """
    try:
        user, query = p.parse_user_path(path)
    except InvalidUserId as exc:
        return Refused(HTTPStatus.BAD_REQUEST, f"{exc}\n")
    refusal = _duplicate_header(headers) or _check_capacity(user, state) or _check_throttle(peer_address, state)
    if refusal is not None:
        return refusal
    try:
        token_id = _check_credentials(user, legacy, headers, query, state)
    except StorageError:
        return Refused(HTTPStatus.SERVICE_UNAVAILABLE, "the server cannot check credentials right now\n")
    if isinstance(token_id, Refused):
        return token_id
    if legacy:
        return Admitted(user, token_id)
    resume = _resume_point(headers)
    if isinstance(resume, Refused):
        return resume
    receive = headers.get(p.RECEIVE_HEADER, "all").lower() != "none"
    return Admitted(user, token_id, *resume, receive=receive)


def _duplicate_header(headers: Headers) -> Refused | None:
    for name in SINGLE_HEADERS:
        if len(headers.get_all(name)) > 1:
            return Refused(HTTPStatus.BAD_REQUEST, f"the {name} header must appear at most once\n")
    return None


def _check_capacity(user: str, state: AdmissionState) -> Refused | None:
    config = state.config
    if state.connection_count > config.max_connections:
        plural = "" if config.max_connections == 1 else "s"
        return Refused(HTTPStatus.SERVICE_UNAVAILABLE,
                       f"server full: {config.max_connections} connection{plural}; try again later\n")
    if state.sessions_of(user) >= config.max_sessions_per_user:
        return Refused(HTTPStatus.TOO_MANY_REQUESTS,
                       f"too many sessions for {user}: at most {config.max_sessions_per_user}\n")
    return None


def _check_throttle(peer_address: str, state: AdmissionState) -> Refused | None:
    wait = state.auth_retry_after(peer_address)
    if wait > 0:
        return Refused(HTTPStatus.TOO_MANY_REQUESTS,
                       f"too many failed authentication attempts: try again in {wait:.0f} s\n")
    return None


def _bearer(headers: Headers) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, credential = value.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


def _check_credentials(user: str, legacy: bool, headers: Headers, query: Mapping[str, str],
                       state: AdmissionState) -> bytes | Refused | None:
    """The id of the token the session proved its user with (None: no token, as without accounts), or
    why it is refused.

    With accounts, every session proves its user with a token (header, or ``?token=`` for seed
    apps). Without accounts, native sessions prove the shared key at the handshake and seed
    clients send it in each frame, as the old system did.
    """
    offered = _bearer(headers) or query.get(p.TOKEN_QUERY_PARAM)
    if state.accounts_on():
        if not offered:
            return Refused(HTTPStatus.UNAUTHORIZED,
                           f"authentication required: send 'Authorization: Bearer <token>' or add "
                           f"?{p.TOKEN_QUERY_PARAM}=<token> to the URL\n")
        token_id = state.verify_token(user, offered)
        if token_id is None:
            return Refused(HTTPStatus.FORBIDDEN, f"authentication refused: wrong token for {user}\n",
                           auth_failure=True)
        return token_id
    if legacy:
        return None
    if offered is None:
        return Refused(HTTPStatus.UNAUTHORIZED, "missing credentials: send the header 'Authorization: Bearer <key>'\n")
    if not hmac.compare_digest(offered.encode("utf-8", "surrogatepass"), state.config.auth_key.encode()):
        return Refused(HTTPStatus.FORBIDDEN, "authentication refused: wrong key\n", auth_failure=True)
    return None


def _resume_point(headers: Headers) -> Refused | tuple[int | None, float | None, str | None]:
    """Where a native client's backlog starts: after a message id (of the store named by an epoch), or since
    a time."""
    after, since = headers.get(p.RESUME_AFTER_HEADER), headers.get(p.REPLAY_SINCE_HEADER)
    epoch = headers.get(p.EPOCH_HEADER)
    if epoch is not None and not p.is_valid_epoch(epoch):
        return Refused(HTTPStatus.BAD_REQUEST, f"{p.EPOCH_HEADER} must be the epoch of a hello: {p.EPOCH_RULE}\n")
    if after is not None and not (after.isascii() and after.isdigit() and len(after) <= _MAX_ID_DIGITS
                                  and int(after) <= p.MAX_INT):
        return Refused(HTTPStatus.BAD_REQUEST,
                       f"{p.RESUME_AFTER_HEADER} must be a message id (a non-negative integer)\n")
    since_ts = None
    if since is not None:
        try:
            since_ts = p.parse_ts(since)
        except LocalProtocolError:
            return Refused(HTTPStatus.BAD_REQUEST, f"{p.REPLAY_SINCE_HEADER} must be an ISO 8601 time with a "
                                                   "zone, e.g. 2026-11-25T10:00:00Z\n")
    return (int(after) if after is not None else None), since_ts, epoch
