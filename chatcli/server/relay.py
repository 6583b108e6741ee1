"""Routing: who is connected, and what happens to each frame a session sends.

Transport-free: sessions are anything with ``user``, ``legacy`` and
``send_text()``; the transport turns WebSocket frames into calls of
``on_legacy_text`` / ``on_native_text`` and writes what sessions are given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from chatcli import protocol as p
from chatcli.errors import RemoteProtocolError
from chatcli.server.config import ServerConfig
from chatcli.server.metrics import Metrics


class Session(Protocol):
    """What routing needs of a connected session."""

    user: str
    legacy: bool

    def send_text(self, text: str) -> None: ...


class Relay:
    """The registry of open sessions and the routing of sends between them."""

    def __init__(self, config: ServerConfig, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        # user -> that user's open sessions; a user may be connected several times.
        self.sessions: dict[str, list[Session]] = {}
        self.last_msg_id = 0

    # -- registry -----------------------------------------------------------

    def register(self, session: Session) -> None:
        self.sessions.setdefault(session.user, []).append(session)

    def unregister(self, session: Session) -> None:
        """Remove exactly this session; the user's other sessions stay reachable."""
        mine = self.sessions.get(session.user)
        if mine is None:
            return
        try:
            mine.remove(session)
        except ValueError:
            return
        if not mine:
            del self.sessions[session.user]

    def online_users(self) -> list[str]:
        return sorted(self.sessions)

    @property
    def session_count(self) -> int:
        return sum(len(s) for s in self.sessions.values())

    # -- legacy (seed Flutter) sessions ---------------------------------------

    def on_legacy_text(self, session: Session, text: str) -> None:
        """Handle one frame from a seed client; every outcome gets the ack the app understands."""
        try:
            command = p.parse_legacy_frame(text)
        except RemoteProtocolError:
            self.metrics.error("bad-frame")
            session.send_text(p.LEGACY_SEND_ERROR)
            return
        if command.cmd != "send":
            self.metrics.error("unknown-cmd")
            session.send_text(p.legacy_error(command.cmd))
            return
        if command.auth != self.config.auth_key:
            self.metrics.refused(p.Reason.BAD_AUTH)
            session.send_text(p.LEGACY_SEND_ERROR)
            return
        if command.userid is None or command.msgtext is None:
            self.metrics.error("bad-frame")
            session.send_text(p.LEGACY_SEND_ERROR)
            return
        status, _ = self.route(session.user, command.userid, command.msgtext)
        session.send_text(p.LEGACY_SEND_ERROR if status is not None else p.LEGACY_SEND_SUCCESS)

    # -- native (chatcli.v1) sessions -----------------------------------------

    def on_native_text(self, session: Session, text: str) -> None:
        try:
            frame = p.parse_client_frame(text)
        except RemoteProtocolError as exc:
            self.metrics.error(exc.code)
            session.send_text(p.encode(p.Error(exc.code, exc.message)))
            return
        reason, msg_id = self.route(session.user, frame.to, frame.text)
        if reason is not None:
            ack = p.Ack(frame.id, p.Status.REFUSED, reason=reason)
        else:
            ack = p.Ack(frame.id, p.Status.DELIVERED, msg_id=msg_id, ts=p.format_ts(self.clock()))
        session.send_text(p.encode(ack))

    def on_binary(self, session: Session) -> None:
        self.metrics.error(p.ErrorCode.BINARY_UNSUPPORTED)
        if session.legacy:
            session.send_text(p.LEGACY_SEND_ERROR)
        else:
            session.send_text(p.encode(p.Error(p.ErrorCode.BINARY_UNSUPPORTED,
                                               "binary frames are not supported: send JSON text frames")))

    # -- routing ----------------------------------------------------------------

    def route(self, sender: str, to: str, text: str) -> tuple[str | None, int]:
        """Deliver ``text`` to every open session of ``to``.

        Returns ``(refusal reason, 0)`` or ``(None, message id)``.
        """
        reason = p.check_text(text, self.config.max_text_bytes)
        if reason is None:
            recipients = self.sessions.get(to)
            if recipients is None:
                # The seam for store-and-forward: a durable server stores the message here.
                reason = p.Reason.BAD_RECIPIENT if not p.is_valid_user_id(to) else p.Reason.OFFLINE
        if reason is not None:
            self.metrics.refused(reason)
            return reason, 0
        self.last_msg_id += 1
        self._deliver(self.last_msg_id, sender, to, text, recipients)  # type: ignore[arg-type]
        self.metrics.routed += 1
        return None, self.last_msg_id

    def _deliver(self, msg_id: int, sender: str, to: str, text: str, recipients: list[Session]) -> None:
        legacy_frame = native_frame = None
        for recipient in recipients:
            if recipient.legacy:
                if legacy_frame is None:
                    legacy_frame = p.encode_legacy_message(sender, text)
                recipient.send_text(legacy_frame)
            else:
                if native_frame is None:
                    message = p.Message(msg_id, sender, to, text, p.format_ts(self.clock()))
                    native_frame = p.encode(message)
                recipient.send_text(native_frame)
