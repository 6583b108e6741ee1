"""The clients against a server on a network: TLS, per-user tokens, rate limits and `chatcli who`.

Everything runs through the real entry point against a real `chatcli serve`; certificates
are made on the fly with trustme (``tests/support/credentials.py``).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from chatcli import protocol as p
from tests.support.credentials import TlsServer, add_user, start_tls_server
from tests.support.processes import Chatcli, RunningServer, StartServer, wait_until
from tests.support.wsclients import legacy, native, recv_frame


@pytest.fixture
def tls(start_server: StartServer, tmp_path: Path) -> TlsServer:
    return start_tls_server(start_server, tmp_path)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", ["--cafile", "SSL_CERT_FILE"])
def test_send_listen_history_and_who_over_tls(chatcli: Chatcli, tls: TlsServer, trust: str) -> None:
    if trust == "--cafile":
        args, env = ["--url", tls.url, "--cafile", str(tls.cafile)], {}
    else:
        args, env = ["--url", tls.url], {"SSL_CERT_FILE": str(tls.cafile)}
    bob = chatcli("listen", "bob", "--count", "1", *args, env=env)
    bob.wait_stderr("listening as bob")
    who = chatcli("who", "alice", *args, env=env)
    assert who.wait() == 0 and who.out == ["bob"]
    assert chatcli("send", "alice", "bob", "over TLS", *args, env=env).wait() == 0
    assert bob.wait() == 0
    assert json.loads(bob.out[0])["text"] == "over TLS"
    history = chatcli("history", "alice", "bob", "--json", *args, env=env)
    assert history.wait() == 0
    assert [json.loads(line)["text"] for line in history.out] == ["over TLS"]


def test_an_untrusted_certificate_exits_3_naming_the_cause(chatcli: Chatcli, tls: TlsServer) -> None:
    for command in (["send", "alice", "bob", "hi"], ["listen", "bob"], ["history", "alice", "bob"],
                    ["who", "alice"]):
        untrusting = chatcli(*command, "--url", tls.url)
        assert untrusting.wait() == 3, command  # listen too: retrying cannot fix a certificate
        assert "TLS certificate is not trusted" in untrusting.err[-1]
        assert "--cafile" in untrusting.err[-1]
        assert "Traceback" not in "\n".join(untrusting.err)


def test_a_certificate_for_another_host_exits_3(chatcli: Chatcli, start_server: StartServer,
                                                tmp_path: Path) -> None:
    tls = start_tls_server(start_server, tmp_path, "chat.example.org")
    wrong_host = chatcli("send", "alice", "bob", "hi", "--url", tls.url, "--cafile", str(tls.cafile))
    assert wrong_host.wait() == 3
    assert "not trusted" in wrong_host.err[-1] and "mismatch" in wrong_host.err[-1]


def test_insecure_connects_without_verifying_and_warns_every_time(chatcli: Chatcli, tls: TlsServer) -> None:
    for command in (["send", "alice", "bob", "hi"], ["who", "alice"]):
        insecure = chatcli(*command, "--url", tls.url, "--insecure")
        assert insecure.wait() == 0, insecure.err
        assert any("WARNING: --insecure" in line and "NOT verified" in line for line in insecure.err)


def test_tls_mistakes_are_clear(chatcli: Chatcli, tls: TlsServer, start_server: StartServer,
                                tmp_path: Path) -> None:
    plain_to_tls = chatcli("send", "alice", "bob", "hi", "--url", f"ws://127.0.0.1:{tls.server.ws_port}")
    assert plain_to_tls.wait() == 3 and "uses TLS, connect to wss://" in plain_to_tls.err[-1]
    plain = start_server("--ephemeral")
    tls_to_plain = chatcli("send", "alice", "bob", "hi", "--url", f"wss://127.0.0.1:{plain.ws_port}")
    assert tls_to_plain.wait() == 3 and "is the server serving TLS?" in tls_to_plain.err[-1]
    not_a_ca = tmp_path / "not-a-ca.pem"
    not_a_ca.write_text("hello\n")
    for extra, message in ((["--cafile", str(not_a_ca)], "cannot use the CA file"),
                           (["--cafile", str(tmp_path / "missing.pem")], "cannot read the CA file"),
                           (["--cafile", str(tls.cafile), "--insecure"], "not both")):
        usage = chatcli("send", "alice", "bob", "hi", "--url", tls.url, *extra)
        assert usage.wait() == 2 and message in usage.err[-1]
    insecure_plain = chatcli("send", "alice", "bob", "hi", "--url", "ws://127.0.0.1:1", "--insecure")
    assert insecure_plain.wait() == 2 and "for wss:// URLs" in insecure_plain.err[-1]


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_from_the_environment_a_file_and_a_profile(chatcli: Chatcli, start_server: StartServer,
                                                         tmp_path: Path, tmp_home: Path) -> None:
    db = tmp_path / "chatcli.db"
    tokens = {name: add_user(db, name) for name in ("alice", "bob", "carol")}
    server = start_server()
    bob = chatcli("listen", "bob", "--url", server.ws_url, "--count", "2", env={"CHATCLI_TOKEN": tokens["bob"]})
    bob.wait_stderr("listening as bob")
    token_file = tmp_path / "alice.token"
    token_file.write_text(tokens["alice"] + "\n")
    assert chatcli("send", "alice", "bob", "by file", "--url", server.ws_url, "--token-file", str(token_file)
                   ).wait() == 0
    config = tmp_home / "xdg_config_home" / "chatcli" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[profiles.carol]\nurl = "{server.ws_url}"\ntoken = "{tokens["carol"]}"\n')
    assert chatcli("send", "carol", "bob", "by profile", "--profile", "carol").wait() == 0
    assert bob.wait() == 0
    assert [json.loads(line)["from"] for line in bob.out] == ["alice", "carol"]
    who = chatcli("who", "carol", "--profile", "carol", "--json")
    assert who.wait() == 0 and json.loads(who.out[0]) == []  # bob's listen has ended


def test_a_wrong_or_missing_token_exits_4_without_showing_it(chatcli: Chatcli, start_server: StartServer,
                                                             tmp_path: Path) -> None:
    db = tmp_path / "chatcli.db"
    alice_token, bob_token = add_user(db, "alice"), add_user(db, "bob")
    server = start_server()
    wrong = chatcli("send", "alice", "bob", "hi", "--url", server.ws_url, env={"CHATCLI_TOKEN": bob_token})
    assert wrong.wait() == 4
    assert "wrong token for alice" in wrong.err[-1] and "check the token" in wrong.err[-1]
    assert bob_token not in "\n".join(wrong.err)
    missing = chatcli("listen", "alice", "--url", server.ws_url)  # the shared key: no longer enough
    assert missing.wait() == 4 and "--token-file or CHATCLI_TOKEN" in missing.err[-1]
    # The flag beats the environment.
    token_file = tmp_path / "alice.token"
    token_file.write_text(alice_token)
    assert chatcli("who", "alice", "--url", server.ws_url, "--token-file", str(token_file),
                   env={"CHATCLI_TOKEN": bob_token}).wait() == 0


def test_tokens_over_tls(chatcli: Chatcli, tls: TlsServer, tmp_path: Path) -> None:
    token = add_user(tmp_path / "chatcli.db", "alice")  # accounts are read at each handshake
    assert chatcli("send", "alice", "bob", "hi", "--url", tls.url, "--cafile", str(tls.cafile),
                   env={"CHATCLI_TOKEN": token}).wait() == 0
    assert chatcli("send", "alice", "bob", "hi", "--url", tls.url, "--cafile", str(tls.cafile)).wait() == 4


# -- limits and who --------------------------------------------------------------------------


def test_send_lines_exits_5_on_a_refusal_naming_the_lines(chatcli: Chatcli, start_server: StartServer) -> None:
    server = start_server("--ephemeral")  # stores nothing: a message to someone offline is refused
    bob, _ = native(server.ws_url, "bob")
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--url", server.ws_url, stdin=subprocess.PIPE)
    assert sender.proc.stdin is not None
    sender.proc.stdin.write("one\n\n")
    sender.proc.stdin.flush()
    assert isinstance(message := recv_frame(bob), p.Message) and message.text == "one"
    bob.close()
    wait_until(lambda: any('"disconnect"' in line and '"bob"' in line for line in server.log), what="bob to go")
    sender.proc.stdin.write("two\nthree\n")
    sender.proc.stdin.close()
    assert sender.wait() == 5
    # Both were in flight at once: each gets its ack, in input order, and stderr names the refused
    # lines by number (the empty line 2 counts) and says what became of the others.
    assert [json.loads(line)["status"] for line in sender.out] == ["delivered", "refused", "refused"]
    assert sender.err[-1].endswith("2 message(s) to bob refused (line 3: offline, line 4: offline); the other "
                                   "1 line(s) up to line 4 were accepted; nothing after line 4 was sent")
    # --window 1 waits for each ack: nothing is sent after the first refusal.
    stop_and_wait = chatcli("send", "carol", "bob", "--lines", "--json", "--window", "1", "--url", server.ws_url,
                            stdin="one\ntwo\nthree\n")
    assert stop_and_wait.wait() == 5
    assert [json.loads(line)["status"] for line in stop_and_wait.out] == ["refused"]
    assert stop_and_wait.err[-1].endswith("(line 1: offline); no other line was accepted; nothing after line 1 "
                                          "was sent")


def test_send_lines_names_a_line_too_large_for_the_server_and_prints_every_ack(chatcli: Chatcli,
                                                                             start_server: StartServer) -> None:
    server = start_server("--max-text-bytes", "1000")
    lines = [f"short {i}" for i in range(300)] + ["x" * 2000] + [f"after {i}" for i in range(300)]
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--window", "1", "--url", server.ws_url,
                     stdin="\n".join(lines) + "\n")
    assert sender.wait() == 5
    # Refused before sending (the hello gave the limit), but reported as a refusal by the server is:
    # by line number, with every ack before it printed and what became of the rest.
    statuses = [json.loads(line)["status"] for line in sender.out]
    assert statuses == ["stored"] * 300 + ["refused"]
    assert json.loads(sender.out[-1])["reason"] == "too-large"
    assert sender.err[-1].endswith("1 message(s) to bob refused (line 301: too-large); the other 300 line(s) up "
                                   "to line 301 were accepted; nothing after line 301 was sent")


def test_send_lines_is_paced_by_the_rate_limit_not_refused(chatcli: Chatcli, start_server: StartServer) -> None:
    # 15 lines in flight at once against 10 a second after a burst of 1: the last ack comes ~1.4 s
    # after it was sent, past --timeout 1, but the acks keep coming, so the stream is not given up.
    server = start_server("--rate", "10", "--burst", "1")
    started = time.monotonic()
    sender = chatcli("send", "alice", "bob", "--lines", "--json", "--timeout", "1", "--url", server.ws_url,
                     stdin="".join(f"line {i}\n" for i in range(1, 16)))
    assert sender.wait() == 0, sender.err
    assert [json.loads(line)["status"] for line in sender.out] == ["stored"] * 15
    assert time.monotonic() - started >= 14 / 10 * 0.95
    history = chatcli("history", "bob", "alice", "--json", "--url", server.ws_url)
    assert history.wait() == 0
    assert [json.loads(line)["text"] for line in history.out] == [f"line {i}" for i in range(1, 16)]


def test_who_lists_the_users_online(chatcli: Chatcli, server: RunningServer) -> None:
    carol = legacy(server.ws_url, "carol")
    bob, _ = native(server.ws_url, "bob")
    who = chatcli("who", "alice", "--url", server.ws_url)
    assert who.wait() == 0 and who.out == ["bob", "carol"]  # not alice: asking is not being online
    as_json = chatcli("who", "alice", "--json", "--url", server.ws_url)
    assert as_json.wait() == 0 and as_json.out == ['["bob", "carol"]']
    carol.close()
    bob.close()
    bad = chatcli("who", "not valid!", "--url", server.ws_url)
    assert bad.wait() == 2 and "invalid user id" in bad.err[-1]
