"""Reaching a server, shared by both client transports: the asyncio session (``session``) and the
blocking one-shot send (``oneshot``).

A user's URL, the TLS settings, client ids, and the wording of every failure to connect or
of a refused message, so that a command reads the same whichever transport ran it. Imports
neither asyncio nor websockets: ``chatcli send`` must stay quick to start.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from chatcli.client.settings import ClientSettings
from chatcli.errors import AuthError, CertificateError, ConnectError, RefusedError, UsageError
from chatcli.protocol import Reason, check_user_id

if TYPE_CHECKING:
    import ssl  # imported where used: ~10 ms that a ws:// one-shot send does without

    from chatcli.protocol import Ack

__all__ = ["close_detail", "describe", "lost_connection", "new_client_id", "proxy_in_environment", "refusal",
           "refusal_text", "refused_handshake", "tls_context", "tls_failure", "user_url"]

_ids: Final = itertools.count(1)
#: Servers that store messages treat a repeated (sender, id) as a retry of the same message,
#: so ids must differ between runs: a random tag per process, then a counter.
_tag: Final = os.urandom(6).hex()


def new_client_id() -> str:
    """A client id for a ``send``: unique per run, and kept when a message is resent after a reconnect."""
    return f"{_tag}-{next(_ids)}"


def proxy_in_environment() -> bool:
    """Whether a ``*_proxy`` variable is set (``https_proxy``, ``ALL_PROXY``...): websockets' client goes
    through it (or not, per ``no_proxy``), the one-shot blocking socket does not know how, so the
    one-shot commands leave such sessions to websockets."""
    return any(value and name.lower().endswith("_proxy") and name.lower() != "no_proxy"
               for name, value in os.environ.items())


def user_url(server_url: str, user: str) -> str:
    """``ws://host:port/<user>``, with the id percent-encoded."""
    return server_url.rstrip("/") + "/" + quote(check_user_id(user), safe="")


@functools.cache
def tls_context(cafile: Path | None, insecure: bool) -> ssl.SSLContext:
    """The TLS settings of wss:// sessions: the system's CAs (``SSL_CERT_FILE`` honoured), ``cafile``'s,
    or no verification at all when ``insecure``."""
    import ssl

    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    except FileNotFoundError:
        raise UsageError(f"cannot read the CA file {str(cafile)!r}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the CA file {str(cafile)!r}: {describe(exc)} "
                         "(expected PEM certificates)") from None


def tls_failure(url: str, exc: ssl.SSLError) -> ConnectError:
    """A failed TLS handshake: an untrusted certificate (``CertificateError``), or no TLS at all there."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        cause = exc.verify_message or exc.reason or str(exc)
        return CertificateError(f"cannot connect to {url}: the server's TLS certificate is not trusted ({cause}); "
                                "if the server uses its own CA, pass --cafile CA.pem (or set SSL_CERT_FILE)")
    return ConnectError(f"cannot connect to {url}: TLS handshake failed ({exc.reason or exc}); "
                        "is the server serving TLS? (a server started without --certfile needs ws://)")


def refused_handshake(settings: ClientSettings, status: int, body: bytes | bytearray | None) -> Exception:
    """The error for a handshake the server answered with ``status`` instead of 101."""
    url = settings.url
    detail = bytes(body or b"").decode("utf-8", "replace").strip()[:200]
    if status in (401, 403):
        if settings.token is not None:
            hint = "check the token (--token-file, CHATCLI_TOKEN, or the profile's token / token_file)"
        else:
            hint = ("a server with accounts needs your token (--token-file or CHATCLI_TOKEN; "
                    "`chatcli user add` on the server makes one); otherwise check --auth-key, "
                    "--auth-key-file or CHATCLI_AUTH_KEY")
        return AuthError(f"authentication refused by {url} (HTTP {status}"
                         f"{': ' + detail if detail else ''}): {hint}")
    if status == 400:
        return UsageError(f"the server refused the user id (HTTP 400){': ' + detail if detail else ''}")
    return ConnectError(f"cannot connect to {url}: HTTP {status}{': ' + detail if detail else ''}")


def describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(exc, ConnectionResetError):
        return "the server reset the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def close_detail(code: int | None, reason: str | None) -> str:
    if code is None:
        return ""
    return f" (close code {code}{': ' + reason if reason else ''})"


def lost_connection(code: int | None = None, reason: str | None = None) -> ConnectError:
    return ConnectError(f"lost the connection to the server{close_detail(code, reason)}")


def refusal_text(to: str, reason: str, max_bytes: int | None = None) -> str:
    if reason == Reason.TOO_LARGE and max_bytes is not None:
        return f"message to {to} refused: too-large (the server accepts at most {max_bytes} bytes)"
    if reason == Reason.OFFLINE:
        return f"message to {to} refused: offline ({to} is not connected and this server stores nothing)"
    if reason == Reason.BAD_REPLY:
        return (f"message to {to} refused: bad-reply (the message replied to is not in your conversation "
                f"with {to}, or is no longer stored)")
    return f"message to {to} refused: {reason}"


def refusal(ack: Ack, to: str) -> RefusedError:
    """The error for a refused ack, with its reason."""
    reason = ack.reason or "refused"
    return RefusedError(refusal_text(to, reason), reason)
