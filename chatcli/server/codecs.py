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
    from chatcli.server.engine.base import StoredMessage
    from chatcli.server.relay import Relay, Session

__all__ = ["CODECS", "LEGACY", "NATIVE", "Codec", "LegacyCodec", "NativeCodec", "Outcome", "codec_for"]


class Outcome(enum.Enum):
    """What became of an accepted message once its batch was committed; ``status`` is what its ack says.

    ``OFFLINE`` is answered as a refusal (``Codec.refusal``: a reason, no message); the others by ``Codec.ack``.
    """

    DELIVERED = (1, p.Status.DELIVERED)  # handed to at least one open session of the recipient here
    STORED = (2, p.Status.STORED)  # kept for a recipient with no open session here
    DUPLICATE = (3, p.Status.STORED)  # a retried client id: nothing new stored, the original's id acknowledged
    OFFLINE = (4, p.Status.REFUSED)  # refused: nobody would keep it (the engine stores nothing), nobody online

    def __init__(self, _order: int, status: str) -> None:
        #: A plain attribute: read once per message on the ack path (an enum-keyed dict would hash in Python).
        self.status = status


class Codec(abc.ABC):
    """How one wire protocol says each thing the server tells a session."""

    __slots__ = ("_last_frame", "_last_message")

    #: The protocol's name in logs and metrics.
    name: ClassVar[str]
    #: The protocol has no ``received`` frame: a message counts as received once its bytes reach the kernel.
    confirms_on_write: ClassVar[bool]
    #: The session may be sent read positions, receipts and typing (native frames; legacy ones have no room).
    takes_chat_events: ClassVar[bool]

    def __init__(self) -> None:
        self._last_message: StoredMessage | None = None
        self._last_frame = ""

    @abc.abstractmethod
    def greeting(self, hello: p.Hello) -> str:
        """The first frame of a session."""

    @abc.abstractmethod
    def ack(self, client_id: str | None, message: StoredMessage, outcome: Outcome) -> str:
        """The answer to a send that was accepted as ``message`` (any outcome but ``OFFLINE``)."""

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
    takes_chat_events = True

    def greeting(self, hello: p.Hello) -> str:
        return p.encode(hello)

    def ack(self, client_id: str | None, message: StoredMessage, outcome: Outcome) -> str:
        # A template, not an Ack dataclass through json.dumps: the same bytes at a third of the cost.
        return p.encode_ack(client_id or "", outcome.status, message.id, p.format_ts(message.ts),
                            outcome is Outcome.DUPLICATE)

    def refusal(self, client_id: str | None, reason: str) -> str:
        return p.encode(p.Ack(client_id or "", p.Status.REFUSED, reason=reason))

    def error(self, code: str, text: str, details: Mapping[str, Any] | None = None) -> str:
        return p.encode(p.Error(code, text, details or {}))

    def encode_message(self, message: StoredMessage) -> str:
        # A template, same checks and bytes as encode(message_frame(message)): every delivery and replay
        # row passes here.
        return p.encode_message(message.id, message.sender, message.recipient, message.text,
                                p.format_ts(message.ts), message.reply_to)

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
    takes_chat_events = False

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
