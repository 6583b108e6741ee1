"""``admit``, in-process: every handshake rule, decided from the request and the server's state alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus

import pytest
from websockets.datastructures import Headers

from chatcli import protocol as p
from chatcli.errors import StorageError
from chatcli.server.admission import Admitted, Refused, admit
from chatcli.server.config import ServerConfig

KEY = f"Bearer {p.DEFAULT_AUTH_KEY}"


@dataclass
class State:
    """The server state admission reads, set per test."""

    config: ServerConfig = field(default_factory=ServerConfig)
    connection_count: int = 1
    tokens: dict[str, str] | None = None  # None: no accounts
    sessions: dict[str, int] = field(default_factory=dict)
    retry_after: float = 0.0
    storage_broken: bool = False

    def accounts_on(self) -> bool:
        if self.storage_broken:
            raise StorageError("database disk image is malformed")
        return self.tokens is not None

    def verify_token(self, user: str, token: str) -> bytes | None:
        """A token's id here: its own bytes."""
        return token.encode() if self.tokens is not None and self.tokens.get(user) == token else None

    def sessions_of(self, user: str) -> int:
        return self.sessions.get(user, 0)

    def auth_retry_after(self, address: str) -> float:
        return self.retry_after


def decide(path: str = "/alice", headers: list[tuple[str, str]] | None = None, legacy: bool = False,
           state: State | None = None) -> Admitted | Refused:
    return admit(path, Headers(headers if headers is not None else [("Authorization", KEY)]), legacy=legacy,
                 peer_address="192.0.2.1", state=state or State())


def test_the_shared_key_admits_a_native_session_with_its_resume_point() -> None:
    verdict = decide(headers=[("Authorization", KEY), (p.RESUME_AFTER_HEADER, "41"), (p.RECEIVE_HEADER, "none")])
    assert verdict == Admitted("alice", token_id=None, after=41, since_ts=None, receive=False)
    assert not verdict.authenticated


def test_a_seed_app_needs_no_key_at_the_handshake_without_accounts() -> None:
    assert decide(headers=[], legacy=True) == Admitted("alice", token_id=None)


def test_with_accounts_only_the_users_own_token_admits() -> None:
    state = State(tokens={"alice": "t-alice", "bob": "t-bob"})
    # The verdict names the token proved: the server closes the session once it is no longer alice's.
    native = decide(headers=[("Authorization", "Bearer t-alice")], state=state)
    assert native == Admitted("alice", b"t-alice") and native.authenticated
    assert decide("/alice?token=t-alice", [], legacy=True, state=state) == Admitted("alice", b"t-alice")
    wrong = decide(headers=[("Authorization", "Bearer t-bob")], state=state)
    assert isinstance(wrong, Refused) and wrong.status == HTTPStatus.FORBIDDEN and wrong.auth_failure
    missing = decide(headers=[], legacy=True, state=state)
    assert isinstance(missing, Refused) and missing.status == HTTPStatus.UNAUTHORIZED and not missing.auth_failure


@pytest.mark.parametrize(("path", "headers", "state", "status", "needle"), [
    ("/%ff", None, State(), 400, "user id"),
    ("/alice", [("Authorization", KEY), ("authorization", KEY)], State(), 400, "Authorization header"),
    ("/alice", [("Authorization", KEY), (p.RESUME_AFTER_HEADER, "9" * 5000)], State(), 400, "Chatcli-After"),
    ("/alice", [("Authorization", KEY), (p.RESUME_AFTER_HEADER, str(p.MAX_INT + 1))], State(), 400, "Chatcli-After"),
    ("/alice", [("Authorization", KEY), (p.REPLAY_SINCE_HEADER, "yesterday")], State(), 400, "ISO 8601"),
    ("/alice", [], State(), 401, "missing credentials"),
    ("/alice", [("Authorization", "Basic abc")], State(), 401, "missing credentials"),
    ("/alice", [("Authorization", "Bearer nope")], State(), 403, "wrong key"),
    ("/alice", None, State(connection_count=20001), 503, "server full"),
    ("/alice", None, State(sessions={"alice": 16}), 429, "too many sessions"),
    ("/alice", None, State(retry_after=42.2), 429, "try again in 42 s"),
    ("/alice", None, State(storage_broken=True), 503, "cannot check credentials"),
])
def test_refusals_carry_a_status_and_a_reason(path: str, headers: list[tuple[str, str]] | None, state: State,
                                               status: int, needle: str) -> None:
    verdict = decide(path, headers, state=state)
    assert isinstance(verdict, Refused)
    assert verdict.status == status and needle in verdict.reason and verdict.reason.endswith("\n")


def test_the_throttle_is_checked_before_the_credentials() -> None:
    """A throttled guesser cannot tell a right token from a wrong one."""
    state = State(tokens={"alice": "t-alice"}, retry_after=30)
    verdict = decide(headers=[("Authorization", "Bearer t-alice")], state=state)
    assert isinstance(verdict, Refused) and verdict.status == HTTPStatus.TOO_MANY_REQUESTS


def test_a_resume_point_names_its_store() -> None:
    verdict = decide(headers=[("Authorization", KEY), (p.RESUME_AFTER_HEADER, "7"), (p.EPOCH_HEADER, "ab12")])
    assert isinstance(verdict, Admitted) and (verdict.after, verdict.epoch) == (7, "ab12")
    for bad in ([(p.EPOCH_HEADER, "not an epoch!")], [(p.EPOCH_HEADER, "a"), (p.EPOCH_HEADER, "b")]):
        refused = decide(headers=[("Authorization", KEY), *bad])
        assert isinstance(refused, Refused) and refused.status == HTTPStatus.BAD_REQUEST
        assert p.EPOCH_HEADER in refused.reason
