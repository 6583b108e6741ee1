"""docs/scaling.md's three-node recipe, run as written: a message crosses nodes, `who` sees across them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.processes import Chatcli, wait_until

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def recipe_blocks() -> list[str]:
    """The ```sh blocks of the section "Three nodes on one machine": start, talk, stop."""
    section = DOC.read_text().split("## Three nodes on one machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_the_three_node_recipe_runs_as_written(tmp_path: Path, chatcli: Chatcli) -> None:
    start, _, stop = recipe_blocks()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-e", "-c", start], cwd=tmp_path, env=env, check=True, timeout=30)
    folder = tmp_path / "cluster"
    try:
        wait_until(lambda: all(healthy(8000 + n) for n in (1, 2, 3)), 20, "three healthy nodes")
        bob = chatcli("listen", "bob", "--url", "ws://127.0.0.1:6062")
        bob.wait_stderr("listening as")
        assert chatcli("send", "alice", "bob", "hello from node 1", "--url", "ws://127.0.0.1:6061").wait() == 0
        assert "hello from node 1" in bob.wait_stdout_lines(1)[0]
        who = chatcli("who", "alice", "--url", "ws://127.0.0.1:6063")
        assert who.wait() == 0 and "bob" in who.out
    finally:
        subprocess.run(["bash", "-c", stop], cwd=folder, env=env, timeout=30)
    pids = [int(pid) for pid in (folder / "nodes.pid").read_text().split()]
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 10, "the nodes to stop")
