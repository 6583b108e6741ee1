"""A real ``redis-server`` for tests: our own process on a unix socket in a temporary folder.

Never the system service: each ``RedisServer`` is started here (``--port 0``: no TCP at all),
with ``--save '' --appendonly yes --appendfsync always`` (every write fsynced to its own AOF
before Redis answers), and stopped by its pid. ``kill()`` is a ``kill -9``; ``start()`` again
reopens the same AOF, as a Redis restarted after a crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import wait_until

__all__ = ["RedisServer", "redis_cli", "shared_redis"]


@dataclass
class RedisServer:
    """``redis-server`` in ``folder``; ``url`` is what ``chatcli serve --redis`` takes."""

    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.folder / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:  # never skipped: CI installs it (.ci/run)
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [executable, "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
             "--dir", str(self.folder), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--daemonize", "no", "--logfile", str(self.folder / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 10, "redis-server to accept connections")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                               + (self.folder / "redis.log").read_text(errors="replace")[-2000:])
        try:
            return redis_cli(self, "PING") == "PONG"
        except OSError:
            return False

    def kill(self) -> None:
        """``kill -9``: no chance to write anything more."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def redis_cli(server: RedisServer, *command: str) -> str:
    """Run one command over the socket (inline RESP) and return its first reply line, without the prefix."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(server.socket_path))
        sock.sendall(_resp(command))
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    line = reply.split(b"\r\n", 1)[0].decode()
    return line[1:] if line[:1] in "+-:$*" else line


def _resp(command: tuple[str, ...]) -> bytes:
    parts = [f"*{len(command)}\r\n".encode()]
    for arg in command:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


_shared: RedisServer | None = None


def shared_redis() -> RedisServer:
    """One ``redis-server`` for the in-process engine tests of this test run, started on first use and
    stopped (by pid) when the run ends."""
    global _shared
    if _shared is None:
        import atexit
        import tempfile

        _shared = RedisServer(Path(tempfile.mkdtemp(prefix="chatcli-redis-"))).start()
        atexit.register(_stop_shared)
    return _shared


def _stop_shared() -> None:
    if _shared is not None:
        _shared.stop()
        shutil.rmtree(_shared.folder, ignore_errors=True)
