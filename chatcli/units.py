"""Small value parsers shared by commands: durations and the XDG locations of chatcli's files."""

from __future__ import annotations

import os
import re
from pathlib import Path

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\Z")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s``, ``500ms`` or plain ``45``; ValueError otherwise."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use a number with ms, s, m, h, d or w, e.g. 30d")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def xdg_dir(kind: str) -> Path:
    """``$XDG_<KIND>_HOME/chatcli`` with the XDG defaults (data, state, config)."""
    defaults = {"DATA": ".local/share", "STATE": ".local/state", "CONFIG": ".config"}
    base = os.environ.get(f"XDG_{kind}_HOME") or str(Path.home() / defaults[kind])
    return Path(base) / "chatcli"


def default_db_path() -> Path:
    return xdg_dir("DATA") / "chatcli.db"
