"""Accounts and TLS for end-to-end tests: a user added with ``chatcli user add``, and certificates
signed by a fresh trustme CA, optionally with a server that serves them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.support.processes import RunningServer, StartServer

__all__ = ["Certificate", "TlsServer", "add_user", "issue_certificate", "start_tls_server"]


def add_user(db: Path, name: str) -> str:
    """Add account ``name`` to the store at ``db`` through the real command; return its token."""
    out = subprocess.run([sys.executable, "-m", "chatcli", "user", "add", name, "--db", str(db)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@dataclass(frozen=True)
class Certificate:
    """A server certificate and key, and the CA that signed it, as PEM files (and the CA, to trust it)."""

    ca: trustme.CA
    certfile: Path  # the key's certificate chain
    keyfile: Path
    cafile: Path  # the CA's certificate

    def server_args(self) -> tuple[str, str, str, str]:
        """The ``chatcli serve`` options that serve this certificate."""
        return "--certfile", str(self.certfile), "--keyfile", str(self.keyfile)


def issue_certificate(directory: Path, *hosts: str) -> Certificate:
    """A certificate for ``hosts`` (default: 127.0.0.1 and localhost) from a fresh CA, written to ``directory``."""
    ca = trustme.CA()
    cert = ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")))
    certfile, keyfile, cafile = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    ca.cert_pem.write_to_path(cafile)
    return Certificate(ca, certfile, keyfile, cafile)


@dataclass(frozen=True)
class TlsServer:
    server: RunningServer
    cafile: Path  # the CA that signed the server's certificate

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.server.ws_port}"


def start_tls_server(start_server: StartServer, directory: Path, *hosts: str) -> TlsServer:
    """A server whose certificate (for ``hosts``) is signed by a fresh CA; the CA's PEM is returned."""
    certificate = issue_certificate(directory, *hosts)
    return TlsServer(start_server(*certificate.server_args()), certificate.cafile)
