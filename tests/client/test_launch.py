"""Which ``chatcli`` command lines the Typer-free fast path takes (``chatcli.launch``); the rest go to Typer,
which builds only the command that runs (``cli.app_for``)."""

from __future__ import annotations

import pytest
from typer.main import get_command_name

from chatcli.cli import app, app_for
from chatcli.launch import parse_plain_send


@pytest.mark.parametrize(("args", "expected"), [
    (["send", "alice", "bob", "hi"], ("alice", "bob", "hi", None, False)),
    (["send", "alice", "bob"], ("alice", "bob", None, None, False)),
    (["send", "alice", "bob", "hi", "--url", "ws://h:1"], ("alice", "bob", "hi", "ws://h:1", False)),
    (["send", "--url=ws://h:1", "alice", "--json", "bob", "hi"], ("alice", "bob", "hi", "ws://h:1", True)),
    (["send", "alice", "bob", ""], ("alice", "bob", "", None, False)),
])
def test_plain_sends_skip_typer(args: list[str], expected: tuple[object, ...]) -> None:
    plain = parse_plain_send(args)
    assert plain is not None
    assert (plain.me, plain.peer, plain.text, plain.url, plain.json_output) == expected


@pytest.mark.parametrize("args", [
    [], ["listen", "bob"], ["send"], ["send", "alice"], ["send", "alice", "bob", "hi", "extra"],
    ["send", "--help"], ["send", "alice", "bob", "-"], ["send", "alice", "bob", "--", "-x"],
    ["send", "alice", "bob", "hi", "--timeout", "1"], ["send", "alice", "bob", "--lines"],
    ["send", "alice", "bob", "hi", "--url"], ["send", "alice", "bob", "hi", "--url", "--json"],
    ["send", "alice", "bob", "hi", "--json=1"],
])
def test_everything_else_goes_to_typer(args: list[str]) -> None:
    assert parse_plain_send(args) is None


@pytest.mark.parametrize(("args", "commands"), [
    (["listen", "bob"], ["listen"]), (["history", "--help"], ["history"]), (["user", "add", "x"], ["user"]),
    (["send", "a", "b", "--lines"], ["send"]),
])
def test_typer_builds_only_the_command_that_runs(args: list[str], commands: list[str]) -> None:
    only = app_for(args)
    names = [c.name or get_command_name(c.callback.__name__) for c in only.registered_commands if c.callback]
    assert names + [g.name for g in only.registered_groups] == commands
    assert only.registered_callback is app.registered_callback  # the root's --version and completion stay


@pytest.mark.parametrize("args", [[], ["--help"], ["--version"], ["nosuch"], ["-x", "listen"]])
def test_the_whole_app_answers_the_rest(args: list[str]) -> None:
    assert app_for(args) is app


def test_the_whole_app_answers_shell_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_CHATCLI_COMPLETE", "bash_complete")
    assert app_for(["listen"]) is app


def test_ctrl_c_while_a_command_is_still_loading_exits_130_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from chatcli import launch

    def loading() -> None:  # where a Ctrl-C in the first tens of milliseconds lands: an import
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "_run_argv", loading)
    with pytest.raises(SystemExit) as exited:
        launch.main()
    assert exited.value.code == 130 and capsys.readouterr().err == ""
