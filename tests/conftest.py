"""Shared fixtures: a real ``chatcli serve`` process on ephemeral loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class RunningServer:
    """A ``chatcli serve`` subprocess; ``log`` collects its stderr lines as they come."""

    proc: subprocess.Popen[str]
    ws_port: int
    http_port: int
    args: list[str]
    log: list[str] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_log(self, needle: str, timeout: float = 5) -> bool:
        """Wait until a log line contains ``needle`` (polls: the lines arrive from a reader thread)."""
        try:
            wait_until(lambda: any(needle in line for line in list(self.log)), timeout, f"log line {needle!r}")
        except AssertionError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def _start(args: list[str], env: dict[str, str] | None = None, timeout: float = 20,
           preexec_fn: Callable[[], object] | None = None) -> RunningServer:
    cmd = [sys.executable, "-m", "chatcli", "serve", "--log-format", "json", *args]
    if "--ws-port" not in args:
        cmd += ["--ws-port", "0"]
    if "--http-port" not in args:
        cmd += ["--http-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
    ready = threading.Event()
    lines: list[str] = []
    ports: dict[str, int] = {}

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if not ready.is_set():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "listening":
                    ports.update(ws=event["ws_port"], http=event["http_port"])
                    ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not ports:
        proc.kill()
        raise RuntimeError("chatcli serve did not start:\n" + "\n".join(lines))
    server = RunningServer(proc, ports["ws"], ports["http"], args)
    server.log = lines
    return server


def _kill_leftovers(procs: Iterable[subprocess.Popen[str]]) -> None:
    """Teardown: kill whatever a test left running, and reap it."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
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
        server = _start(argv, env, preexec_fn=preexec_fn)
        started.append(server)
        return server

    yield factory
    _kill_leftovers(server.proc for server in started)


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
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


# ---------------------------------------------------------------------------
# Client commands (send / listen / chat) run through the real entry point
# ---------------------------------------------------------------------------


#: How often ``wait_until`` looks again at a condition it cannot be told about.
POLL_INTERVAL_S = 0.01


def wait_until(condition: Callable[[], object], timeout: float = 10, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


@dataclass
class ChatcliProcess:
    """A running ``python -m chatcli …``; its stdout and stderr lines are collected as they come."""

    proc: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)

    def start_pumps(self) -> None:
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            if stream is not None:
                pump = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                pump.start()
                self.pumps.append(pump)

    @staticmethod
    def _pump(stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line.rstrip("\n"))

    def wait_stderr(self, fragment: str, timeout: float = 10, count: int = 1) -> None:
        wait_until(lambda: sum(fragment in line for line in self.err) >= count, timeout,
                   f"{fragment!r} on stderr; got {self.err}")

    def wait_stdout_lines(self, n: int, timeout: float = 10) -> list[str]:
        wait_until(lambda: len(self.out) >= n, timeout, f"{n} stdout lines; got {self.out}, stderr {self.err}")
        return self.out

    def wait(self, timeout: float = 15) -> int:
        """The exit status, once the process has ended and all its output has been collected."""
        status = self.proc.wait(timeout=timeout)
        for pump in self.pumps:
            pump.join(timeout)
        return status


@pytest.fixture
def chatcli(tmp_home: Path) -> Iterator[Callable[..., ChatcliProcess]]:
    """Factory: ``chatcli("listen", "bob", "--url", url)`` starts the command; all are killed at teardown.

    Keyword ``stdin`` (text, or ``subprocess.PIPE`` to write later) and ``env`` (extra variables).
    """
    started: list[ChatcliProcess] = []

    def factory(*args: str, stdin: str | int | None = None, env: dict[str, str] | None = None) -> ChatcliProcess:
        proc = subprocess.Popen([sys.executable, "-m", "chatcli", *args], text=True,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **(env or {})})
        if isinstance(stdin, str):
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        running = ChatcliProcess(proc)
        running.start_pumps()
        started.append(running)
        return running

    yield factory
    _kill_leftovers(running.proc for running in started)
