"""Shared fixtures: a real ``chatcli serve`` process on ephemeral loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in list(self.log)):
                return True
            time.sleep(0.01)
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def _start(args: list[str], env: dict[str, str] | None = None, timeout: float = 20) -> RunningServer:
    cmd = [sys.executable, "-m", "chatcli", "serve", "--log-format", "json", *args]
    if "--ws-port" not in args:
        cmd += ["--ws-port", "0"]
    if "--http-port" not in args:
        cmd += ["--http-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
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


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Factory: ``start_server("--auth-key", "k")`` starts a server; all are stopped at teardown."""
    started: list[RunningServer] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> RunningServer:
        server = _start(list(args), env)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


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
