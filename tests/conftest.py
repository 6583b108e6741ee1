"""Shared fixtures: real ``chatcli serve`` processes and ``chatcli`` commands, reaped at teardown.

Only fixtures live here; the helpers and types they use are in ``tests/support/``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import (
    Chatcli,
    ChatcliProcess,
    RunningServer,
    StartServer,
    kill_leftovers,
    start_chatcli,
    start_server_process,
)


def pytest_configure(config: pytest.Config) -> None:
    """Give the commands under test the Ctrl-C a user's terminal gives them.

    A shell starting the suite in the background (``cmd &``) ignores SIGINT, every child inherits the
    ignoring, and the Ctrl-C tests then wait forever on a ``listen`` that never sees its SIGINT.
    A handler of our own is reset to the default at exec, so the children get SIGINT back.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: ``start_server("--auth-key", "k")`` starts a server; all are stopped at teardown.

    Keywords: ``env`` (extra variables), ``preexec_fn`` (run in the child before exec, e.g. to set rlimits).

    Each server stores messages in ``tmp_path/chatcli.db`` unless ``--db`` or ``--ephemeral`` is
    given, so a server restarted by a test finds the messages of the one before.
    """
    started: list[RunningServer] = []

    def factory(*args: str, env: dict[str, str] | None = None,
                preexec_fn: Callable[[], object] | None = None) -> RunningServer:
        argv = list(args)
        if "--db" not in argv and "--ephemeral" not in argv:
            argv += ["--db", str(tmp_path / "chatcli.db")]
        server = start_server_process(argv, env, preexec_fn=preexec_fn)
        started.append(server)
        return server

    yield factory
    kill_leftovers(server.proc for server in started)


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    """A fresh server with default options on ephemeral ports."""
    return start_server()


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated XDG directories, so tests never read or write the user's own config or data."""
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        path = tmp_path / var.lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    for var in ("CHATCLI_URL", "CHATCLI_AUTH_KEY", "CHATCLI_PROFILE", "CHATCLI_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def chatcli(tmp_home: Path) -> Iterator[Chatcli]:
    """Factory: ``chatcli("listen", "bob", "--url", url)`` starts the command; all are killed at teardown.

    Keyword ``stdin`` (text, or ``subprocess.PIPE`` to write later) and ``env`` (extra variables).
    """
    started: list[ChatcliProcess] = []

    def factory(*args: str, stdin: str | int | None = None, env: dict[str, str] | None = None) -> ChatcliProcess:
        running = start_chatcli(*args, stdin=stdin, env=env)
        started.append(running)
        return running

    yield factory
    kill_leftovers(running.proc for running in started)
