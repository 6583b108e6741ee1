"""The HTTP side port under abuse: idle and half-sent connections, a connection flood, keep-alive, and the
file-descriptor limit it shares with the WebSocket listener (real servers, raw sockets)."""

from __future__ import annotations

import http.client
import json
import logging
import re
import resource
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from chatcli.server.http_api import MAX_REQUESTS_PER_CONNECTION
from chatcli.server.limitlog import LimitLog
from tests.support.credentials import issue_certificate
from tests.support.processes import RunningServer, StartServer
from tests.support.wsclients import RawClient, legacy

GET_ROOT = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def open_http(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket timeout bounds the wait).

    A reset counts as closed: a server that refuses a connection at once may close it with the
    request unread, which the kernel turns into a reset after the answer.
    """
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off a connection that may stay open: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split(" ")[1]), headers, body


def events(server: RunningServer, name: str) -> list[dict[str, object]]:
    parsed = [json.loads(line) for line in list(server.log) if line.startswith("{")]
    return [event for event in parsed if event.get("event") == name]


# -- timeouts --------------------------------------------------------------------------


def test_idle_connection_gets_408_and_is_closed(start_server: StartServer) -> None:
    server = start_server("--http-timeout", "0.5")
    sock = open_http(server)
    assert read_until_closed(sock).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert server.wait_log('"limit": "http-timeout"')
    assert "sent no complete request within 0.5 s" in events(server, "http-limit")[0]["message"]  # type: ignore[operator]


def test_trickled_request_cannot_outlive_the_read_timeout(start_server: StartServer) -> None:
    """Slowloris: a header byte now and then does not extend the deadline for the whole head."""
    server = start_server("--http-timeout", "1")
    sock = open_http(server)
    sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
    sock.settimeout(0.1)  # the attacker's pace: one more byte whenever the server has said nothing for 0.1 s
    answer = b""
    for _ in range(200):
        try:
            answer = sock.recv(65536)
            break
        except TimeoutError:
            sock.sendall(b"a")
    sock.settimeout(10)
    assert (answer + read_until_closed(sock)).startswith(b"HTTP/1.1 408 ")
    assert server.proc.poll() is None


def test_half_sent_requests_are_closed_and_logged_once_per_interval(start_server: StartServer) -> None:
    server = start_server("--http-timeout", "0.5")
    socks = [open_http(server) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never complete
    for sock in socks:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    assert http_status(server, "/") == 200  # the port still serves
    assert server.wait_log('"event": "http-limit"')  # the log arrives through a reader thread
    assert [e["count"] for e in events(server, "http-limit")] == [1]  # five bites, one line (the rest counted later)


def test_limit_log_counts_the_bites_it_did_not_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limit_log = LimitLog("http-limit", interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="chatcli.server"):
        for at in (0.0, 1.0, 2.0, 9.0, 10.5, 11.0):
            now[0] = at
            limit_log.bit("http-timeout", logging.INFO, "timed out")
        limit_log.bit("http-connections", logging.WARNING, "full")
    assert [(r.limit, r.count) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("http-timeout", 1), ("http-timeout", 4), ("http-connections", 1)]


def test_tls_connection_that_never_handshakes_is_closed(start_server: StartServer, tmp_path: Path) -> None:
    certificate = issue_certificate(tmp_path, "127.0.0.1")
    server = start_server(*certificate.server_args(), "--http-timeout", "0.5")
    assert read_until_closed(open_http(server)) == b""
    assert server.proc.poll() is None


# -- keep-alive ------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(server: RunningServer) -> None:
    client = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    client.request("GET", "/healthz")
    first = client.getresponse()
    assert (first.status, json.loads(first.read())["status"]) == (200, "ok")
    sock = client.sock
    client.request("GET", "/metrics")
    second = client.getresponse()
    assert second.status == 200 and b"chatcli_connections" in second.read()
    assert client.sock is sock  # the same TCP connection: http.client reconnects when told to close
    assert second.getheader("Connection") is None


def test_pipelined_requests_are_answered_in_order(server: RunningServer) -> None:
    sock = open_http(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
                 b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    received = read_until_closed(sock)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200", b"404", b"200"]
    assert received.endswith(b"Connection: close\r\n\r\n")  # HEAD: no body after the last head


def test_a_keep_alive_connection_serves_at_most_100_requests(server: RunningServer) -> None:
    sock = open_http(server)
    sock.sendall(GET_ROOT * MAX_REQUESTS_PER_CONNECTION)  # pipelined; none asks to close, yet the 100th answer does
    received = read_until_closed(sock)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == MAX_REQUESTS_PER_CONNECTION == 100
    assert received.count(b"Connection: close") == 1 and received.endswith(b"running\n")


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
], ids=["connection-close", "http-1.0", "with-body"])
def test_connection_closes_after_the_answer_when_it_should(server: RunningServer, request_bytes: bytes) -> None:
    sock = open_http(server)
    sock.sendall(request_bytes)
    received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in received
    assert received.endswith(b"chatcli server is running\n")


def test_idle_keep_alive_connection_is_closed_quietly(start_server: StartServer) -> None:
    server = start_server("--http-idle-timeout", "0.3")
    sock = open_http(server)
    sock.sendall(GET_ROOT)
    assert read_response(sock)[0] == 200
    assert read_until_closed(sock) == b""  # no 408: the client may have been about to send its next request
    assert not events(server, "http-limit")  # expiry of an idle keep-alive is routine, not logged


@pytest.mark.parametrize(("request_bytes", "status_line"), [
    (b"nonsense\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 505 HTTP Version Not Supported"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi", b"HTTP/1.1 405 Method Not Allowed"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000, b"HTTP/1.1 431 Request Header Fields Too Large"),
], ids=["bad-line", "bad-header", "http2", "post", "too-large"])
def test_bad_requests_get_a_clear_status_and_a_close(server: RunningServer, request_bytes: bytes,
                                                      status_line: bytes) -> None:
    sock = open_http(server)
    sock.sendall(request_bytes)
    received = read_until_closed(sock)
    assert received.startswith(status_line + b"\r\n") and b"\r\nConnection: close\r\n" in received
    assert http_status(server, "/") == 200


# -- the connection cap and file descriptors -----------------------------------------------


def http_status(server: RunningServer, path: str) -> int:
    client = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    client.request("GET", path)
    return client.getresponse().status


def test_cap_answers_503_and_the_websocket_port_still_accepts(start_server: StartServer) -> None:
    server = start_server("--max-http-connections", "2")
    held = [open_http(server) for _ in range(2)]
    for sock in held:  # answered, so the server has counted them; they stay open (keep-alive)
        sock.sendall(GET_ROOT)
        assert read_response(sock)[0] == 200
    refused = open_http(server)
    refused.sendall(GET_ROOT)
    answer = read_until_closed(refused)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"server busy: 2 HTTP connections" in answer
    assert server.wait_log('"limit": "http-connections"')
    legacy(server.ws_url, "alice")  # the WebSocket port is unaffected
    held[0].close()
    assert_eventually_served(server)


def assert_eventually_served(server: RunningServer) -> None:
    """Once a held connection is gone the server has room again (it notices the close asynchronously)."""
    for _ in range(200):
        if http_status(server, "/") == 200:
            return
    raise AssertionError("the HTTP port never served again after a connection closed")


def _fd_limit(soft: int, hard: int) -> Callable[[], None]:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return lower


def test_an_http_flood_under_a_low_fd_limit_leaves_websocket_sessions_room(start_server: StartServer) -> None:
    """The reported failure: idle HTTP connections used up a low fd limit and new WebSocket clients failed."""
    server = start_server("--max-http-connections", "8", "--http-timeout", "60", preexec_fn=_fd_limit(96, 96))
    flood = [open_http(server) for _ in range(100)]  # more than the whole limit; none sends anything
    answers = [read_until_closed(sock) for sock in flood[8:]]
    assert all(answer.startswith(b"HTTP/1.1 503 ") for answer in answers)
    sessions = [legacy(server.ws_url, f"user{i}") for i in range(5)]
    assert len(sessions) == 5 and server.proc.poll() is None


def test_start_up_raises_the_soft_fd_limit_and_reports_the_capacity(start_server: StartServer) -> None:
    server = start_server("--max-connections", "100", "--max-http-connections", "16",
                          preexec_fn=_fd_limit(256, 512))
    assert server.wait_log('"event": "capacity"')
    [capacity] = events(server, "capacity")
    assert (capacity["fd_limit_before"], capacity["fd_limit"], capacity["max_http_connections"]) == (256, 512, 16)
    assert 400 < capacity["ws_capacity"] < 512 - 16  # type: ignore[operator]
    assert "raised from 256" in capacity["message"]  # type: ignore[operator]
    assert not events(server, "capacity-low")


def test_a_low_fd_limit_is_a_warning_at_start_up(start_server: StartServer) -> None:
    server = start_server("--max-connections", "20000", "--max-http-connections", "16",
                          preexec_fn=_fd_limit(256, 256))
    assert server.wait_log('"event": "capacity-low"')
    [capacity] = events(server, "capacity")
    assert capacity["fd_limit"] == 256 and capacity["max_connections_requested"] == 20000
    admitted = capacity["max_connections"]
    assert isinstance(admitted, int) and 100 < admitted < 256 - 16
    [warning] = events(server, "capacity-low")
    assert warning["level"] == "warning"
    assert f"--max-connections 20000 lowered to {admitted}" in warning["message"]  # type: ignore[operator]


def test_connections_past_the_fd_limit_are_told_the_server_is_full(start_server: StartServer) -> None:
    """With the default --max-connections above what the descriptors hold, the connections past the room get
    the 503 that --max-connections promises; they used to be accepted and dropped without an answer."""
    server = start_server("--max-http-connections", "8", preexec_fn=_fd_limit(128, 128))
    assert server.wait_log('"event": "capacity"')
    [capacity] = events(server, "capacity")
    admitted = capacity["max_connections"]
    assert isinstance(admitted, int) and 30 < admitted < 128 - 8
    assert f"admitting at most {admitted} (the default --max-connections 20000 does not fit)" \
        in capacity["message"]  # type: ignore[operator]
    sessions = [legacy(server.ws_url, f"user{i}") for i in range(admitted)]
    refused = [RawClient(server.ws_port, f"/late{i}") for i in range(4)]
    assert [raw.status for raw in refused] == [503] * 4
    assert f"server full: {admitted} connections" in refused[0].response_body()
    sessions[0].close()
    assert_eventually_admitted(server)


def assert_eventually_admitted(server: RunningServer) -> None:
    """Once a session is gone the server has room again (it notices the close asynchronously)."""
    for _ in range(200):
        raw = RawClient(server.ws_port, "/late")
        raw.sock.close()
        if raw.status == 101:
            return
    raise AssertionError("no room came back after a session closed")


def test_a_high_enough_fd_limit_trims_the_default_quietly(start_server: StartServer) -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 11000:
        pytest.skip("needs a hard file-descriptor limit of at least 11,000 (this kind of machine has 20,000)")
    server = start_server(preexec_fn=_fd_limit(11000, 11000))
    assert server.wait_log('"event": "capacity"')
    [capacity] = events(server, "capacity")
    assert capacity["max_connections_requested"] == 20000
    assert 10000 < capacity["max_connections"] < 11000 - 256  # type: ignore[operator]
    assert capacity["level"] == "info" and not events(server, "capacity-low")
