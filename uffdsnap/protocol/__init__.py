"""The wire protocol between coordinator, agents and clients, as a pure state machine (h11's shape).

Messages are small frozen dataclasses. A `Connection` turns bytes into validated messages and
messages into bytes, and enforces which message may come when; it never touches a socket. Framing:
a 4-byte big-endian length, then one msgpack map {"t": type, ...fields}. Protocol errors are two
exceptions: LocalProtocolError (we tried to send something illegal) and RemoteProtocolError (the
peer did). docs/protocol.md describes every message.
"""

from uffdsnap.errors import ProtocolError as ProtocolError
from uffdsnap.protocol._codec import (
    LocalProtocolError,
    ObjectGeometry,
    RemoteProtocolError,
    check_geometry,
    decode,
    encode,
)
from uffdsnap.protocol._connection import TRANSITIONS, Connection, State
from uffdsnap.protocol._messages import (
    MAX_HISTOGRAM_BUCKETS,
    MAX_MAPS,
    MAX_MESSAGE_BYTES,
    MAX_RANGES,
    MAX_TEXT,
    MAX_TEXTS,
    MESSAGES,
    PROTOCOL_VERSION,
    Abort,
    Delegate,
    Event,
    Fault,
    FaultChannel,
    Gone,
    Hello,
    Message,
    Protect,
    Protected,
    Release,
    Released,
    Removed,
    Result,
    Role,
    Snap,
    Tracked,
    Unprotect,
    Welcome,
    Written,
)

__all__ = [
    "MAX_HISTOGRAM_BUCKETS", "MAX_MAPS", "MAX_MESSAGE_BYTES", "MAX_RANGES", "MAX_TEXT",
    "MAX_TEXTS", "MESSAGES", "PROTOCOL_VERSION", "TRANSITIONS", "Abort", "Connection", "Delegate",
    "Event", "Fault", "FaultChannel", "Gone", "Hello", "LocalProtocolError", "Message",
    "ObjectGeometry", "Protect", "Protected", "ProtocolError", "Release", "Released", "Removed",
    "RemoteProtocolError", "Result", "Role", "Snap", "State", "Tracked", "Unprotect", "Welcome",
    "Written",
    "check_geometry", "decode", "encode",
]
