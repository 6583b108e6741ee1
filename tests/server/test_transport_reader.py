"""The relay's own frame reader (``RelayServerProtocol.receive_frames``) against websockets' parser.

The reader unmasks whole data frames itself and hands every other frame to websockets. Whatever the
stream and however it is cut into reads, a server must see the same frames, answer the same bytes
(pongs, close frames) and end in the same state as with websockets' parser alone.
"""

from __future__ import annotations

import itertools
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.server import ServerProtocol

from chatcli.server.transport import RelayServerProtocol
from tests.support.wsclients import request_head

MAX_SIZE = 300  # small, so that generated frames cross it


def raw_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
              wide: bool = False) -> bytes:
    """One client frame, well-formed or not: any opcode, reserved bits, no mask, a needlessly wide length."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    n, mask_bit = len(payload), 0x80 if masked else 0
    if n < 126 and not wide:
        head += bytes([mask_bit | n])
    elif n < 65536 and not (wide and n >= 126):
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def opened(protocol: ServerProtocol) -> ServerProtocol:
    """``protocol`` after accepting a handshake, with the response taken off its output."""
    protocol.receive_data(request_head("/alice"))
    [request] = protocol.events_received()
    assert isinstance(request, Request)
    protocol.send_response(protocol.accept(request))
    protocol.data_to_send()
    return protocol


def observed(protocol: ServerProtocol, reads: list[bytes], eof: bool) -> tuple[object, ...]:
    """Everything a server could notice: frames, bytes to answer, state, close frames, parser errors."""
    frames: list[Frame] = []
    for data in reads:
        if isinstance(protocol, RelayServerProtocol):
            frames.extend(protocol.receive_frames(data))
        else:
            protocol.receive_data(data)
            frames.extend(protocol.events_received())  # type: ignore[arg-type]
    if eof:
        protocol.receive_eof()
    seen = tuple((f.opcode, bytes(f.data), f.fin, f.rsv1, f.rsv2, f.rsv3) for f in frames)
    return (seen, protocol.data_to_send(), protocol.state, protocol.close_rcvd, protocol.close_sent,
            type(protocol.parser_exc).__name__, str(protocol.parser_exc or ""))


payloads = st.binary(max_size=MAX_SIZE + 40) | st.sampled_from([b"", b"x" * 125, b"x" * 126, b"x" * 200])
frames = st.one_of(
    st.builds(raw_frame, st.sampled_from([1, 2]), payloads),  # the common case, read by chatcli itself
    st.builds(raw_frame, st.sampled_from([0, 1, 2]), payloads, fin=st.booleans()),  # fragments
    st.builds(raw_frame, st.sampled_from([9, 10]), st.binary(max_size=130)),  # pings, pongs, too long ones
    st.builds(raw_frame, st.just(8), st.sampled_from([b"", b"\x03\xe8", b"\x03\xe8bye", b"\x00"])),  # close
    st.builds(raw_frame, st.integers(0, 15), st.binary(max_size=20), fin=st.booleans(), rsv=st.integers(0, 7),
              masked=st.booleans(), wide=st.booleans()),  # anything at all
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(frames, max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=8), eof=st.booleans())
def test_any_stream_cut_anywhere_reads_as_websockets_reads_it(stream: list[bytes], cuts: list[int],
                                                              eof: bool) -> None:
    data = b"".join(stream)
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    reads = [data[a:b] for a, b in itertools.pairwise(points)]
    ours = observed(opened(RelayServerProtocol(max_size=MAX_SIZE)), reads, eof)
    theirs = observed(opened(ServerProtocol(max_size=MAX_SIZE)), reads, eof)
    assert ours == theirs


def test_a_frame_arriving_a_byte_at_a_time_is_read_once_whole() -> None:
    frame = raw_frame(1, b"hello " * 40)  # a 16-bit length: the header itself arrives in pieces
    protocol = opened(RelayServerProtocol(max_size=MAX_SIZE))
    got = [protocol.receive_frames(frame[i:i + 1]) for i in range(len(frame))]
    assert got[:-1] == [[]] * (len(frame) - 1)
    assert [bytes(f.data) for f in got[-1]] == [b"hello " * 40]
    assert protocol.partial is None


def test_an_oversize_header_fails_at_once_without_waiting_for_its_payload() -> None:
    protocol = opened(RelayServerProtocol(max_size=MAX_SIZE))
    header = raw_frame(1, b"x" * (MAX_SIZE + 1))[:8]
    assert protocol.receive_frames(header) == []
    assert protocol.partial is None  # nothing held for a frame that can never be accepted
    assert protocol.close_sent is not None and protocol.close_sent.code == 1009


def test_a_continuation_past_the_message_limit_fails_at_once_like_websockets() -> None:
    first = raw_frame(1, b"x" * 200, fin=False)  # 200 of the message's MAX_SIZE bytes
    header = raw_frame(0, b"y" * 200)[:8]  # a continuation of 200 more: over the limit, payload not sent
    ours, theirs = opened(RelayServerProtocol(max_size=MAX_SIZE)), opened(ServerProtocol(max_size=MAX_SIZE))
    assert observed(ours, [first, header], eof=False) == observed(theirs, [first, header], eof=False)
    assert ours.close_sent is not None and ours.close_sent.code == 1009
