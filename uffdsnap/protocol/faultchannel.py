"""The fault channel's fixed encoding (docs/protocol.md, "The fault channel"): the protocol's own
`fault` and `unprotect` messages, in the one exact byte layout that native code on both ends
writes and accepts (every integer a uint64, 0xcf; keys in this order; nothing else). Ordinary
msgpack, so the codec in _codec decodes these frames too; this module is the reference for the
layout, and GOLDEN holds frames that the Python tests and the native core's tests both check.
"""

from __future__ import annotations

import struct

from uffdsnap.protocol._codec import HEADER, RemoteProtocolError
from uffdsnap.protocol._messages import Fault, Unprotect

_U64 = struct.Struct(">Q")


def _text(s: str) -> bytes:
    return bytes([0xA0 | len(s)]) + s.encode()


def _u64(v: int) -> bytes:
    return b"\xcf" + _U64.pack(v)


def encode_fault(msg: Fault) -> bytes:
    """agent → coordinator: one write fault."""
    body = (b"\x84" + _text("t") + _text("fault") + _text("offset") + _u64(msg.offset)
            + _text("tid") + _u64(msg.tid) + _text("seen_ns") + _u64(msg.seen_ns))
    return HEADER.pack(len(body)) + body


def encode_unprotect(offset: int, length: int) -> bytes:
    """coordinator → agent: one saved range to un-protect (a channel frame holds one range)."""
    body = (b"\x82" + _text("t") + _text("unprotect") + _text("ranges") + b"\x91\x92"
            + _u64(offset) + _u64(length))
    return HEADER.pack(len(body)) + body


def _value_offsets(template: bytes) -> list[int]:
    """Where a template frame's uint64 values start (each follows its 0xcf marker)."""
    return [i + 1 for i, byte in enumerate(template) if byte == 0xCF]


_FAULT_TEMPLATE = encode_fault(Fault(0, 0, 0))
_UNPROTECT_TEMPLATE = encode_unprotect(0, 0)
_FAULT_VALUES = _value_offsets(_FAULT_TEMPLATE)
_UNPROTECT_VALUES = _value_offsets(_UNPROTECT_TEMPLATE)
FAULT_FRAME_BYTES = len(_FAULT_TEMPLATE)
UNPROTECT_FRAME_BYTES = len(_UNPROTECT_TEMPLATE)


def decode_frame(frame: bytes) -> Fault | Unprotect:
    """A frame in exactly the fixed encoding, as its message; RemoteProtocolError otherwise (a
    valid msgpack message in another shape is refused, as the native core refuses it)."""
    if len(frame) == FAULT_FRAME_BYTES and frame[4:].startswith(b"\x84"):
        got = Fault(*(_U64.unpack_from(frame, at)[0] for at in _FAULT_VALUES))
        if encode_fault(got) == frame:
            return got
    elif len(frame) == UNPROTECT_FRAME_BYTES and frame[4:].startswith(b"\x82"):
        offset, length = (_U64.unpack_from(frame, at)[0] for at in _UNPROTECT_VALUES)
        if encode_unprotect(offset, length) == frame:
            return Unprotect(((offset, length),))
    raise RemoteProtocolError("fault channel: a frame not in the fixed encoding")


# Frames whose exact bytes both ends must produce and accept (tests/test_protocol.py checks the
# Python side, tests/test_snapcore.py feeds them to the native core and reads its own back).
GOLDEN: dict[str, tuple[Fault | Unprotect, bytes]] = {
    "fault": (Fault(0x3000, 4242, 123456789), bytes.fromhex(
        "00000037" "84" "a174" "a56661756c74" "a66f6666736574" "cf0000000000003000"
        "a3746964" "cf0000000000001092" "a77365656e5f6e73" "cf00000000075bcd15")),
    "unprotect": (Unprotect(((0x3000, 0x1000),)), bytes.fromhex(
        "00000028" "82" "a174" "a9756e70726f74656374" "a672616e676573" "9192"
        "cf0000000000003000" "cf0000000000001000")),
}
