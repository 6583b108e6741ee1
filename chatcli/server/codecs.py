"""Codecs: what the server writes to a session, one class per wire protocol.

A session speaks one protocol for its whole life, so its codec is picked once,
at the handshake (``codec_for``: the negotiated subprotocol), and the rest of the
server asks it for frames instead of branching on the protocol (as uvicorn has
one protocol class per wire implementation):

* ``NativeCodec``: ``chatcli.v1`` JSON frames (hello, ack, message, error).
* ``LegacyCodec``: the seed's frames, which unchanged Flutter apps read:
  ``connected``, ``send:success`` / ``send:error``, and the app's message template.

The codecs are stateless apart from one cache: ``message`` remembers the last
message it encoded, so a message fanned out to many sessions is encoded once
per protocol, however the recipients' protocols interleave. That cache is used
on the event loop only; code on the storage thread calls ``encode_message``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

from chatcli import protocol as p

if TYPE_CHECKING:
    from chatcli.server.relay import Relay, Session
    from chatcli.server.storage import StoredMessage

__all__ = ["CODECS", "DELIVERED", "DUPLICATE", "LEGACY", "NATIVE", "STORED", "Codec", "LegacyCodec", "NativeCodec",
           "Outcome", "codec_for", "message_frame"]


class Outcome(enum.Enum):
    """What became of an accepted send, as its ack tells the sender (a refusal is ``Codec.refusal``)."""

    DELIVERED = enum.auto()  # handed to at least one open session of the recipient
    STORED = enum.auto()  # kept for a recipient with no open session
    DUPLICATE = enum.auto()  # a retried client id: stored before, acknowledged again with the original id


# The per-message paths name the outcomes through these module globals: Python 3.11 resolves
# ``Outcome.DELIVERED`` through a descriptor, 72 ns against 6 ns for a global (measured with timeit),
# and an ack names one or two of them.
DELIVERED: Final = Outcome.DELIVERED
STORED: Final = Outcome.STORED
DUPLICATE: Final = Outcome.DUPLICATE


def message_frame(stored: StoredMessage) -> p.Message:
    """The chatcli.v1 frame of a stored message; raises ChatcliError for a row that breaks the protocol
    (e.g. an invalid sender stored by an older, exploitable server)."""
    return p.Message(stored.id, stored.sender, stored.recipient, stored.text, p.format_ts(stored.ts))


class Codec(abc.ABC):
    """How one wire protocol says each thing the server tells a session."""

    __slots__ = ("_last_frame", "_last_message")

    #: The protocol's name in logs and metrics.
    name: ClassVar[str]
    #: The protocol has no ``received`` frame: a message counts as received once its bytes reach the kernel.
    confirms_on_write: ClassVar[bool]

    def __init__(self) -> None:
        self._last_message: StoredMessage | None = None
        self._last_frame = ""

    @abc.abstractmethod
    def greeting(self, hello: p.Hello) -> str:
        """The first frame of a session."""

    @abc.abstractmethod
    def ack(self, client_id: str | None, message: StoredMessage, outcome: Outcome) -> str:
        """The answer to a send that was accepted as ``message``."""

    @abc.abstractmethod
    def refusal(self, client_id: str | None, reason: str) -> str:
        """The answer to a send that was refused; ``reason`` is a ``p.Reason``."""

    @abc.abstractmethod
    def error(self, code: str, text: str, details: Mapping[str, Any] | None = None) -> str:
        """A frame that could not be acted on; ``code`` is a ``p.ErrorCode``. The session stays open."""

    @abc.abstractmethod
    def encode_message(self, message: StoredMessage) -> str:
        """The frame delivering ``message``; safe on any thread. Raises ChatcliError for a row that breaks
        the protocol."""

    def message(self, message: StoredMessage) -> str:
        """``encode_message``, encoded once however many sessions it goes to (event loop only)."""
        if message is not self._last_message:
            self._last_frame = self.encode_message(message)  # first: a row that cannot be encoded stays uncached
            self._last_message = message
        return self._last_frame

    @abc.abstractmethod
    def dispatch(self, relay: Relay, session: Session, text: str) -> None:
        """Hand a text frame the session sent to the relay's reader for this protocol."""


class NativeCodec(Codec):
    """``chatcli.v1``: JSON frames (docs/protocol.md)."""

    __slots__ = ()
    name = p.SUBPROTOCOL
    confirms_on_write = False

    def greeting(self, hello: p.Hello) -> str:
        return p.encode(hello)

    def ack(self, client_id: str | None, message: StoredMessage, outcome: Outcome) -> str:
        status = p.Status.DELIVERED if outcome is DELIVERED else p.Status.STORED
        return p.encode(p.Ack(client_id or "", status, msg_id=message.id, ts=p.format_ts(message.ts),
                              duplicate=outcome is DUPLICATE))

    def refusal(self, client_id: str | None, reason: str) -> str:
        return p.encode(p.Ack(client_id or "", p.Status.REFUSED, reason=reason))

    def error(self, code: str, text: str, details: Mapping[str, Any] | None = None) -> str:
        return p.encode(p.Error(code, text, details or {}))

    def encode_message(self, message: StoredMessage) -> str:
        return p.encode(message_frame(message))

    def dispatch(self, relay: Relay, session: Session, text: str) -> None:
        relay.on_native_text(session, text)


class LegacyCodec(Codec):
    """The seed's frames, byte for byte what the old Node server sent: its apps have only these.

    They carry no ids, reasons or error details: every accepted send is ``send:success``, every
    refusal and error ``send:error``.
    """

    __slots__ = ()
    name = "legacy"
    confirms_on_write = True

    def greeting(self, hello: p.Hello) -> str:
        return p.LEGACY_CONNECTED

    def ack(self, client_id: str | None, message: StoredMessage, outcome: Outcome) -> str:
        return p.LEGACY_SEND_SUCCESS

    def refusal(self, client_id: str | None, reason: str) -> str:
        return p.LEGACY_SEND_ERROR

    def error(self, code: str, text: str, details: Mapping[str, Any] | None = None) -> str:
        return p.LEGACY_SEND_ERROR

    def encode_message(self, message: StoredMessage) -> str:
        return p.encode_legacy_message(message.sender, message.text)

    def dispatch(self, relay: Relay, session: Session, text: str) -> None:
        relay.on_legacy_text(session, text)


NATIVE: Final = NativeCodec()
LEGACY: Final = LegacyCodec()
#: Every codec, e.g. for a metric that lists each protocol even before its first session.
CODECS: Final[tuple[Codec, ...]] = (NATIVE, LEGACY)


def codec_for(subprotocol: str | None) -> Codec:
    """The codec of a session that negotiated ``subprotocol``: none offered is a seed client."""
    return LEGACY if subprotocol is None else NATIVE
