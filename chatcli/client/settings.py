"""Client settings, the room where flags, environment, profiles and defaults meet (in that order).

Profiles live in ``$XDG_CONFIG_HOME/chatcli/config.toml``::

    default_profile = "home"          # optional; else the profile named "default", if any

    [profiles.home]
    url = "wss://chat.example.org:6060"
    token_file = "~/.config/chatcli/alice.token"   # or token = "..." (servers with accounts)
    auth_key_file = "~/.config/chatcli/home.key"   # or auth_key = "..." (servers without)
    cafile = "~/.config/chatcli/home-ca.pem"       # trust this CA for wss://
    timeout = 5
    receipts = false                               # chat: send no read receipts (--no-receipts)
    typing = false                                 # chat: send no typing events (--no-typing)
    notify = "desktop"                             # chat: bell (default), desktop or off (--notify)

Secrets can always come from somewhere other than argv (``CHATCLI_TOKEN``,
``CHATCLI_AUTH_KEY``, a file, a profile), because argv is visible to every user
of the machine. A token, when set, is sent instead of the shared key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from chatcli.errors import UsageError
from chatcli.paths import config_path
from chatcli.protocol import DEFAULT_AUTH_KEY

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_URL", "NOTIFY_MODES", "ClientSettings", "check_url", "resolve_settings"]

DEFAULT_URL: Final = "ws://127.0.0.1:6060"
DEFAULT_TIMEOUT: Final = 10.0
ENV_URL: Final = "CHATCLI_URL"
ENV_AUTH_KEY: Final = "CHATCLI_AUTH_KEY"
ENV_PROFILE: Final = "CHATCLI_PROFILE"
ENV_TOKEN: Final = "CHATCLI_TOKEN"
_PROFILE_KEYS: Final = frozenset({"url", "auth_key", "auth_key_file", "token", "token_file", "cafile", "timeout",
                                  "receipts", "typing", "notify"})
#: How the chat alerts its user to a message for another conversation (``--notify``).
NOTIFY_MODES: Final = ("bell", "desktop", "off")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What every client command needs to reach the server."""

    url: str = DEFAULT_URL
    #: Secrets stay out of repr(), so a traceback or a debug print never shows them.
    auth_key: str = field(default=DEFAULT_AUTH_KEY, repr=False)
    #: The user's own token (servers with accounts); sent instead of ``auth_key`` when set.
    token: str | None = field(default=None, repr=False)
    #: Seconds to wait for the server: to connect, and for each acknowledgement.
    timeout: float = DEFAULT_TIMEOUT
    profile: str | None = None
    #: A CA certificate (PEM) to trust for wss://, instead of the system's.
    cafile: Path | None = None
    #: Skip TLS certificate verification (``--insecure``).
    insecure: bool = False
    #: The chat's preferences (profile keys; the chat's flags override them): send read receipts, send
    #: typing events, and how to alert to a message for another conversation (one of NOTIFY_MODES).
    receipts: bool = True
    typing: bool = True
    notify: str = "bell"

    @property
    def credential(self) -> str:
        """What the handshake presents as ``Authorization: Bearer``: the token, else the shared key."""
        return self.token if self.token is not None else self.auth_key

    @property
    def uses_tls(self) -> bool:
        return self.url.lower().startswith("wss://")


def resolve_settings(
    *,
    url: str | None = None,
    auth_key: str | None = None,
    auth_key_file: Path | None = None,
    timeout: float | None = None,
    profile: str | None = None,
    token_file: Path | None = None,
    cafile: Path | None = None,
    insecure: bool = False,
    env: Mapping[str, str] | None = None,
) -> ClientSettings:
    """Merge flags (the keyword arguments), the environment, the chosen profile and the defaults."""
    env = os.environ if env is None else env
    name, values = _load_profile(profile or env.get(ENV_PROFILE) or None, config_path(env))
    if auth_key is not None and auth_key_file is not None:
        raise UsageError("give --auth-key or --auth-key-file, not both")
    if cafile is not None and insecure:
        raise UsageError("give --cafile or --insecure, not both")
    flag_key = _read_secret_file(auth_key_file, "auth key") if auth_key_file is not None else auth_key
    flag_token = _read_secret_file(token_file, "token") if token_file is not None else None
    profile_cafile = values.get("cafile")
    settings = ClientSettings(
        url=_first_str(url, env.get(ENV_URL), values.get("url"), DEFAULT_URL),
        auth_key=_first_str(flag_key, env.get(ENV_AUTH_KEY), _profile_secret(values, "auth_key", "auth key"),
                            DEFAULT_AUTH_KEY),
        token=_first_or_none(flag_token, env.get(ENV_TOKEN, "").strip(), _profile_secret(values, "token", "token")),
        timeout=_check_timeout(timeout if timeout is not None else values.get("timeout", DEFAULT_TIMEOUT)),
        profile=name,
        cafile=cafile or (Path(str(profile_cafile)).expanduser() if profile_cafile else None),
        insecure=insecure,
        receipts=_profile_bool(values, "receipts"),
        typing=_profile_bool(values, "typing"),
        notify=_profile_notify(values),
    )
    check_url(settings.url)
    if not settings.credential.isprintable():  # it goes into an HTTP header verbatim: no line breaks inside
        raise UsageError("the token or auth key holds a line break or another control character")
    if (cafile is not None or insecure) and not settings.uses_tls:
        raise UsageError(f"--cafile and --insecure are for wss:// URLs; {settings.url} is not encrypted")
    return settings


def _profile_bool(values: Mapping[str, Any], key: str) -> bool:
    value = values.get(key, True)
    if not isinstance(value, bool):
        raise UsageError(f"profile key {key!r} must be true or false, not {value!r}")
    return value


def _profile_notify(values: Mapping[str, Any]) -> str:
    value = values.get("notify", "bell")
    if value not in NOTIFY_MODES:
        raise UsageError(f"profile key 'notify' must be one of {', '.join(NOTIFY_MODES)}, not {value!r}")
    return str(value)


def _profile_secret(values: Mapping[str, Any], key: str, what: str) -> str | None:
    """A profile's ``key``, else the contents of its ``key_file``."""
    if values.get(key) is not None:
        return str(values[key]).strip()
    if f"{key}_file" in values:
        return _read_secret_file(Path(str(values[f"{key}_file"])).expanduser(), what)
    return None


def _first_or_none(*candidates: str | None) -> str | None:
    return next((value for value in candidates if value), None)


def check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket: "Invalid IPv6 URL"
        raise UsageError(f"invalid server URL {url!r}: {exc}") from None
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


#: The longest timeout: about 115 days. Beyond it (inf included) clocks and socket timeouts overflow.
MAX_TIMEOUT_S: Final = 10_000_000


def _check_timeout(value: object) -> float:
    # not (0 < value <= MAX) rather than value <= 0: nan compares false to everything and would pass.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_S:
        raise UsageError(f"timeout must be a positive number of seconds, at most {MAX_TIMEOUT_S:,}, "
                         f"not {value!r}")
    return float(value)


def _read_secret_file(path: Path, what: str) -> str:
    """A key or token kept in a file: its text, stripped of surrounding whitespace."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the {what} file {str(path)!r} is not UTF-8 text") from None
    if not secret:
        raise UsageError(f"the {what} file {str(path)!r} is empty")
    if not secret.isprintable():  # it goes into an HTTP header verbatim: no line breaks inside
        raise UsageError(f"the {what} file {str(path)!r} holds more than one line: expected the {what} alone")
    return secret


def _load_profile(requested: str | None, path: Path) -> tuple[str | None, dict[str, Any]]:
    """The chosen profile's name and values; ``(None, {})`` when there is none to use."""
    document = _read_config(path) if path.is_file() else {}
    _check_top_level(path, document)
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise UsageError(f"{path}: 'profiles' must be a table of [profiles.NAME] sections")
    default = document.get("default_profile")
    name = requested or default
    if name is None:
        return ("default", _check_profile(path, "default", profiles["default"])) if "default" in profiles \
            else (None, {})
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise UsageError(f"no profile {name!r} in {path} (profiles: {known})")
    return name, _check_profile(path, name, profiles[name])


def _check_top_level(path: Path, document: dict[str, Any]) -> None:
    """Only ``default_profile`` and ``[profiles.NAME]`` belong at the top: a setting written there would
    otherwise be ignored without a word."""
    unknown = set(document) - {"default_profile", "profiles"}
    if unknown:
        settings = sorted(unknown & _PROFILE_KEYS)
        hint = f"; settings such as {settings[0]!r} go in a [profiles.NAME] section" if settings else ""
        raise UsageError(f"{path}: unknown top-level keys {sorted(unknown)}{hint}")
    default = document.get("default_profile")
    if default is not None and not isinstance(default, str):
        raise UsageError(f"{path}: default_profile must be a profile's name in quotes, not {default!r}")


def _read_config(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 (a Latin-1 editor's file, say)
        raise UsageError(f"{path}: not valid TOML: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start})") from None
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
