"""Where chatcli keeps its files: the XDG base directories, for the server and the clients alike.

One helper, so the config file, the chat's input recall and the server's default
database all follow the same ``$XDG_<KIND>_HOME`` rules and defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

__all__ = ["config_path", "default_db_path", "state_dir", "xdg_dir"]

XdgKind = Literal["CONFIG", "DATA", "STATE"]

#: The XDG Base Directory defaults, under the home directory, when ``$XDG_<KIND>_HOME`` is unset or empty.
_DEFAULTS: Final[dict[XdgKind, str]] = {"CONFIG": ".config", "DATA": ".local/share", "STATE": ".local/state"}


def xdg_dir(kind: XdgKind, env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_<KIND>_HOME/chatcli``, else ``~/<the XDG default>/chatcli``."""
    env = os.environ if env is None else env
    base = env.get(f"XDG_{kind}_HOME") or str(Path.home() / _DEFAULTS[kind])
    return Path(base) / "chatcli"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """The client profiles file: ``$XDG_CONFIG_HOME/chatcli/config.toml``."""
    return xdg_dir("CONFIG", env) / "config.toml"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the chat keeps the lines typed at its prompt: ``$XDG_STATE_HOME/chatcli``."""
    return xdg_dir("STATE", env)


def default_db_path(env: Mapping[str, str] | None = None) -> Path:
    """The server's database unless ``--db``: ``$XDG_DATA_HOME/chatcli/chatcli.db``."""
    return xdg_dir("DATA", env) / "chatcli.db"
