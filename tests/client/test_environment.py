"""The commands in-process through ``cli.run``, with substituted streams, against a real server."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

from chatcli.cli import run
from chatcli.client.environment import Environment
from chatcli.errors import ExitStatus
from tests.support.processes import RunningServer


class GoneReader(io.StringIO):
    """A stdout whose reader has gone away, as with ``| head -1``: the write fails as a real one does."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")  # with its errno: Click's main looks at it


def environment(stdin: str = "", *, stdin_isatty: bool = False, stdout_isatty: bool = False,
                no_color: bool = False, stdout: io.StringIO | None = None) -> Environment:
    return Environment(io.StringIO(stdin), stdout if stdout is not None else io.StringIO(), io.StringIO(),
                       stdin_isatty=stdin_isatty, stdout_isatty=stdout_isatty, no_color=no_color)


def output(env: Environment) -> str:
    assert isinstance(env.stdout, io.StringIO)
    return env.stdout.getvalue()


def errors(env: Environment) -> str:
    assert isinstance(env.stderr, io.StringIO)
    return env.stderr.getvalue()


def test_send_reads_the_substituted_stdin_and_prints_its_ack(tmp_home: Path, server: RunningServer) -> None:
    env = environment("from a pipe\n")
    assert run(["send", "alice", "bob", "--json", "--url", server.ws_url], env) == ExitStatus.SUCCESS
    assert '"status": "stored"' in output(env) and '"to": "bob"' in output(env)
    assert errors(env) == ""


def test_send_without_text_from_a_terminal_is_a_usage_error(tmp_home: Path) -> None:
    env = environment(stdin_isatty=True)
    assert run(["send", "alice", "bob"], env) == ExitStatus.USAGE
    assert errors(env).startswith("chatcli: no TEXT given and stdin is a terminal")
    assert output(env) == ""


def test_history_colours_a_terminal_unless_no_color(tmp_home: Path, server: RunningServer) -> None:
    assert run(["send", "alice", "bob", "hello", "--url", server.ws_url], environment()) == ExitStatus.SUCCESS
    terminal = environment(stdout_isatty=True)
    assert run(["history", "bob", "alice", "--url", server.ws_url], terminal) == ExitStatus.SUCCESS
    assert "\x1b[" in output(terminal) and "hello" in output(terminal)
    for plain in (environment(stdout_isatty=True, no_color=True), environment()):
        assert run(["history", "bob", "alice", "--url", server.ws_url], plain) == ExitStatus.SUCCESS
        assert "\x1b" not in output(plain) and "alice: hello" in output(plain)


def test_a_reader_gone_away_is_a_quiet_success(tmp_home: Path, server: RunningServer) -> None:
    assert run(["send", "alice", "bob", "hello", "--url", server.ws_url], environment()) == ExitStatus.SUCCESS
    for json_output in ([], ["--json"]):  # `chatcli history bob alice | head -1` exited 1 (Click's EPIPE exit)
        env = environment(stdout=GoneReader())
        assert run(["history", "bob", "alice", *json_output, "--url", server.ws_url], env) == ExitStatus.SUCCESS
        assert errors(env) == ""


def test_a_pipe_whose_reader_exited_is_told_apart_and_silenced() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        env = Environment(io.StringIO(), pipe, io.StringIO())
        assert not env.reader_gone()  # someone still reads it
        os.close(read_end)
        assert env.reader_gone()
        env.write_line("to nobody")  # stdout now goes to /dev/null: no BrokenPipeError, here or at exit
        assert os.path.samefile(f"/proc/self/fd/{pipe.fileno()}", os.devnull)
    assert not environment().reader_gone()  # no descriptor: nothing to tell


def test_user_list_into_a_closed_pipe_is_a_quiet_success(tmp_path: Path) -> None:
    db = str(tmp_path / "accounts.db")
    assert run(["user", "add", "alice", "--db", db], environment()) == ExitStatus.SUCCESS
    env = environment(stdout=GoneReader())
    assert run(["user", "list", "--db", db], env) == ExitStatus.SUCCESS
    assert errors(env) == ""
    listed = environment()
    assert run(["user", "list", "--db", db], listed) == ExitStatus.SUCCESS
    assert output(listed).startswith("alice\t")
