"""Shell completions: the stored scripts match the app, and they complete commands and options."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_completions", COMPLETIONS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_stored_scripts_are_up_to_date(shell: str) -> None:
    generator = load_generator()
    stored = (COMPLETIONS / generator.SCRIPTS[shell]).read_text()
    assert stored == generator.generate(shell), "stale: run python completions/generate.py"


def complete_bash(words: str) -> list[str]:
    """What bash would offer after ``words`` (the app's own completion protocol, as the script calls it)."""
    parts = words.split(" ")
    run = subprocess.run(
        [sys.executable, "-c", "from chatcli.cli import app; app(prog_name='chatcli')"],
        env={**os.environ, "_CHATCLI_COMPLETE": "complete_bash", "COMP_WORDS": words,
             "COMP_CWORD": str(len(parts) - 1)},
        capture_output=True, text=True, timeout=30, check=True)
    return run.stdout.split()


def test_commands_and_options_complete() -> None:
    assert {"send", "listen", "history", "who", "chat", "serve"} <= set(complete_bash("chatcli "))
    assert {"--count", "--from", "--no-reconnect", "--url", "--auth-key-file", "--token-file", "--cafile",
            "--insecure"} <= set(complete_bash("chatcli listen bob --"))
    assert {"--json", "--token-file", "--cafile", "--insecure"} <= set(complete_bash("chatcli who alice --"))


def test_scripting_commands_and_options_complete() -> None:
    assert {"ask", "search"} <= set(complete_bash("chatcli "))
    assert {"--exec", "--parallel", "--max-attempts", "--dead-letter", "--exec-timeout"} <= set(
        complete_bash("chatcli listen bob --"))
    assert {"--reply-to"} <= set(complete_bash("chatcli send alice bob --"))
    assert {"--any", "--yes-no", "--json", "--timeout"} <= set(complete_bash("chatcli ask alice bob --"))
    assert {"--peer", "--since", "--limit", "--json"} <= set(complete_bash("chatcli search alice --"))


def test_fish_gets_one_line_per_candidate_however_long_its_help(tmp_path: Path) -> None:
    # What completions/chatcli.fish runs: each line is a candidate, its help after a tab.
    script = Path(sys.executable).parent / "chatcli"  # the console script the shell runs
    run = subprocess.run([str(script)], capture_output=True, text=True, timeout=30, check=True,
                         env={**os.environ, "_CHATCLI_COMPLETE": "complete_fish", "COLUMNS": "80",
                              "_TYPER_COMPLETE_FISH_ACTION": "get-args",
                              "_TYPER_COMPLETE_ARGS": "chatcli send alice bob --auth-key"})
    lines = run.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["--auth-key", "--auth-key-file"], lines
    assert "prefer CHATCLI_AUTH_KEY or --auth-key-file." in lines[0]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_completes_in_bash(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "chatcli").symlink_to(Path(sys.executable).parent / "chatcli")
    script = (f"source {COMPLETIONS / 'chatcli.bash'}; COMP_WORDS=(chatcli li); COMP_CWORD=1; "
              "_chatcli_completion chatcli; echo \"${COMPREPLY[@]}\"")
    run = subprocess.run(["bash", "-c", script], env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
                         capture_output=True, text=True, timeout=30, check=True)
    assert run.stdout.split() == ["listen"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_completion_writes_the_script(tmp_path: Path) -> None:
    # Typer detects the shell from the parent processes; "; true" keeps bash from exec-ing chatcli.
    chatcli = Path(sys.executable).parent / "chatcli"
    run = subprocess.run(["bash", "-c", f"{chatcli} --install-completion; true"], env={**os.environ,
                         "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=30)
    assert "bash completion installed" in run.stdout, run.stdout + run.stderr
    assert "_chatcli_completion" in (tmp_path / ".bash_completions" / "chatcli.sh").read_text()
    assert "chatcli.sh" in (tmp_path / ".bashrc").read_text()


def test_the_chat_experience_completes() -> None:
    assert "inbox" in complete_bash("chatcli ")
    assert {"--json", "--count", "--limit"} <= set(complete_bash("chatcli inbox alice --"))
    assert {"--notify", "--no-receipts", "--no-typing"} <= set(complete_bash("chatcli chat alice --"))
    assert {"bell", "desktop", "off"} <= set(complete_bash("chatcli chat alice --notify "))
    assert "--mark-read" in complete_bash("chatcli history alice bob --")
    assert "--mark-read" in complete_bash("chatcli listen alice --")
