"""The command-line interface: each command parses options and calls one function.

Typer lives here and nowhere else. Errors are not handled in the commands:
``main`` maps every exception to an exit status through ``errors.exit_status_for``.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from chatcli import __version__
from chatcli.errors import ExitStatus, exit_status_for

app = typer.Typer(
    name="chatcli",
    help="A command-line chat suite: a relay server and send / listen / chat clients.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class LogLevel(str, Enum):
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
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False)] = LogLevel.info,
    log_format: Annotated[LogFormat, typer.Option(case_sensitive=False)] = LogFormat.text,
) -> None:
    """Run the relay server."""
    from chatcli.server.config import ServerConfig
    from chatcli.server.main import run

    config = ServerConfig.build(host=host, ws_port=ws_port, http_port=http_port, auth_key=auth_key,
                                max_text_bytes=max_text_bytes)
    run(config, log_level=log_level.value, log_format=log_format.value)


def main() -> None:
    """Console entry point: run the app and map whatever it raised to one exit status."""
    # Typer >= 0.20 vendors click: its exceptions derive from typer.TyperException, and in
    # non-standalone mode Exit (also Ctrl-C, as 130) comes back as the return value.
    try:
        status = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(ExitStatus.INTERRUPTED)
    except typer.TyperException as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"chatcli: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as exc:  # the one place where errors become exit statuses
        status = exit_status_for(exc)
        print(f"chatcli: {exc}" if str(exc) else f"chatcli: {type(exc).__name__}", file=sys.stderr)
        sys.exit(status)
    sys.exit(status if isinstance(status, int) else ExitStatus.SUCCESS)


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head -1``): exit 0 without a traceback at interpreter exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(ExitStatus.SUCCESS)
