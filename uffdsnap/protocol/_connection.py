"""One end of a coordinator ⇄ peer connection as a pure state machine (h11's shape): bytes in,
validated messages out, and the reverse; which message may come when is the TRANSITIONS table.
It never touches a socket (uffdsnap.channel does the I/O)."""

from __future__ import annotations

import enum

from uffdsnap.errors import ProtocolError
from uffdsnap.protocol._codec import (
    HEADER,
    LocalProtocolError,
    ObjectGeometry,
    RemoteProtocolError,
    check_geometry,
    decode,
    encode,
)
from uffdsnap.protocol._messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Hello,
    Message,
    Role,
    Welcome,
)


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"  # coordinator side, before Hello
    AWAIT_WELCOME = "await_welcome"  # agent/client side, Hello sent
    IDLE = "idle"  # joined, no snapshot
    PROTECTING = "protecting"  # Protect sent, Protected not yet back
    ACTIVE = "active"  # protected; faults and un-protects flow
    RELEASING = "releasing"  # Release sent, Released not yet back
    REQUESTED = "requested"  # client: Snap sent, Result not yet back
    CLOSED = "closed"


# (sender role, message type, state before) -> state after. Anything else is a protocol error.
# Roles on a connection: the coordinator and one peer (an agent or a client).
_C, _A, _L = Role.COORDINATOR, Role.AGENT, Role.CLIENT
_S = State
TRANSITIONS: dict[tuple[Role, str, State], State] = {
    (_A, "hello", _S.AWAIT_HELLO): _S.AWAIT_WELCOME,
    (_L, "hello", _S.AWAIT_HELLO): _S.AWAIT_WELCOME,
    (_C, "welcome", _S.AWAIT_WELCOME): _S.IDLE,
    (_C, "protect", _S.IDLE): _S.PROTECTING,
    (_A, "protected", _S.PROTECTING): _S.ACTIVE,
    (_A, "fault", _S.PROTECTING): _S.PROTECTING,
    (_A, "fault", _S.ACTIVE): _S.ACTIVE,
    (_A, "fault", _S.RELEASING): _S.RELEASING,
    (_A, "delegate", _S.PROTECTING): _S.PROTECTING,
    (_A, "faults", _S.PROTECTING): _S.PROTECTING,
    (_C, "event", _S.PROTECTING): _S.PROTECTING,
    (_C, "event", _S.ACTIVE): _S.ACTIVE,
    (_C, "event", _S.RELEASING): _S.RELEASING,
    (_A, "removed", _S.PROTECTING): _S.PROTECTING,
    (_A, "removed", _S.ACTIVE): _S.ACTIVE,
    (_A, "removed", _S.RELEASING): _S.RELEASING,
    # write tracking (after `release` with keep): faults and removals between snapshots
    (_A, "removed", _S.IDLE): _S.IDLE,
    (_A, "written", _S.IDLE): _S.IDLE,
    (_A, "written", _S.PROTECTING): _S.PROTECTING,
    (_A, "written", _S.RELEASING): _S.RELEASING,
    (_C, "unprotect", _S.ACTIVE): _S.ACTIVE,
    (_C, "unprotect", _S.RELEASING): _S.RELEASING,
    # Crossings: an unprotect or event the coordinator sent before it saw `released`, and a
    # fault the agent read just after, arrive in IDLE; they are stale and harmless there
    # (release already un-protected and woke everything).
    (_C, "unprotect", _S.IDLE): _S.IDLE,
    (_C, "event", _S.IDLE): _S.IDLE,
    (_A, "fault", _S.IDLE): _S.IDLE,
    (_C, "release", _S.PROTECTING): _S.RELEASING,
    (_C, "release", _S.ACTIVE): _S.RELEASING,
    (_A, "released", _S.RELEASING): _S.IDLE,
    (_L, "snap", _S.IDLE): _S.REQUESTED,
    (_C, "result", _S.REQUESTED): _S.IDLE,
}
for _state in (_S.AWAIT_HELLO, _S.AWAIT_WELCOME, _S.IDLE, _S.PROTECTING, _S.ACTIVE,
               _S.RELEASING, _S.REQUESTED):
    for _role in Role:
        TRANSITIONS[(_role, "abort", _state)] = _S.CLOSED
    TRANSITIONS[(_A, "gone", _state)] = _S.CLOSED
for _state in (_S.IDLE, _S.PROTECTING, _S.ACTIVE, _S.RELEASING):
    TRANSITIONS[(_A, "tracked", _state)] = _state


class Connection:
    """One end of a coordinator⇄peer connection: bytes in, messages out, and the reverse.

    `our_role` is the role of this end; the peer is the coordinator if we are an agent/client,
    otherwise an agent or a client (decided by its Hello).
    """

    def __init__(self, our_role: Role):
        self.our_role = our_role
        self.peer_role: Role | None = Role.COORDINATOR if our_role != Role.COORDINATOR else None
        self.state = State.AWAIT_HELLO  # both ends: AWAIT_WELCOME once the Hello has passed
        self.geometry: ObjectGeometry | None = None
        self._buffer = bytearray()
        self._closed_by_us = False  # we sent abort/gone: what the peer had in flight is moot

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet make a whole message (the start of the next one)."""
        return len(self._buffer)

    # -- sending --
    def send(self, msg: Message) -> bytes:
        """Bytes to write for `msg`; raises LocalProtocolError if it is not legal now."""
        if self.state == State.CLOSED:
            raise LocalProtocolError(f"cannot send {msg.TYPE}: connection closed")
        role = self.our_role
        if isinstance(msg, Hello):
            if role == Role.COORDINATOR or msg.role != role.value:
                raise LocalProtocolError("hello must carry our own agent/client role")
        nxt = self._next(role, msg, LocalProtocolError)
        geometry = (ObjectGeometry(msg.size, msg.page_size) if isinstance(msg, Welcome)
                    else self.geometry)
        try:
            check_geometry(msg, geometry)
        except RemoteProtocolError as e:
            raise LocalProtocolError(str(e)) from None
        data = encode(msg)
        # (only now: a message we could not send leaves the state as it was, so that a
        # correct one can still follow, e.g. a shorter `result`)
        self.state, self.geometry = nxt, geometry
        return data

    # -- receiving --
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket."""
        self._buffer += data
        if len(self._buffer) > MAX_MESSAGE_BYTES + HEADER.size + (64 << 10) * 16:
            raise RemoteProtocolError("peer sent more than it lets us read")

    def next_message(self) -> Message | None:
        """The next complete, validated message, or None if more bytes are needed."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > MAX_MESSAGE_BYTES:
            raise RemoteProtocolError(
                f"message of {length} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
        if len(self._buffer) < HEADER.size + length:
            return None
        payload = bytes(self._buffer[HEADER.size:HEADER.size + length])
        del self._buffer[:HEADER.size + length]
        msg = decode(payload)
        if isinstance(msg, Hello):
            if msg.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"peer speaks protocol version {msg.version}, we speak {PROTOCOL_VERSION}")
            if self.our_role != Role.COORDINATOR:
                raise RemoteProtocolError("only the coordinator receives hello")
            try:
                self.peer_role = Role(msg.role)
            except ValueError:
                raise RemoteProtocolError(f"unknown role {msg.role!r:.40}") from None
            if self.peer_role == Role.COORDINATOR:
                raise RemoteProtocolError("a coordinator cannot join a coordinator")
        if isinstance(msg, Welcome) and msg.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"coordinator speaks protocol version {msg.version}, we speak {PROTOCOL_VERSION}")
        if self.peer_role is None:
            raise RemoteProtocolError(f"expected hello, got {msg.TYPE}")
        self.state = self._next(self.peer_role, msg, RemoteProtocolError)
        if isinstance(msg, Welcome):
            ps = msg.page_size
            if ps == 0 or ps & (ps - 1):  # (the object may end in a partial page)
                raise RemoteProtocolError("welcome: page size must be a power of two")
            self.geometry = ObjectGeometry(msg.size, msg.page_size)
        check_geometry(msg, self.geometry)
        return msg

    def _next(self, sender: Role, msg: Message, error: type[ProtocolError]) -> State:
        if self.state == State.CLOSED and sender != self.our_role and self._closed_by_us:
            return State.CLOSED  # sent before the peer saw our goodbye: in flight, ignored
        nxt = TRANSITIONS.get((sender, msg.TYPE, self.state))
        if nxt == State.CLOSED and sender == self.our_role:
            self._closed_by_us = True
        if nxt is None:
            raise error(f"{sender.value} may not send {msg.TYPE} in state {self.state.value}")
        return nxt
