"""Client settings: flag > environment > profile > default.

Profiles live in ``$XDG_CONFIG_HOME/chatcli/config.toml``::

    default_profile = "home"          # optional; else the profile named "default", if any

    [profiles.home]
    url = "ws://192.168.1.20:6060"
    auth_key_file = "~/.config/chatcli/home.key"   # or auth_key = "..."
    timeout = 5

Secrets can always come from somewhere other than argv (``CHATCLI_AUTH_KEY``, a
key file, a profile), because argv is visible to every user of the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from chatcli.errors import UsageError
from chatcli.protocol import DEFAULT_AUTH_KEY

DEFAULT_URL: Final = "ws://127.0.0.1:6060"
DEFAULT_TIMEOUT: Final = 10.0
ENV_URL: Final = "CHATCLI_URL"
ENV_AUTH_KEY: Final = "CHATCLI_AUTH_KEY"
ENV_PROFILE: Final = "CHATCLI_PROFILE"
_PROFILE_KEYS: Final = frozenset({"url", "auth_key", "auth_key_file", "timeout"})


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What every client command needs to reach the server."""

    url: str = DEFAULT_URL
    auth_key: str = DEFAULT_AUTH_KEY
    #: Seconds to wait for the server: to connect, and for each acknowledgement.
    timeout: float = DEFAULT_TIMEOUT
    profile: str | None = None


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "chatcli" / "config.toml"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the chat history lives (``$XDG_STATE_HOME/chatcli``)."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "chatcli"


def resolve_settings(
    *,
    url: str | None = None,
    auth_key: str | None = None,
    auth_key_file: Path | None = None,
    timeout: float | None = None,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientSettings:
    """Merge flags (the keyword arguments), the environment, the chosen profile and the defaults."""
    env = os.environ if env is None else env
    name, values = _load_profile(profile or env.get(ENV_PROFILE) or None, config_path(env))
    if auth_key is not None and auth_key_file is not None:
        raise UsageError("give --auth-key or --auth-key-file, not both")
    flag_key = _read_key_file(auth_key_file) if auth_key_file is not None else auth_key
    profile_key = values.get("auth_key")
    if profile_key is None and "auth_key_file" in values:
        profile_key = _read_key_file(Path(str(values["auth_key_file"])).expanduser())
    settings = ClientSettings(
        url=_first_str(url, env.get(ENV_URL), values.get("url"), DEFAULT_URL),
        auth_key=_first_str(flag_key, env.get(ENV_AUTH_KEY), profile_key, DEFAULT_AUTH_KEY),
        timeout=_check_timeout(timeout if timeout is not None else values.get("timeout", DEFAULT_TIMEOUT)),
        profile=name,
    )
    check_url(settings.url)
    return settings


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.netloc.endswith(":"):
        raise UsageError(f"invalid server URL {url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    if parts.query or parts.fragment:
        raise UsageError(f"invalid server URL {url!r}: no query or fragment, the user id is appended")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise UsageError(f"invalid server URL {url!r}: {exc}") from None
    return url


def _first_str(*candidates: object) -> str:
    for value in candidates:
        if value is not None and value != "":
            return str(value)
    raise AssertionError("no default given")  # pragma: no cover


def _check_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UsageError(f"timeout must be a positive number of seconds, not {value!r}")
    return float(value)


def _read_key_file(path: Path) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the auth key file {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the auth key file {str(path)!r} is not UTF-8 text") from None
    if not key:
        raise UsageError(f"the auth key file {str(path)!r} is empty")
    return key


def _load_profile(requested: str | None, path: Path) -> tuple[str | None, dict[str, Any]]:
    """The chosen profile's name and values; ``(None, {})`` when there is none to use."""
    document = _read_config(path) if path.is_file() else {}
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise UsageError(f"{path}: 'profiles' must be a table of [profiles.NAME] sections")
    default = document.get("default_profile")
    name = requested or (default if isinstance(default, str) else None)
    if name is None:
        return ("default", _check_profile(path, "default", profiles["default"])) if "default" in profiles \
            else (None, {})
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise UsageError(f"no profile {name!r} in {path} (profiles: {known})")
    return name, _check_profile(path, name, profiles[name])


def _read_config(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_profile(path: Path, name: str, values: object) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise UsageError(f"{path}: profile {name!r} must be a table")
    unknown = set(values) - _PROFILE_KEYS
    if unknown:
        raise UsageError(f"{path}: profile {name!r} has unknown keys {sorted(unknown)}; "
                         f"known: {sorted(_PROFILE_KEYS)}")
    return values
