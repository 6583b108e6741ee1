"""Regenerate the shell completion scripts in this directory from the chatcli app.

    python completions/generate.py          # rewrite the scripts
    python completions/generate.py --check  # exit 1 if any script is stale

The scripts are Typer's: each asks ``chatcli`` itself for the candidates, so
new commands and options complete without regenerating. They only change when
the program name or Typer's templates change; tests/client/test_completions.py fails then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["SCRIPTS", "generate", "main"]

HERE = Path(__file__).resolve().parent
#: shell → file name, as each shell's completion directory expects it.
SCRIPTS = {"bash": "chatcli.bash", "zsh": "_chatcli", "fish": "chatcli.fish"}


def generate(shell: str) -> str:
    """The completion script for ``shell``, as the app prints it (program name ``chatcli``)."""
    run = subprocess.run(
        [sys.executable, "-c", "from chatcli.cli import app; app(prog_name='chatcli')"],
        env={**os.environ, "_CHATCLI_COMPLETE": f"source_{shell}"},
        capture_output=True, text=True, check=True, timeout=60,
    )
    return run.stdout.strip() + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for shell, name in SCRIPTS.items():
        path = HERE / name
        script = generate(shell)
        if "--check" in argv:
            if not path.is_file() or path.read_text() != script:
                stale.append(name)
        else:
            path.write_text(script)
    if stale:
        print(f"stale completion scripts: {', '.join(stale)}; run python completions/generate.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
