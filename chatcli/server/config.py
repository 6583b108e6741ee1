"""The server's settings (``chatcli serve``'s options), checked once at start-up."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeAlias

from chatcli.errors import UsageError
from chatcli.protocol import DEFAULT_AUTH_KEY, DEFAULT_MAX_TEXT_BYTES, FRAME_OVERHEAD_BYTES
from chatcli.server.engine.options import Fsync, RedisDurability

#: --max-connections when not given (or fewer, when the file-descriptor limit leaves less room).
DEFAULT_MAX_CONNECTIONS: Final = 20000

__all__ = ["DEFAULT_MAX_CONNECTIONS", "PRESENCE_MODES", "PresenceMode", "ServerConfig"]

#: Whose presence a user sees (``who``, ``watch``): everyone's, only their contacts', or nobody's.
PresenceMode: TypeAlias = Literal["all", "contacts", "off"]
PRESENCE_MODES: Final[tuple[PresenceMode, ...]] = ("all", "contacts", "off")

#: Settings whose option is not named after them.
_FLAGS: Final = {"max_buffer_bytes": "max-buffer"}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    ws_port: int = 6060
    http_port: int = 8000
    auth_key: str = DEFAULT_AUTH_KEY
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    #: The SQLite file; None keeps nothing (--ephemeral): offline recipients are refused.
    db_path: Path | None = None
    fsync: Fsync = Fsync.normal
    #: A Redis URL: this server is one node of a cluster sharing that Redis (db_path is then unused).
    redis_url: str | None = None
    redis_durability: RedisDurability = RedisDurability.relaxed
    #: Messages older than this many seconds are pruned; None keeps them forever.
    retention_s: float | None = None
    #: Sessions must prove their user with a token; also on whenever the database has an account.
    require_auth: bool = False
    certfile: Path | None = None
    keyfile: Path | None = None
    #: Token bucket per user, shared by all their sessions: sustained requests per second (send, who,
    #: history, watch, received), and the burst above it.
    rate: float = 5000.0
    burst: int = 10000
    #: Connections admitted at most; start-up lowers it to what the file-descriptor limit holds.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: --max-connections was given: lowering it is then worth a warning, not only a line of information.
    max_connections_given: bool = False
    #: Open sessions per user, receiving or not.
    max_sessions_per_user: int = 16
    #: None: "contacts" for sessions that proved a token (accounts on), "all" for the others (without
    #: accounts anyone can claim any id, so hiding presence would protect nothing).
    presence: PresenceMode | None = None
    #: Bytes a session may have waiting to be written before it counts as a slow consumer and is closed.
    max_buffer_bytes: int = 4 * 1024 * 1024
    #: Ping a session silent this long; close it when the pong has not come within ping_timeout.
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: Seconds a connection may take to complete its WebSocket handshake.
    open_timeout: float = 10.0
    #: Seconds to wait for sessions to close on shutdown before dropping them.
    close_timeout: float = 3.0
    #: HTTP port: connections served at once (more are answered 503 and closed), so that it cannot
    #: take the file descriptors the WebSocket listener needs.
    max_http_connections: int = 256
    #: HTTP port: seconds a connection may take to send a complete request head.
    http_timeout: float = 10.0
    #: HTTP port: seconds a keep-alive connection may stay idle between requests.
    http_idle_timeout: float = 5.0

    @classmethod
    def build(cls, *, auth_key: str | None = None, **options: object) -> ServerConfig:
        config = cls(auth_key=auth_key or DEFAULT_AUTH_KEY, **options)  # type: ignore[arg-type]
        if config.retention_s is not None and config.retention_s <= 0:
            raise UsageError("--retention must be a positive duration, e.g. 30d")
        if (config.certfile is None) != (config.keyfile is None):
            raise UsageError("--certfile and --keyfile go together")
        if config.redis_url is not None:
            _check_redis_url(config.redis_url)
        if config.require_auth and config.db_path is None and config.redis_url is None:
            raise UsageError("--require-auth needs accounts, which live in the database: drop --ephemeral")
        if config.presence not in (None, *PRESENCE_MODES):
            raise UsageError(f"--presence must be one of {', '.join(PRESENCE_MODES)}")
        if config.presence == "contacts" and config.db_path is None and config.redis_url is None:
            raise UsageError("--presence contacts knows contacts from stored messages; an --ephemeral server "
                             "stores none: use --presence all or off")
        for name in ("rate", "burst", "max_connections", "max_sessions_per_user", "max_buffer_bytes",
                     "ping_interval", "ping_timeout", "max_http_connections", "http_timeout", "http_idle_timeout"):
            value = getattr(config, name)
            if not math.isfinite(value) or value <= 0:  # nan would compare false to everything: never time out
                flag = _FLAGS.get(name, name.replace("_", "-"))
                raise UsageError(f"--{flag} must be a positive number, not {value}")
        if config.max_text_bytes < 1:
            raise UsageError("--max-text-bytes must be at least 1")
        for name in ("ws_port", "http_port"):
            port = getattr(config, name)
            if not 0 <= port <= 65535:
                raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 65535")
        return config

    @property
    def max_frame_bytes(self) -> int:
        """Frames larger than this are closed with 1009 before they are even parsed."""
        return self.max_text_bytes + FRAME_OVERHEAD_BYTES

    @property
    def frame_rate(self) -> float:
        """Frames of any kind a connection may send per second, sustained: well above the message rate,
        so only a peer that ignores its refusals or floods empty frames reaches it (and is closed)."""
        return max(4 * self.rate, 1000.0)

    @property
    def frame_burst(self) -> int:
        return max(2 * self.burst, 2000)

    @property
    def uses_default_key(self) -> bool:
        return self.auth_key == DEFAULT_AUTH_KEY

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


#: The URL schemes redis-py connects with.
REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")


def _check_redis_url(url: str) -> None:
    if not url.startswith(REDIS_SCHEMES):
        raise UsageError(f"--redis must be a redis://, rediss:// or unix:// URL, not {url!r}")
