"""What the benchmarks share about the servers they start: waiting for a port, reading a process's CPU time."""

from __future__ import annotations

import os
import socket
import time

__all__ = ["cpu_seconds", "wait_port"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid``, all its threads (from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 20) -> None:
    """Return once something accepts connections on loopback ``port``; exit the benchmark if nothing does."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")
