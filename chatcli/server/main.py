"""Start, run and stop the server: the engine, listeners, logging, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any, Final

from websockets.frames import CloseCode

from chatcli import __version__
from chatcli.errors import StorageError
from chatcli.server.codecs import CODECS
from chatcli.server.config import ServerConfig
from chatcli.server.engine.base import Capability, Engine
from chatcli.server.engine.memory import MemoryEngine
from chatcli.server.engine.redis_setup import redact
from chatcli.server.engine.sqlite import SQLiteEngine
from chatcli.server.fdlimit import FdLimit, connection_capacity, fit_connections, open_fd_count, raise_fd_limit
from chatcli.server.http_api import Handler, HttpServer, Response, json_response, text_response
from chatcli.server.metrics import Metrics, render_prometheus
from chatcli.server.relay import Relay
from chatcli.server.storage_thread import StorageThread
from chatcli.server.transport import HANDSHAKE_SLACK, TOKEN_CHECK_INTERVAL_S, WebSocketServer

__all__ = ["JsonFormatter", "configure_logging", "open_engine", "run", "serve"]

log = logging.getLogger("chatcli.server")

# Attributes every LogRecord has; anything else came in through ``extra=`` and belongs in JSON logs.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, message, and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("chatcli")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def run(config: ServerConfig, *, log_level: str = "info", log_format: str = "text") -> None:
    """Run the server until SIGINT, SIGTERM or SIGHUP; return normally (exit 0) after a graceful shutdown."""
    configure_logging(log_level, log_format)
    _tune_gc()
    try:
        import uvloop
    except ImportError:  # platforms without uvloop still work, only slower
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))


def _tune_gc() -> None:
    """Collect cycles rarely. The relay allocates a few short-lived containers per message and makes
    almost no cycles, yet the default thresholds ran ~60 collections a second under load, with 15 ms
    gen-2 pauses (measured with gc.callbacks); freezing start-up objects keeps them out of every pass."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def serve(config: ServerConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # SIGHUP too: a server started from a terminal that closes (an ssh session dropped) stops as politely.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)

    fd_limit = raise_fd_limit()
    metrics = Metrics()
    tls = _tls_context(config)
    storage = StorageThread(loop)
    engine = await open_engine(config, storage)
    config, room = _fit_to_fd_limit(config, fd_limit)
    relay = Relay(config, metrics, engine, schedule=loop.call_soon)
    ws_server = WebSocketServer(config, relay, metrics, engine.accounts)
    started = time.monotonic()
    http_server = HttpServer(config, _http_routes(ws_server, started), loop)
    try:
        # A TLS handshake happens before a protocol sees its connection: bound it like the rest of the opening.
        ws_listener = await loop.create_server(ws_server.protocol_factory, config.host, config.ws_port,
                                               backlog=2048, reuse_address=True, ssl=tls,
                                               ssl_handshake_timeout=config.open_timeout if tls else None)
        http_listener = await loop.create_server(http_server.protocol_factory, config.host, config.http_port,
                                                 reuse_address=True, ssl=tls,
                                                 ssl_handshake_timeout=config.http_timeout if tls else None)
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.host, exc.strerror or exc,
                  extra={"event": "listen-failed"})
        storage.close()
        engine.close()
        raise SystemExit(1) from None

    ws_port = ws_listener.sockets[0].getsockname()[1]
    http_port = http_listener.sockets[0].getsockname()[1]
    scheme = "wss" if tls else "ws"
    log.info("listening on %s://%s:%d (HTTP on port %d), chatcli %s", scheme, config.host, ws_port, http_port,
             __version__, extra={"event": "listening", "ws_port": ws_port, "http_port": http_port,
                                 "host": config.host, "version": __version__, "tls": bool(tls)})
    _log_fd_capacity(config, room)
    _log_auth_mode(ws_server)

    if config.redis_url is not None:
        log.info("storing messages in Redis at %s, as one node of a cluster", redact(config.redis_url),
                 extra={"event": "storage", "redis": redact(config.redis_url)})
    elif Capability.STORE in engine.capabilities:
        log.info("storing messages in %s (fsync %s)", config.db_path, config.fsync,
                 extra={"event": "storage", "db": str(config.db_path), "fsync": str(config.fsync)})
    pruning = (asyncio.create_task(_prune_forever(engine, config.retention_s))
               if Capability.STORE in engine.capabilities and config.retention_s else None)
    heartbeat = asyncio.create_task(_every(config.ping_interval / 2, ws_server.heartbeat))
    # Apart from the heartbeat, whose period follows --ping-interval (10 s by default): a rotated token's
    # sessions must close within seconds. Without token sessions open a check costs nothing.
    token_checks = asyncio.create_task(_every(TOKEN_CHECK_INTERVAL_S, ws_server.check_tokens))

    await stop.wait()
    log.info("shutting down: closing %d sessions", len(ws_server.connections), extra={"event": "shutdown"})
    ws_listener.close()
    http_listener.close()
    http_server.close_all()
    heartbeat.cancel()
    token_checks.cancel()
    if pruning is not None:
        pruning.cancel()
    await _close_sessions(ws_server, config.close_timeout)
    await _settle_storage(relay, engine)
    storage.close()
    engine.close()
    log.info("stopped", extra={"event": "stopped"})


async def _every(seconds: float, callback: Callable[[], None]) -> None:
    """Run ``callback`` every ``seconds`` until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        callback()


#: Where ``serve`` finds the passphrase of an encrypted TLS key.
KEY_PASSPHRASE_ENV: Final = "CHATCLI_TLS_KEY_PASSPHRASE"


class _EncryptedKey(Exception):
    """The key needs a passphrase and none was given."""


def _key_passphrase() -> str:
    passphrase = os.environ.get(KEY_PASSPHRASE_ENV)
    if passphrase is None:
        raise _EncryptedKey
    return passphrase


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.certfile is None or config.keyfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A passphrase comes from the environment, never from a prompt: OpenSSL's own prompt asked twice on
        # the terminal, and failed with EINVAL under a service manager.
        context.load_cert_chain(config.certfile, config.keyfile, password=_key_passphrase)
    except _EncryptedKey:
        log.error("the TLS key %s is encrypted: give its passphrase in %s, or decrypt it "
                  "(openssl pkey -in KEY -out PLAIN.pem)", config.keyfile, KEY_PASSPHRASE_ENV,
                  extra={"event": "tls-error"})
        raise SystemExit(1) from None
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot load the TLS certificate %s / key %s: %s", config.certfile, config.keyfile, exc,
                  extra={"event": "tls-error"})
        raise SystemExit(1) from None
    return context


#: Descriptors assumed open at start-up where the platform cannot count them (stdio, listeners, database).
_ASSUMED_OPEN_FDS = 16
#: The two listening sockets, opened after the descriptors are counted.
_LISTENERS = 2


@dataclass(frozen=True, slots=True)
class ConnectionRoom:
    """What the file-descriptor limit leaves room for, measured before listening and logged after."""

    fd_limit: FdLimit
    open_now: int
    #: WebSocket connections that fit beside the HTTP port's and the reserve (None: no limit to check).
    capacity: int | None
    #: --max-connections as asked for (the config then holds what is admitted).
    requested: int


def _fit_to_fd_limit(config: ServerConfig, fd_limit: FdLimit) -> tuple[ServerConfig, ConnectionRoom]:
    """Lower --max-connections to what the descriptors hold, so that the connections past it are answered
    503 "server full" instead of failing at accept with no answer at all."""
    if fd_limit.after is None:
        return config, ConnectionRoom(fd_limit, 0, None, config.max_connections)
    open_now = (open_fd_count() or _ASSUMED_OPEN_FDS) + _LISTENERS
    capacity = connection_capacity(fd_limit.after, open_now, config.max_http_connections)
    admitted = fit_connections(config.max_connections, capacity, HANDSHAKE_SLACK)
    room = ConnectionRoom(fd_limit, open_now, capacity, config.max_connections)
    return replace(config, max_connections=admitted), room


def _log_fd_capacity(config: ServerConfig, room: ConnectionRoom) -> None:
    """Log how many connections the file-descriptor limit leaves room for, and what that lowered
    --max-connections to: a warning when the operator asked for more or the room is under half the
    request, information when it only trims the default."""
    fd_limit = room.fd_limit
    if fd_limit.after is None or room.capacity is None:
        log.info("file descriptors: no per-process limit to check", extra={"event": "capacity", "fd_limit": None})
        return
    raised = f" (raised from {fd_limit.before})" if fd_limit.raised else ""
    fields = {"fd_limit": fd_limit.after, "fd_limit_before": fd_limit.before, "fds_open": room.open_now,
              "ws_capacity": room.capacity, "max_connections": config.max_connections,
              "max_connections_requested": room.requested, "max_http_connections": config.max_http_connections}
    lowered = config.max_connections < room.requested
    which = "" if config.max_connections_given else "the default "
    admits = f": admitting at most {config.max_connections} ({which}--max-connections {room.requested} does not fit)"
    log.info("file descriptors: limit %d%s, %d open: room for %d WebSocket connections beside %d HTTP ones%s",
             fd_limit.after, raised, room.open_now, room.capacity, config.max_http_connections,
             admits if lowered else "", extra={"event": "capacity", **fields})
    if lowered and (config.max_connections_given or config.max_connections < room.requested // 2):
        log.warning("the file-descriptor limit (%d) leaves room for only %d WebSocket connections: "
                    "--max-connections %d lowered to %d (more are answered 503). Raise the hard limit "
                    "(ulimit -Hn, systemd LimitNOFILE=) or lower --max-connections / --max-http-connections",
                    fd_limit.after, room.capacity, room.requested, config.max_connections,
                    extra={"event": "capacity-low", **fields})


def _log_auth_mode(ws_server: WebSocketServer) -> None:
    config = ws_server.config
    if ws_server.accounts_on():
        why = "--require-auth" if config.require_auth else "accounts exist"
        log.info("authentication: per-user tokens required (%s); the shared key is not accepted", why,
                 extra={"event": "auth-mode", "mode": "tokens"})
    else:
        log.info("authentication: shared key (no accounts; `chatcli user add NAME` turns on per-user tokens)",
                 extra={"event": "auth-mode", "mode": "shared-key"})
        if not config.is_loopback and config.uses_default_key:
            log.warning("serving %s to other machines with the public default key: anyone can send as anyone; "
                        "set --auth-key or CHATCLI_AUTH_KEY, or add accounts", config.host,
                        extra={"event": "default-key-exposed"})


async def open_engine(config: ServerConfig, storage: StorageThread) -> Engine:
    """The engine the settings ask for: a node on ``--redis``, SQLite in ``--db`` (its calls on ``storage``),
    or memory (``--ephemeral``). A store that cannot be opened ends the start-up with a clear line."""
    if config.redis_url is not None:
        return await _open_redis(config)
    if config.db_path is None:
        return MemoryEngine()
    try:
        return SQLiteEngine.open(config.db_path, config.fsync, storage)
    except (OSError, StorageError) as exc:
        log.error("cannot open the message store %s: %s", config.db_path, exc, extra={"event": "storage-error"})
        raise SystemExit(1) from None


async def _open_redis(config: ServerConfig) -> Engine:
    try:  # redis-py is an optional extra: imported only by a node
        from chatcli.server.engine.redis_engine import RedisEngine
    except ImportError:
        log.error("--redis needs redis-py: pip install 'chatcli[redis]'", extra={"event": "storage-error"})
        raise SystemExit(1) from None
    try:
        return await RedisEngine.open(config.redis_url or "", strict=config.redis_durability == "strict")
    except StorageError as exc:
        log.error("cannot start on Redis: %s", exc, extra={"event": "storage-error"})
        raise SystemExit(1) from None


PRUNE_EVERY_S = 3600.0


#: Messages deleted per step: a few milliseconds of the event loop, then other sessions' turn.
PRUNE_STEP = 2000


def _days(seconds: float) -> str:
    """A retention period as an operator reads it: ``30 days``, ``12 hours``, ``90 seconds``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


async def _prune_forever(engine: Engine, retention_s: float) -> None:
    """Delete messages past the retention period at start-up, then hourly, in small steps (each step one
    short transaction, so commits get their turn in between)."""
    log.info("retention: messages older than %s are deleted, at start-up and then hourly", _days(retention_s),
             extra={"event": "retention", "seconds": retention_s})
    while True:
        cutoff, deleted = time.time() - retention_s, 0
        while True:
            try:
                step = await engine.prune(cutoff, PRUNE_STEP)
            except StorageError as exc:
                log.error("pruning failed: %s", exc, extra={"event": "storage-error"})
                break
            deleted += step
            if step < PRUNE_STEP:
                break
        if deleted:
            log.info("pruned %d message(s) older than the retention period", deleted,
                     extra={"event": "pruned", "count": deleted})
        await asyncio.sleep(PRUNE_EVERY_S)


async def _settle_storage(relay: Relay, engine: Engine) -> None:
    """Let the batches accepted before shutdown be committed (their senders may still get the ack)."""
    await asyncio.sleep(0)  # a commit scheduled by the last frames
    while relay.committing or relay.pending or relay.cursor_updates:
        await engine.settle()  # after every call made so far
        await asyncio.sleep(0)  # their results, which may start the next batch
    await engine.settle()  # and what closing the sessions started (a node's presence leaving Redis)


async def _close_sessions(ws_server: WebSocketServer, timeout: float) -> None:
    """Ask every session to close with 1001; drop whoever has not finished by the deadline."""
    ws_server.close_all(CloseCode.GOING_AWAY, "server shutting down")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ws_server.all_closed.wait(), timeout)
    for connection in list(ws_server.connections):
        if connection.transport is not None:
            with contextlib.suppress(Exception):
                connection.transport.abort()


def _http_routes(ws_server: WebSocketServer, started: float) -> dict[str, Handler]:
    def health() -> Response:
        relay = ws_server.relay
        storage = relay.engine.health()
        return json_response({
            "status": "ok" if storage["ok"] else "degraded",
            "version": __version__,
            "uptime_s": round(time.monotonic() - started, 3),
            "connections": len(ws_server.connections),
            "sessions": relay.session_count,
            "users_online": len(relay.engine.presence.online()),
            "messages_routed": ws_server.metrics.routed,
            "messages_stored_for_offline": ws_server.metrics.stored,
            "storage": storage,
        }, HTTPStatus.OK if storage["ok"] else HTTPStatus.SERVICE_UNAVAILABLE)

    def metrics() -> Response:
        relay = ws_server.relay
        sessions: dict[str, float] = dict.fromkeys((codec.name for codec in CODECS), 0)
        for mine in relay.sessions.values():
            for session in mine:
                sessions[session.codec.name] += 1
        gauges: dict[str, dict[str, float]] = {"connections": {"": len(ws_server.connections)}, "sessions": sessions,
                  "db_bytes": {"": relay.engine.health().get("db_bytes", 0)}}
        body = render_prometheus(ws_server.metrics, gauges) + "".join(
            line + "\n" for line in relay.engine.prometheus_lines())
        return HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", body.encode()

    return {
        "/": lambda: text_response("chatcli server is running\n"),
        "/healthz": health,
        "/metrics": metrics,
    }
