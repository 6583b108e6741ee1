"""The console entry point: a plain ``chatcli send ME PEER [TEXT]`` runs without Typer.

Importing Typer and building every command's click parameters costs ~70 ms, half of a
one-shot send (docs/performance.md, "A plain send without Typer"). ``main`` recognises
the plain forms of ``send`` itself (positional arguments, ``--url``, ``--json``) and hands
everything else (other options, ``--help``, ``-`` for stdin, shell completion, other
commands) to the Typer app in ``chatcli.cli``, so every error message and exit status
outside the plain forms is Typer's own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chatcli.client.environment import Environment, point_at_devnull
from chatcli.errors import ExitStatus, exit_status_for

if TYPE_CHECKING:
    from chatcli.client.settings import ClientSettings
    from chatcli.protocol import Ack

__all__ = ["PlainSend", "client_settings", "completing", "exit_status_of", "main", "parse_plain_send",
           "send_command"]


class PlainSend:
    """The arguments of a ``send`` that needs no option parser."""

    __slots__ = ("json_output", "me", "peer", "text", "url")

    def __init__(self, me: str, peer: str, text: str | None, url: str | None, json_output: bool) -> None:
        self.me, self.peer, self.text, self.url, self.json_output = me, peer, text, url, json_output


def parse_plain_send(args: list[str]) -> PlainSend | None:
    """``send ME PEER [TEXT] [--url URL] [--json]``, or None for anything else (Typer parses it)."""
    if not args or args[0] != "send":
        return None
    positionals: list[str] = []
    url: str | None = None
    json_output = False
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--json":
            json_output = True
        elif arg == "--url":
            url = next(rest, None)
            if url is None or url.startswith("-"):  # missing or odd: let click word the error
                return None
        elif arg.startswith("--url="):
            url = arg.removeprefix("--url=")
        elif arg.startswith("-"):  # every other option, --help, '-' (stdin) and '--'
            return None
        else:
            positionals.append(arg)
    if len(positionals) not in (2, 3):
        return None
    me, peer, *text = positionals
    return PlainSend(me, peer, text[0] if text else None, url, json_output)


def completing() -> bool:
    """Shell completion asks through ``_CHATCLI_COMPLETE`` (click's ``_{PROG}_COMPLETE``): Typer answers."""
    return any(name.endswith("_COMPLETE") for name in os.environ)


def client_settings(env: Environment, url: str | None, auth_key: str | None, auth_key_file: Path | None,
                    timeout: float | None, profile: str | None, *, token_file: Path | None, cafile: Path | None,
                    insecure: bool) -> ClientSettings:
    """Flag > environment > profile > default (``resolve_settings``), warning on stderr about --insecure."""
    from chatcli.client.settings import resolve_settings

    settings = resolve_settings(url=url, auth_key=auth_key, auth_key_file=auth_key_file, timeout=timeout,
                                profile=profile, token_file=token_file, cafile=cafile, insecure=insecure)
    if settings.insecure:  # every time: skipping verification must never go unnoticed
        env.notice(f"WARNING: --insecure: the TLS certificate of {settings.url} is NOT verified; anyone on "
                   "the network path can read and change this session")
    return settings


def send_command(env: Environment, me: str, peer: str, text: str | None, *, lines: bool = False,
                 window: int = 256, json_output: bool = False, url: str | None = None,
                 auth_key: str | None = None, auth_key_file: Path | None = None, token_file: Path | None = None,
                 cafile: Path | None = None, insecure: bool = False, timeout: float | None = None,
                 profile: str | None = None, reply_to: int | None = None) -> None:
    """``chatcli send``, whichever parser read its arguments.

    One message goes over a blocking socket (``client.oneshot``: no asyncio, no websockets to
    import); ``--lines`` streams over the asyncio session with a window of messages in flight, and
    so does everything when a proxy is configured (websockets' client knows how to use it) and a
    reply (``--reply-to``: sent once the hello says the server keeps replies).
    """
    settings = client_settings(env, url, auth_key, auth_key_file, timeout, profile, token_file=token_file,
                               cafile=cafile, insecure=insecure)

    def on_ack(ack: Ack) -> None:
        if json_output:
            from chatcli.client.render import ack_json  # only here: a plain send prints nothing

            env.write_line(ack_json(ack, peer))

    from chatcli.client.connecting import proxy_in_environment

    if not lines and reply_to is None and not proxy_in_environment():  # a reply checks the server's features
        from chatcli.client.inputs import read_text
        from chatcli.client.oneshot import send_one

        send_one(settings, me, peer, read_text(text, stdin=env.stdin, stdin_isatty=env.stdin_isatty), on_ack)
        return
    import asyncio

    from chatcli.client.commands import send_messages
    from chatcli.client.inputs import read_texts

    texts = read_texts(text, lines=lines, stdin=env.stdin, stdin_isatty=env.stdin_isatty)
    asyncio.run(send_messages(settings, me, peer, texts, on_ack, window=window, by_line=lines, reply_to=reply_to,
                              on_interrupt=env.notice))


def exit_status_of(call: Callable[[], int], env: Environment) -> int:
    """Run ``call``; the one place where errors become exit statuses (``errors.exit_status_for``)."""
    try:
        return call()
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:  # the reader went away (``| head -1``): a quiet success
        point_at_devnull(env.stdout)
        return ExitStatus.SUCCESS
    except Exception as exc:
        env.notice(str(exc) or type(exc).__name__)
        return exit_status_for(exc)


def main() -> None:
    """Console entry point: run the command on argv and exit with its status."""
    try:
        _run_argv()
    except KeyboardInterrupt:  # Ctrl-C while the command is still loading: an interruption all the same
        sys.exit(ExitStatus.INTERRUPTED)


def _run_argv() -> None:
    if completing():
        # Typer renders each candidate's help with Rich, which wraps it at the terminal's width: fish
        # then took the wrapped part for a candidate of its own. One line each, however long.
        os.environ["COLUMNS"] = "10000"
    plain = None if completing() else parse_plain_send(sys.argv[1:])
    if plain is None:
        from chatcli.cli import run

        sys.exit(run())
    env = Environment.from_process()

    def send() -> int:
        send_command(env, plain.me, plain.peer, plain.text, url=plain.url, json_output=plain.json_output)
        return ExitStatus.SUCCESS

    sys.exit(exit_status_of(send, env))
