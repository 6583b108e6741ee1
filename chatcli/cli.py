"""The command-line interface: each command parses options and calls one function.

Typer lives here and nowhere else. Errors are not handled in the commands:
``run`` maps every exception to an exit status through ``errors.exit_status_for``.
The client commands reach stdin, stdout and stderr only through the ``Environment``
that ``run`` is given (``ctx.obj``), so tests can run them in-process.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from chatcli import __version__
from chatcli.client.environment import Environment
from chatcli.errors import ExitStatus
from chatcli.launch import client_settings, completing, exit_status_of, send_command
from chatcli.server.engine.options import Fsync, RedisDurability

__all__ = ["app", "app_for", "main", "run"]

if TYPE_CHECKING:
    from chatcli.protocol import Message
    from chatcli.server.accounts import AccountStore
    from chatcli.server.engine.redis_accounts import RedisAccountStore

app = typer.Typer(
    name="chatcli",
    help="A command-line chat suite: a relay server and send / listen / chat clients.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class Presence(StrEnum):
    all = "all"
    contacts = "contacts"
    off = "off"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _version(value: bool) -> None:
    if value:
        print(f"chatcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """chatcli: chat from the command line."""


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 serves other devices.")] = "127.0.0.1",
    ws_port: Annotated[int, typer.Option(help="WebSocket port (0 picks a free one).")] = 6060,
    http_port: Annotated[int, typer.Option(help="HTTP port for / and /healthz (0 picks a free one).")] = 8000,
    auth_key: Annotated[str | None, typer.Option(envvar="CHATCLI_AUTH_KEY", show_envvar=True,
                                                 help="Shared key (default: the seed app's key).")] = None,
    max_text_bytes: Annotated[int, typer.Option(help="Largest message text, in UTF-8 bytes.")] = 64 * 1024,
    db: Annotated[Path | None, typer.Option(
        help="SQLite file for stored messages [default: $XDG_DATA_HOME/chatcli/chatcli.db].",
        show_default=False, dir_okay=False)] = None,
    ephemeral: Annotated[bool, typer.Option(
        "--ephemeral", help="Store nothing: messages to offline users are refused.")] = False,
    fsync: Annotated[Fsync, typer.Option(
        case_sensitive=False, help="normal: acknowledged messages survive a crash of the server; "
        "full: also a power loss (slower).")] = Fsync.normal,
    retention: Annotated[str | None, typer.Option(
        help="Delete messages older than this, e.g. 30d or 12h [default: keep all].", show_default=False)] = None,
    redis: Annotated[str | None, typer.Option(
        "--redis", envvar="CHATCLI_REDIS_URL", show_envvar=True, show_default=False,
        help="Be one node of a cluster: store in this Redis (redis://HOST:6379/0, rediss://, unix:///PATH) "
        "instead of SQLite; see docs/scaling.md.")] = None,
    redis_durability: Annotated[RedisDurability, typer.Option(
        case_sensitive=False, help="strict: refuse to start unless Redis fsyncs every write "
        "(appendonly yes, appendfsync always); relaxed: start and log what Redis guarantees.")
    ] = RedisDurability.relaxed,
    require_auth: Annotated[bool, typer.Option(
        "--require-auth", help="Every session must prove its user with a token (`chatcli user add`). "
        "On by itself as soon as an account exists.")] = False,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM): serve wss:// and https://.",
                                                  show_default=False, dir_okay=False)] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM) for --certfile.",
                                                 show_default=False, dir_okay=False)] = None,
    rate: Annotated[float, typer.Option(help="Requests per second one user may make, sustained, over all "
                                        "their sessions (send, who, history, watch, received).")] = 5000.0,
    burst: Annotated[int, typer.Option(help="Requests one user may make at once above --rate.")] = 10000,
    max_connections: Annotated[int | None, typer.Option(
        help="Open connections at most; more are refused (503) [default: 20000, or fewer if the "
        "file-descriptor limit has room for fewer].", show_default=False)] = None,
    max_sessions_per_user: Annotated[int, typer.Option(
        help="Open sessions per user at most, send-only ones included (429).")] = 16,
    presence: Annotated[Presence | None, typer.Option(
        case_sensitive=False, help="Whose presence users see (who, watch): all, contacts (users they have "
        "exchanged a message with) or off [default: contacts with accounts, all without].",
        show_default=False)] = None,
    max_buffer: Annotated[int, typer.Option(
        help="Bytes of unread messages a session may have waiting before it is closed as too slow.")] = 4 << 20,
    ping_interval: Annotated[float, typer.Option(help="Ping sessions silent this many seconds.")] = 20.0,
    ping_timeout: Annotated[float, typer.Option(help="Close a session whose pong is this many seconds late.")] = 20.0,
    max_http_connections: Annotated[int, typer.Option(
        help="Open connections on the HTTP port at most; more are answered 503 and closed.")] = 256,
    http_timeout: Annotated[float, typer.Option(
        help="Seconds an HTTP connection may take to send a complete request (else 408 and closed).")] = 10.0,
    http_idle_timeout: Annotated[float, typer.Option(
        help="Seconds an idle keep-alive HTTP connection is kept open.")] = 5.0,
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False)] = LogLevel.info,
    log_format: Annotated[LogFormat, typer.Option(case_sensitive=False)] = LogFormat.text,
) -> None:
    """Run the relay server."""
    from chatcli.paths import default_db_path
    from chatcli.server.config import ServerConfig
    from chatcli.server.main import run
    from chatcli.units import parse_duration

    if ephemeral and db is not None:
        raise typer.BadParameter("--db and --ephemeral exclude each other", param_hint="--ephemeral")
    if redis is not None and (ephemeral or db is not None):
        raise typer.BadParameter("--redis stores in Redis: drop --db / --ephemeral", param_hint="--redis")
    try:
        retention_s = parse_duration(retention) if retention is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--retention") from None
    if retention is not None and retention.strip().replace(".", "", 1).isdigit():
        # A bare number would be seconds: `--retention 30` meant as days deletes undelivered messages.
        raise typer.BadParameter(f"give {retention.strip()!r} a unit, e.g. {retention.strip()}d (days), h, m or s",
                                 param_hint="--retention")
    config = ServerConfig.build(host=host, ws_port=ws_port, http_port=http_port, auth_key=auth_key,
                                max_text_bytes=max_text_bytes,
                                db_path=None if ephemeral or redis else db or default_db_path(),
                                fsync=fsync, redis_url=redis, redis_durability=redis_durability,
                                retention_s=retention_s, require_auth=require_auth,
                                certfile=certfile, keyfile=keyfile, rate=rate, burst=burst,
                                **_max_connections(max_connections), max_sessions_per_user=max_sessions_per_user,
                                presence=presence.value if presence is not None else None,
                                max_buffer_bytes=max_buffer, ping_interval=ping_interval, ping_timeout=ping_timeout,
                                max_http_connections=max_http_connections, http_timeout=http_timeout,
                                http_idle_timeout=http_idle_timeout)
    run(config, log_level=log_level.value, log_format=log_format.value)


def _max_connections(given: int | None) -> dict[str, object]:
    """Pass on a --max-connections only if given: start-up lowers the default to fit the descriptors quietly,
    and warns when it has to lower one the operator asked for."""
    return {} if given is None else {"max_connections": given, "max_connections_given": True}


# ---------------------------------------------------------------------------
# Client commands: send, listen, history, who, chat. Settings resolve as flag > environment >
# profile > default (chatcli.client.settings); imports are lazy so `send` and `listen`
# never load prompt_toolkit or Rich.
# ---------------------------------------------------------------------------

UrlOption = Annotated[str | None, typer.Option(
    "--url", help="Server URL [env CHATCLI_URL; default ws://127.0.0.1:6060].", show_default=False)]
AuthKeyOption = Annotated[str | None, typer.Option(
    "--auth-key", help="Shared key. Visible to other local users in argv: prefer CHATCLI_AUTH_KEY "
    "or --auth-key-file.", show_default=False)]
AuthKeyFileOption = Annotated[Path | None, typer.Option(
    "--auth-key-file", help="Read the shared key from this file.", show_default=False, dir_okay=False)]
TokenFileOption = Annotated[Path | None, typer.Option(
    "--token-file", help="Read your token (from `chatcli user add`) from this file; sent instead of the "
    "shared key [env CHATCLI_TOKEN].", show_default=False, dir_okay=False)]
CafileOption = Annotated[Path | None, typer.Option(
    "--cafile", help="Trust this CA certificate (PEM) for a wss:// server [default: the system's CAs, "
    "or SSL_CERT_FILE].", show_default=False, dir_okay=False)]
InsecureOption = Annotated[bool, typer.Option(
    "--insecure", help="INSECURE: do not verify the wss:// server's certificate (anyone on the path can "
    "read and change the session). For testing only; prefer --cafile.")]
ProfileOption = Annotated[str | None, typer.Option(
    "--profile", help="Profile from $XDG_CONFIG_HOME/chatcli/config.toml [env CHATCLI_PROFILE].",
    show_default=False)]
TimeoutOption = Annotated[float | None, typer.Option(
    "--timeout", min=0.001, help="Seconds to wait for the server (connect, each ack) [default: 10].",
    show_default=False)]
MeArgument = Annotated[str, typer.Argument(metavar="ME", help="Your user id.", show_default=False)]
PeerArgument = Annotated[str, typer.Argument(metavar="PEER", help="The other user's id.", show_default=False)]
MarkReadOption = Annotated[bool, typer.Option(
    "--mark-read", help="Mark what is printed as read (moves your read position; the chat's unread counts "
    "and `chatcli inbox` follow). Without it nothing is marked read.")]


def _environment(ctx: typer.Context) -> Environment:
    """The streams ``run`` was given; the process's own when the app is called another way."""
    return ctx.obj if isinstance(ctx.obj, Environment) else Environment.from_process()


_settings = client_settings


@app.command()
def send(
    ctx: typer.Context,
    me: MeArgument,
    peer: PeerArgument,
    text: Annotated[str | None, typer.Argument(
        metavar="TEXT", help="The message; omitted or '-' reads it from stdin.", show_default=False)] = None,
    lines: Annotated[bool, typer.Option("--lines", help="Send each stdin line as its own message.")] = False,
    window: Annotated[int, typer.Option(
        "--window", min=1, help="Messages in flight, unacknowledged, at most (1: wait for each ack).")] = 256,
    json_output: Annotated[bool, typer.Option("--json", help="Print each ack as a JSON line.")] = False,
    reply_to: Annotated[int | None, typer.Option(
        "--reply-to", metavar="ID", min=1, help="Reply to message ID of this conversation (its id in listen "
        "or history --json); the server refuses an id from elsewhere (exit 5).", show_default=False)] = None,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    timeout: TimeoutOption = None,
    profile: ProfileOption = None,
) -> None:
    """Send a message to PEER; exit 0 once the server acknowledged it (delivered or stored).

    If the connection drops, send reconnects for up to --timeout seconds and resends what
    was not acknowledged; a storing server keeps each message once.
    """
    send_command(_environment(ctx), me, peer, text, lines=lines, window=window, json_output=json_output,
                 url=url, auth_key=auth_key, auth_key_file=auth_key_file, token_file=token_file, cafile=cafile,
                 insecure=insecure, timeout=timeout, profile=profile, reply_to=reply_to)


@app.command()
def listen(
    ctx: typer.Context,
    me: MeArgument,
    argv: Annotated[list[str] | None, typer.Argument(
        metavar="[-- PROGRAM [ARG...]]", help="The hook as a program and its arguments, run without a shell "
        "(instead of --exec).", show_default=False)] = None,
    count: Annotated[int | None, typer.Option(
        "--count", min=1, help="Exit 0 after this many messages.", show_default=False)] = None,
    duration: Annotated[float | None, typer.Option(
        "--timeout", min=0.001, help="Stop after this many seconds (exit 6 if --count was not reached).",
        show_default=False)] = None,
    sender: Annotated[str | None, typer.Option(
        "--from", metavar="PEER", help="Only messages from PEER.", show_default=False)] = None,
    no_reconnect: Annotated[bool, typer.Option(
        "--no-reconnect", help="Exit 3 when the connection fails instead of retrying.")] = False,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="ID|DURATION|all", help="Replay from there: after message ID, the last DURATION "
        "(e.g. 30m, 1h, 2d), or all stored messages.", show_default=False)] = None,
    cursor_file: Annotated[Path | None, typer.Option(
        "--cursor-file", metavar="PATH", help="Resume after the last message id saved in PATH, and save "
        "each printed message's id there, so repeated runs miss and repeat nothing.",
        show_default=False, dir_okay=False)] = None,
    mark_read: MarkReadOption = False,
    exec_command: Annotated[str | None, typer.Option(
        "--exec", metavar="CMD", help="Run CMD (by /bin/sh) for each message: the JSON line on stdin, "
        "CHATCLI_ID/FROM/TO/TEXT/TS in the environment. The cursor moves past a message only once CMD "
        "exited 0; a failure is retried with backoff.", show_default=False)] = None,
    parallel: Annotated[int, typer.Option(
        "--parallel", min=1, max=256, help="Hooks running at once; each sender's messages still run one at a "
        "time, in order.")] = 1,
    max_attempts: Annotated[int | None, typer.Option(
        "--max-attempts", min=1, help="Give up on a message after N failed attempts: write it to "
        "--dead-letter and move on [default: retry until it succeeds].", show_default=False)] = None,
    dead_letter: Annotated[Path | None, typer.Option(
        "--dead-letter", metavar="FILE", help="Where messages given up on go, as JSON lines (with attempts "
        "and error).", show_default=False, dir_okay=False)] = None,
    exec_timeout: Annotated[float, typer.Option(
        "--exec-timeout", min=0.0, help="Kill a hook still running after this many seconds (a failed "
        "attempt); 0: never.")] = 60.0,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    profile: ProfileOption = None,
) -> None:
    """Print each incoming message as a JSON line: {"id", "from", "to", "text", "ts", "reply_to"}.

    With --exec CMD (or -- PROGRAM ARGS), run a hook for each message instead, at least once: the
    cursor (--cursor-file, and the server's) moves past a message only once its hook exited 0 (or it
    went to --dead-letter), and stdout gets the JSON line of each message whose hook succeeded.
    """
    import asyncio

    from chatcli.client import render
    from chatcli.client.commands import ListenOptions, listen
    from chatcli.client.inputs import parse_since
    from chatcli.client.reconnect import CursorFile

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, None, profile, token_file=token_file, cafile=cafile,
                         insecure=insecure)

    def on_message(message: Message) -> None:
        env.write_line(render.message_json(message), flush=False)  # flushed once per batch that arrived

    hooks = None
    if exec_command is not None or argv:
        from chatcli.client.hooks import HookOptions, HookRunner

        hook_options = HookOptions.build(exec_command, argv, parallel=parallel, max_attempts=max_attempts,
                                         dead_letter=dead_letter, timeout=exec_timeout or None)
        hooks = HookRunner(hook_options, on_success=lambda m: env.write_line(render.message_json(m)),
                           notice=env.notice)
        on_message = _ignore  # printed once its hook succeeded
    elif (max_attempts, dead_letter) != (None, None) or parallel != 1:
        raise typer.BadParameter("--parallel, --max-attempts and --dead-letter need a hook: --exec CMD or "
                                 "-- PROGRAM ARGS", param_hint="--exec")
    options = ListenOptions(
        count=count, duration=duration, sender=sender, reconnect=not no_reconnect,
        start=parse_since(since) if since is not None else None,
        cursor_file=CursorFile(cursor_file) if cursor_file is not None else None, flush=env.flush,
        mark_read=mark_read, receipts=settings.receipts, hooks=hooks,
        reader_gone=env.reader_gone if hooks is None else None)  # hooks keep running, whoever reads stdout
    asyncio.run(listen(settings, me, options, on_message, env.notice))


def _ignore(message: Message) -> None:
    return None


#: ``history --limit`` at most: the messages are held in memory to print oldest first.
HISTORY_LIMIT_MAX = 100_000


@app.command()
def history(
    ctx: typer.Context,
    me: MeArgument,
    peer: PeerArgument,
    limit: Annotated[int, typer.Option(
        "--limit", min=1, max=HISTORY_LIMIT_MAX, help="How many of the latest messages to show.")] = 50,
    before: Annotated[int | None, typer.Option(
        "--before", min=1, show_default=False,
        help="Only messages older than message ID (an id from --json): page back through a conversation.")
    ] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="One JSON line per message, the schema of listen.")] = False,
    mark_read: MarkReadOption = False,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    timeout: TimeoutOption = None,
    profile: ProfileOption = None,
) -> None:
    """Print the conversation between ME and PEER, oldest first (exit 5 on a server that stores nothing)."""
    from chatcli.client import render
    from chatcli.client.connecting import proxy_in_environment

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, timeout, profile, token_file=token_file, cafile=cafile,
                         insecure=insecure)
    # Through a proxy, websockets' client knows the way; --mark-read sends a read frame, which the one-shot
    # path does not speak.
    if proxy_in_environment() or mark_read:
        import asyncio

        from chatcli.client.commands import fetch_history

        messages = asyncio.run(fetch_history(settings, me, peer, limit, before=before, mark_read=mark_read,
                                             notice=env.notice))
    else:
        from chatcli.client import oneshot  # a blocking socket: no asyncio or websockets to start

        messages = oneshot.fetch_history(settings, me, peer, limit, before)
    for message in messages:
        env.write_line(render.message_json(message) if json_output
                       else render.history_ansi(message, colour=env.colour))


@app.command()
def who(
    ctx: typer.Context,
    me: MeArgument,
    json_output: Annotated[bool, typer.Option(
        "--json", help='Print one JSON array of user ids, e.g. ["alice", "bob"].')] = False,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    timeout: TimeoutOption = None,
    profile: ProfileOption = None,
) -> None:
    """List the users online, one per line, sorted; ME is who asks (the server checks ME's credentials)."""
    import asyncio

    from chatcli.client import render
    from chatcli.client.commands import fetch_online

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, timeout, profile, token_file=token_file, cafile=cafile,
                         insecure=insecure)
    users = asyncio.run(fetch_online(settings, me))
    if json_output:
        env.write_line(render.users_json(users))
    else:
        for user in users:
            env.write_line(user)


class Notify(StrEnum):
    bell = "bell"
    desktop = "desktop"
    off = "off"


@app.command()
def ask(
    ctx: typer.Context,
    me: MeArgument,
    peer: PeerArgument,
    text: Annotated[str | None, typer.Argument(
        metavar="TEXT", help="The question; omitted or '-' reads it from stdin.", show_default=False)] = None,
    any_message: Annotated[bool, typer.Option(
        "--any", help="The answer is PEER's next message, a reply or not (a seed app cannot reply).")] = False,
    yes_no: Annotated[bool, typer.Option(
        "--yes-no", help="Exit 0 for yes/y/ok/approve, 7 for no/n/deny; any other answer is printed, exit 8.")] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print the answer's JSON line (listen's schema).")] = False,
    wait: Annotated[float, typer.Option(
        "--timeout", min=0.001, help="Seconds to wait for the answer (exit 6 after).")] = 300.0,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    profile: ProfileOption = None,
) -> None:
    """Send TEXT to PEER, then wait for the answer (PEER's reply to it) and print its text.

    Example: chatcli ask deploybot alice "Deploy 4.2 to prod?" --yes-no && make deploy
    """
    import asyncio

    from chatcli.client import render
    from chatcli.client.commands import ask as ask_peer
    from chatcli.client.inputs import read_texts
    from chatcli.errors import AnsweredNo, AnswerUnclear

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, None, profile, token_file=token_file, cafile=cafile,
                         insecure=insecure)
    batches = read_texts(text, lines=False, stdin=env.stdin, stdin_isatty=env.stdin_isatty)
    assert isinstance(batches, list)  # a whole text, never stdin lines
    answer = asyncio.run(ask_peer(settings, me, peer, batches[0][0][1], wait=wait, any_message=any_message,
                                  notice=env.notice))
    verdict = _yes_or_no(answer.text) if yes_no else None
    if json_output:
        env.write_line(render.message_json(answer))
    elif verdict is None:
        env.write_line(answer.text)
    if verdict is False:
        raise AnsweredNo(f"{peer} answered no")
    if yes_no and verdict is None:
        raise AnswerUnclear(f"{peer}'s answer is neither yes nor no")


_YES = frozenset({"yes", "y", "ok", "okay", "approve", "approved"})
_NO = frozenset({"no", "n", "deny", "denied"})


def _yes_or_no(answer: str) -> bool | None:
    """True for yes/y/ok/approve, False for no/n/deny (any case, trailing punctuation ignored), else None."""
    word = answer.strip().rstrip(".!").strip().lower()
    return True if word in _YES else False if word in _NO else None


@app.command()
def search(
    ctx: typer.Context,
    me: MeArgument,
    text: Annotated[str, typer.Argument(metavar="TEXT", help="The words to find (each starts a word; all must "
                                        "be there).", show_default=False)],
    peer: Annotated[str | None, typer.Option(
        "--peer", metavar="PEER", help="Only the conversation with PEER.", show_default=False)] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="DURATION|TIME", help="Only messages of the last DURATION (e.g. 30m, 2d) or since an "
        "ISO 8601 TIME.", show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=200, help="How many matches at most.")] = 20,
    json_output: Annotated[bool, typer.Option(
        "--json", help="One JSON line per message, the schema of listen.")] = False,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    timeout: TimeoutOption = None,
    profile: ProfileOption = None,
) -> None:
    """Find messages in ME's own conversations, newest first, the match highlighted on a terminal."""
    import asyncio

    from chatcli.client import render
    from chatcli.client.commands import search_messages
    from chatcli.client.inputs import parse_search_since

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, timeout, profile, token_file=token_file, cafile=cafile,
                         insecure=insecure)
    start = parse_search_since(since) if since is not None else None
    if not text.strip() or len(text) > 256:
        raise typer.BadParameter("give 1-256 characters holding a word", param_hint="TEXT")
    messages, incomplete = asyncio.run(search_messages(settings, me, text, limit, peer, start))
    for message in messages:
        env.write_line(render.message_json(message) if json_output
                       else render.search_ansi(message, text, colour=env.colour))
    if incomplete:
        env.notice("the server stopped before reading every older message (too many matches elsewhere): "
                   "narrow the search with --peer or --since")


@app.command()
def chat(
    ctx: typer.Context,
    me: MeArgument,
    peer: Annotated[str | None, typer.Argument(
        metavar="[PEER]", help="Who to talk to; without it the chat opens on the inbox.", show_default=False)] = None,
    notify: Annotated[Notify | None, typer.Option(
        "--notify", case_sensitive=False, help="How a message for another conversation is announced: the "
        "terminal bell, a desktop notification (notify-send; the bell where there is none), or not at all "
        "[default: the profile's notify, else bell].", show_default=False)] = None,
    no_receipts: Annotated[bool, typer.Option(
        "--no-receipts", help="Do not tell senders when you have read their messages (profile: receipts = "
        "false).")] = False,
    no_typing: Annotated[bool, typer.Option(
        "--no-typing", help="Do not tell the peer when you are typing (profile: typing = false).")] = False,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    timeout: TimeoutOption = None,
    profile: ProfileOption = None,
) -> None:
    """Chat in an interactive prompt (Enter sends, Alt+Enter adds a newline, Ctrl-X Ctrl-E opens $EDITOR,
    Ctrl-D leaves); /help lists the commands (/open PEER, /next, /inbox).

    Opens with the last messages of the conversation with PEER, or on the inbox without PEER.
    """
    import dataclasses

    from chatcli.client import repl

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, timeout, profile, token_file=token_file, cafile=cafile,
                         insecure=insecure)
    settings = dataclasses.replace(settings, receipts=settings.receipts and not no_receipts,
                                   typing=settings.typing and not no_typing,
                                   notify=notify.value if notify is not None else settings.notify)
    repl.chat(settings, me, peer, env)


@app.command()
def inbox(
    ctx: typer.Context,
    me: MeArgument,
    json_output: Annotated[bool, typer.Option(
        "--json", help='One JSON object per conversation: {"peer", "unread", "read", "last_id", "last_from", '
        '"last_ts", "preview"}.')] = False,
    count: Annotated[bool, typer.Option(
        "--count", help="Print only the total of unread messages (for a shell prompt or a status bar).")] = False,
    limit: Annotated[int, typer.Option(
        "--limit", min=1, max=200, help="Conversations to list, the most recent first.")] = 50,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    token_file: TokenFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    timeout: TimeoutOption = None,
    profile: ProfileOption = None,
) -> None:
    """List ME's conversations, the most recent first: peer, unread count, last message time and a preview.

    Exit 5 on a server that keeps no read positions (--ephemeral, or an older server).
    """
    import asyncio

    from chatcli.client import render
    from chatcli.client.commands import fetch_inbox

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, timeout, profile, token_file=token_file, cafile=cafile,
                         insecure=insecure)
    answer = asyncio.run(fetch_inbox(settings, me, 200 if count else limit))
    if count:
        total = sum(conversation.unread for conversation in answer.conversations)
        env.write_line(render.unread_json(total) if json_output else str(total))
        return
    for conversation in answer.conversations:
        env.write_line(render.conversation_json(conversation) if json_output
                       else render.inbox_line(conversation, colour=env.colour))


class BenchProtocol(StrEnum):
    native = "native"
    legacy = "legacy"


@app.command()
def bench(
    ctx: typer.Context,
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="Sender → receiver pairs.")] = 50,
    messages: Annotated[int, typer.Option("--messages", min=1, help="Messages each sender sends.")] = 2000,
    window: Annotated[int, typer.Option("--window", min=1, help="Unacknowledged messages per sender at most.")] = 32,
    size: Annotated[int, typer.Option("--size", min=0, help="Bytes of text per message.")] = 64,
    protocol: Annotated[BenchProtocol, typer.Option(
        "--protocol", case_sensitive=False, help="native (chatcli.v1) or legacy (the seed app's frames; "
        "drives the seed's Node server too).")] = BenchProtocol.native,
    procs: Annotated[int, typer.Option("--procs", min=1, help="Processes to spread the pairs over.")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with the results.")] = False,
    grace: Annotated[float, typer.Option(
        "--grace", min=0.0, help="Seconds to wait, once every ack is in, for acknowledged messages still "
        "missing (then they count as lost).")] = 2.0,
    prefix: Annotated[str | None, typer.Option(
        "--prefix", help="User ids are PREFIXs0…, PREFIXr0… [default: a new random prefix per run].",
        show_default=False)] = None,
    url: UrlOption = None,
    auth_key: AuthKeyOption = None,
    auth_key_file: AuthKeyFileOption = None,
    cafile: CafileOption = None,
    insecure: InsecureOption = False,
    timeout: TimeoutOption = None,
    profile: ProfileOption = None,
) -> None:
    """Load the server with sender → receiver pairs; print throughput and latency, verify every message.

    Exit 0 when every message was accepted and arrived once, in order; 3 when sessions were lost,
    5 when messages were refused, 6 when acks never came, 1 when messages were lost, duplicated or
    out of order.
    """
    import json

    from chatcli.client import bench as engine

    env = _environment(ctx)
    settings = _settings(env, url, auth_key, auth_key_file, timeout, profile, token_file=None, cafile=cafile,
                         insecure=insecure)
    options = engine.BenchOptions(
        url=settings.url, pairs=pairs, messages=messages, window=window, size=size, protocol=protocol.value,
        procs=procs, auth_key=settings.auth_key, timeout=settings.timeout, grace=grace, prefix=prefix or "",
        cafile=str(settings.cafile) if settings.cafile else None, insecure=settings.insecure)
    if json_output or not (env.stdout_isatty and env.stderr_isatty):
        counts, histogram = engine.run(options)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("delivered"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task("bench", total=pairs * messages)
            counts, histogram = engine.run(options, lambda done, total: bar.update(task, completed=done))
    res = engine.result(options, counts, histogram)
    env.write_line(json.dumps(res) if json_output else engine.summary_text(res))
    if res["exit_status"]:
        raise typer.Exit(res["exit_status"])


# ---------------------------------------------------------------------------
# Accounts: `chatcli user add|list|remove|rotate`, on the server's database file.
# ---------------------------------------------------------------------------

user_app = typer.Typer(help="Manage accounts: per-user tokens that sessions must present.", no_args_is_help=True)
app.add_typer(user_app, name="user")

DbOption = Annotated[Path | None, typer.Option(
    "--db", help="The server's database [default: $XDG_DATA_HOME/chatcli/chatcli.db].", show_default=False,
    dir_okay=False)]
RedisOption = Annotated[str | None, typer.Option(
    "--redis", envvar="CHATCLI_REDIS_URL", show_envvar=True, show_default=False,
    help="The cluster's Redis (redis://, rediss://, unix://) instead of a database file.")]


def _accounts(db: Path | None, redis: str | None = None, *,
              create: bool = False) -> AccountStore | RedisAccountStore:
    """The accounts in Redis or in the database file; only ``user add`` may create the file (and its folder),
    so that a mistyped --db is an error rather than a new empty database."""
    from chatcli.errors import StorageError
    from chatcli.paths import default_db_path
    from chatcli.server.accounts import AccountStore

    if redis is not None:
        if db is not None:
            raise typer.BadParameter("--db and --redis exclude each other", param_hint="--redis")
        from chatcli.server.engine.redis_accounts import RedisAccountStore

        return RedisAccountStore(redis)
    path = db or default_db_path()
    if not create and not path.exists():
        raise StorageError(f"no database at {path}: `chatcli serve` creates it when it first starts, "
                           f"or `chatcli user add` with the same --db")
    path.parent.mkdir(parents=True, exist_ok=True)
    return AccountStore(path)


def _print_token(name: str, token: str) -> None:
    print(token)
    print(f"chatcli: the token for {name} is shown only once: keep it (chatcli reads it from CHATCLI_TOKEN or "
          f"--token-file). The server now requires tokens from every user.", file=sys.stderr)


@user_app.command("add")
def user_add(name: Annotated[str, typer.Argument(help="The user id.")], db: DbOption = None,
             redis: RedisOption = None) -> None:
    """Create an account and print its token (once)."""
    with _accounts(db, redis, create=True) as accounts:
        _print_token(name, accounts.add(name))


@user_app.command("rotate")
def user_rotate(name: Annotated[str, typer.Argument(help="The user id.")], db: DbOption = None,
                redis: RedisOption = None) -> None:
    """Replace an account's token and print the new one (once); sessions opened with the old one are closed
    within seconds, on every running server."""
    with _accounts(db, redis) as accounts:
        _print_token(name, accounts.rotate(name))


@user_app.command("remove")
def user_remove(name: Annotated[str, typer.Argument(help="The user id.")], db: DbOption = None,
                redis: RedisOption = None,
                allow_last: Annotated[bool, typer.Option(
                    "--allow-last", help="Remove the last account too, turning per-user tokens off "
                                         "(unless the server runs with --require-auth).")] = False) -> None:
    """Delete an account; its open sessions are closed within seconds, and it can no longer connect."""
    from chatcli.errors import AccountError, UsageError

    with _accounts(db, redis) as accounts:
        if not allow_last and [account.name for account in accounts.list()] == [name]:
            # Without accounts a server goes back to the shared key: anyone could connect as anyone.
            raise UsageError(f"{name} is the last account: without accounts the server accepts the shared key "
                             f"again, from anyone, as any user (unless it runs with --require-auth). Add "
                             f"another account first, or pass --allow-last")
        if not accounts.remove(name):
            raise AccountError(f"no account named {name!r}")
    print(f"chatcli: removed {name}", file=sys.stderr)


@user_app.command("list")
def user_list(ctx: typer.Context, db: DbOption = None, redis: RedisOption = None) -> None:
    """List accounts: name and creation time, one per line."""
    from chatcli.protocol import format_ts

    env = _environment(ctx)
    with _accounts(db, redis) as accounts:
        for account in accounts.list():
            env.write_line(f"{account.name}\t{format_ts(account.created_ts)}", flush=False)
    env.flush()


@app.command("migrate-to-redis")
def migrate_to_redis(
    redis: Annotated[str, typer.Option("--redis", envvar="CHATCLI_REDIS_URL", show_envvar=True, show_default=False,
                                       help="The empty Redis the cluster will use (redis://, rediss://, unix://).")],
    db: DbOption = None,
) -> None:
    """Move a single server's database (accounts, messages, cursors) into an empty Redis, for a cluster.

    Stop the server first. Message ids and the store's identity are kept: clients resume where they were.
    """
    from chatcli.paths import default_db_path
    from chatcli.server.engine.redis_import import migrate_to_redis as migrate

    def progress(done: int, total: int) -> None:
        print(f"chatcli: moved {done:,} of {total:,} messages ({100 * done // max(total, 1)}%)", file=sys.stderr)

    report = migrate(db or default_db_path(), redis, progress)
    print(f"chatcli: moved {report.messages:,} messages to {report.users:,} users and {report.accounts:,} "
          f"accounts into Redis (store {report.epoch}); start the nodes with --redis", file=sys.stderr)


def run(args: list[str] | None = None, env: Environment | None = None) -> int:
    """Run the app on ``args`` (default: argv) with ``env``'s streams; the exit status of whatever happened."""
    process_env = Environment.from_process() if env is None else env

    def call_app() -> int:
        # Typer >= 0.20 vendors click: its exceptions derive from typer.TyperException, and in
        # non-standalone mode Exit (also Ctrl-C, as 130) comes back as the return value.
        try:
            status = app_for(sys.argv[1:] if args is None else args)(args=args, standalone_mode=False,
                                                                     obj=process_env)
        except typer.Abort:
            return ExitStatus.INTERRUPTED
        except typer.TyperException as exc:
            show = getattr(exc, "show", None)
            if callable(show):
                show()
            else:
                process_env.notice(exc.format_message())
            return exc.exit_code
        return status if isinstance(status, int) else ExitStatus.SUCCESS

    return exit_status_of(call_app, process_env)


def app_for(args: list[str]) -> typer.Typer:
    """The app with only the command that ``args`` name (and the root options), or the whole app.

    Typer builds the click parameters of every registered command at each call, ~20 ms, for the
    one command that runs. The whole app still answers everything that needs it: no command or an
    unknown one, options before the command (``--help``, ``--version``), and shell completion.
    """
    name = args[0] if args else ""
    if not name or name.startswith("-") or completing():
        return app
    from copy import copy

    from typer.main import get_command_name

    commands = [info for info in app.registered_commands
                if info.callback is not None and (info.name or get_command_name(info.callback.__name__)) == name]
    groups = [info for info in app.registered_groups if info.name == name]
    if not commands and not groups:
        return app
    only = copy(app)
    only.registered_commands, only.registered_groups = commands, groups
    return only


def main() -> None:
    """Run the Typer app on argv and exit with its status (the console script is ``chatcli.launch:main``)."""
    sys.exit(run())
