"""Real processes for end-to-end tests: a ``chatcli serve`` on ephemeral loopback ports, a running
``python -m chatcli …`` command, waiting on either, and reading the server's metrics.

The fixtures that start and reap these are in ``tests/conftest.py``; the types are here so test modules
can name them (``StartServer``, ``Chatcli``) without importing from a conftest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = [
    "POLL_INTERVAL_S",
    "Chatcli",
    "ChatcliProcess",
    "RunningServer",
    "StartServer",
    "kill_leftovers",
    "metric",
    "start_chatcli",
    "start_server_process",
    "wait_until",
]

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


def start_server_process(args: list[str], env: dict[str, str] | None = None, timeout: float = 20,
           preexec_fn: Callable[[], object] | None = None) -> RunningServer:
    """Start ``chatcli serve --log-format json`` with ``args``; return once it logs the ports it listens on."""
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



def start_chatcli(*args: str, stdin: str | int | None = None, env: dict[str, str] | None = None) -> ChatcliProcess:
    """Start ``python -m chatcli *args`` with its output collected; ``stdin`` is text, or ``subprocess.PIPE``."""
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
    return running


def kill_leftovers(procs: Iterable[subprocess.Popen[str]]) -> None:
    """Teardown: kill whatever a test left running, and reap it."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



def metric(server: RunningServer, name: str, labels: str = "") -> float:
    """One value from the server's ``/metrics`` page (0 when the series is absent)."""
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


#: The ``start_server`` fixture: ``start_server("--auth-key", "k")`` starts a server.
StartServer = Callable[..., RunningServer]
#: The ``chatcli`` fixture: ``chatcli("listen", "bob", "--url", url)`` starts a command.
Chatcli = Callable[..., ChatcliProcess]
