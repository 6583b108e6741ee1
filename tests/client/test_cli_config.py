"""Client settings: flag > environment > profile > default, and secrets off argv."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatcli.client.settings import DEFAULT_URL, resolve_settings
from chatcli.errors import UsageError
from chatcli.protocol import DEFAULT_AUTH_KEY
from tests.support.processes import Chatcli, StartServer


def write_config(home: Path, text: str) -> Path:
    path = home / "xdg_config_home" / "chatcli" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("latin-1" if "\xe9" in text else "utf-8"))  # é: a file in Latin-1, not UTF-8
    return path


def test_defaults_without_flags_environment_or_config(tmp_home: Path) -> None:
    settings = resolve_settings()
    assert (settings.url, settings.auth_key, settings.timeout, settings.profile) == \
        (DEFAULT_URL, DEFAULT_AUTH_KEY, 10.0, None)


def test_flag_beats_environment_beats_profile(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_home, '[profiles.work]\nurl = "ws://profile:1"\nauth_key = "profile-key"\ntimeout = 3\n')
    monkeypatch.setenv("CHATCLI_PROFILE", "work")
    from_profile = resolve_settings()
    assert (from_profile.url, from_profile.auth_key, from_profile.timeout) == ("ws://profile:1", "profile-key", 3)
    monkeypatch.setenv("CHATCLI_URL", "ws://env:2")
    monkeypatch.setenv("CHATCLI_AUTH_KEY", "env-key")
    from_env = resolve_settings()
    assert (from_env.url, from_env.auth_key) == ("ws://env:2", "env-key")
    from_flags = resolve_settings(url="ws://flag:3", auth_key="flag-key", timeout=1)
    assert (from_flags.url, from_flags.auth_key, from_flags.timeout) == ("ws://flag:3", "flag-key", 1)


def test_profile_choice_and_key_file(tmp_home: Path) -> None:
    key_file = tmp_home / "key"
    key_file.write_text("file-key\n")
    write_config(tmp_home, f'default_profile = "home"\n[profiles.home]\nauth_key_file = "{key_file}"\n'
                           '[profiles.default]\nurl = "ws://default:1"\n')
    assert resolve_settings().auth_key == "file-key"
    assert resolve_settings(profile="default").url == "ws://default:1"
    other = tmp_home / "other"
    other.write_text("flag-file-key")
    assert resolve_settings(auth_key_file=other).auth_key == "flag-file-key"


@pytest.mark.parametrize("config, flags, message", [
    ('[profiles.a]\nurl = "ws://a:1"\n', {"profile": "b"}, "no profile 'b'"),
    ("[profiles.a\n", {}, "not valid TOML"),
    ('timeout = 5\n', {}, "unknown top-level keys \\['timeout'\\]; settings such as 'timeout' go in a \\[profiles"),
    ('default_profile = 7\n[profiles.a]\nurl = "ws://a:1"\n', {}, "default_profile must be a profile's name"),
    ('[profiles.a]\nurll = "x"\n', {"profile": "a"}, "unknown keys"),
    ("", {"url": "http://x:1"}, "invalid server URL"),
    ("", {"url": "ws://[::1:6060"}, "invalid server URL 'ws://\\[::1:6060': Invalid IPv6 URL"),
    ("", {"timeout": 0}, "positive number"),
    ("", {"timeout": float("nan")}, "positive number of seconds, at most 10,000,000, not nan"),  # never times out
    ("", {"timeout": float("inf")}, "not inf"),  # overflowed clocks, exit 1
    ("", {"timeout": 1e10}, "at most 10,000,000"),
    ('[profiles.a]\ntimeout = nan\n', {"profile": "a"}, "not nan"),
    ('[profiles.a]\nurl = "ws://caf\xe9:1"\n', {}, "not valid TOML: not UTF-8 \\(byte 0xe9 at offset 28\\)"),
    ("", {"auth_key": "k", "auth_key_file": Path("/k")}, "not both"),
    ("", {"auth_key_file": Path("/nonexistent/key")}, "cannot read the auth key file"),
])
def test_bad_settings_are_usage_errors(tmp_home: Path, config: str, flags: dict[str, object],
                                       message: str) -> None:
    write_config(tmp_home, config)
    with pytest.raises(UsageError, match=message):
        resolve_settings(**flags)  # type: ignore[arg-type]


def test_commands_use_the_profile_and_the_environment(chatcli: Chatcli, tmp_home: Path,
                                                      start_server: StartServer) -> None:
    server = start_server("--auth-key", "s3cret", "--ephemeral")
    key_file = tmp_home / "key"
    key_file.write_text("s3cret\n")
    write_config(tmp_home, f'[profiles.lab]\nurl = "{server.ws_url}"\nauth_key_file = "{key_file}"\n'
                           f'[profiles.wrongkey]\nurl = "{server.ws_url}"\nauth_key = "nope"\n')
    bob = chatcli("listen", "bob", "--profile", "lab", "--count", "1")
    bob.wait_stderr("listening as")
    assert chatcli("send", "alice", "bob", "via profile", env={"CHATCLI_PROFILE": "lab"}).wait() == 0
    assert bob.wait() == 0
    # The environment's key beats the profile's wrong one; the flag beats both.
    assert chatcli("send", "alice", "bob", "x", "--profile", "wrongkey").wait() == 4
    assert chatcli("send", "alice", "bob", "x", "--profile", "wrongkey", "--auth-key-file", str(key_file)
                   ).wait() == 5  # authenticated; bob has gone, so: refused, offline
    assert chatcli("send", "alice", "bob", "x", "--profile", "wrongkey",
                   env={"CHATCLI_AUTH_KEY": "s3cret"}).wait() == 5


def test_token_flag_beats_environment_beats_profile_and_replaces_the_key(
        tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile_token_file = tmp_home / "profile.token"
    profile_token_file.write_text("from-profile-file\n")
    write_config(tmp_home, f'[profiles.a]\ntoken = "from-profile"\n[profiles.b]\ntoken_file = "{profile_token_file}"\n')
    assert resolve_settings().token is None
    assert resolve_settings().credential == DEFAULT_AUTH_KEY
    assert resolve_settings(profile="a").credential == "from-profile"
    assert resolve_settings(profile="b").token == "from-profile-file"
    monkeypatch.setenv("CHATCLI_TOKEN", " from-env\n")
    assert resolve_settings(profile="a").token == "from-env"
    flag_file = tmp_home / "flag.token"
    flag_file.write_text("from-flag\n")
    settings = resolve_settings(profile="a", token_file=flag_file, auth_key="k")
    assert (settings.token, settings.credential) == ("from-flag", "from-flag")
    assert "from-flag" not in repr(settings) and "'k'" not in repr(settings)  # secrets never printed


def test_tls_settings(tmp_home: Path) -> None:
    write_config(tmp_home, '[profiles.lab]\nurl = "wss://lab:1"\ncafile = "~/lab-ca.pem"\n')
    lab = resolve_settings(profile="lab")
    assert lab.uses_tls and lab.cafile == Path("~/lab-ca.pem").expanduser() and not lab.insecure
    assert resolve_settings(profile="lab", cafile=Path("/ca.pem")).cafile == Path("/ca.pem")
    assert resolve_settings(url="wss://x:1", insecure=True).insecure


@pytest.mark.parametrize("flags, message", [
    ({"url": "wss://x:1", "cafile": Path("/ca.pem"), "insecure": True}, "not both"),
    ({"url": "ws://x:1", "insecure": True}, "for wss:// URLs"),
    ({"url": "ws://x:1", "cafile": Path("/ca.pem")}, "for wss:// URLs"),
    ({"token_file": Path("/nonexistent/token")}, "cannot read the token file"),
])
def test_bad_tls_and_token_settings_are_usage_errors(tmp_home: Path, flags: dict[str, object],
                                                     message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_settings(**flags)  # type: ignore[arg-type]


@pytest.mark.parametrize("content, message", [("", "is empty"), ("tok\nen", "more than one line")])
def test_bad_token_files_are_usage_errors(tmp_home: Path, content: str, message: str) -> None:
    token_file = tmp_home / "token"
    token_file.write_text(content)
    with pytest.raises(UsageError, match=message):
        resolve_settings(token_file=token_file)


def test_the_chats_preferences_come_from_the_profile(tmp_home: Path) -> None:
    assert (resolve_settings().receipts, resolve_settings().typing, resolve_settings().notify) == (True, True, "bell")
    write_config(tmp_home, '[profiles.default]\nreceipts = false\ntyping = false\nnotify = "desktop"\n')
    settings = resolve_settings()
    assert (settings.receipts, settings.typing, settings.notify) == (False, False, "desktop")
    for bad in ('receipts = "no"', "typing = 0", 'notify = "loud"'):
        write_config(tmp_home, f"[profiles.default]\n{bad}\n")
        with pytest.raises(UsageError, match=bad.split(" ")[0]):
            resolve_settings()


def test_a_key_that_cannot_be_a_header_is_a_usage_error_not_a_smuggled_header(chatcli: Chatcli) -> None:
    for args, env in ((["--auth-key", "a\r\nX-Injected: 1"], {}), ([], {"CHATCLI_TOKEN": "t\x01ken"})):
        run = chatcli("send", "alice", "bob", "hi", "--url", "ws://127.0.0.1:9", *args, env=env)
        assert run.wait() == 2
        assert run.err == ["chatcli: the token or auth key holds a line break or another control character"]
