"""The wire protocol between coordinator, agents and clients, as a pure state machine (h11's shape).

Messages are small frozen dataclasses. A `Connection` turns bytes into validated messages and
messages into bytes, and enforces which message may come when; it never touches a socket. Framing:
a 4-byte big-endian length, then one msgpack map {"t": type, ...fields}. Protocol errors are two
exceptions: LocalProtocolError (we tried to send something illegal) and RemoteProtocolError (the
peer did). docs/protocol.md describes every message.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

# defined in errors.py, so that the CLI can catch it without importing msgpack
from uffdsnap.errors import ProtocolError as ProtocolError

PROTOCOL_VERSION = 3
MAX_MESSAGE_BYTES = 4 << 20
MAX_RANGES = 4096
# A process can hold at most vm.max_map_count (65530 by default) mappings: a `protected` or
# `delegate` message lists every one of them that maps the object.
MAX_MAPS = 1 << 16
MAX_TEXT = 4096
MAX_TEXTS = 64
MAX_HISTOGRAM_BUCKETS = 1024
_U63 = (1 << 63) - 1
_HEADER = struct.Struct(">I")


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized, unknown, out of range or out of turn."""


class Role(enum.Enum):
    COORDINATOR = "coordinator"
    AGENT = "agent"
    CLIENT = "client"


# ---- messages -------------------------------------------------------------------------------
# Field kinds: "u" unsigned int, "i" signed int, "s" short text, "b" bool,
# "ranges" list of [offset, length], "maps" list of [start, length, offset], "hist" {bucket: count},
# "d" a small dict of scalars (informational, passed through), "texts" a short list of texts.


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    KINDS: ClassVar[dict[str, str]] = {}
    # Number of file descriptors that travel with this message (SCM_RIGHTS), set by the sender.
    fds: ClassVar[int] = 0


@dataclass(frozen=True)
class Hello(Message):
    """First message of an agent or client: who it is and which protocol it speaks."""

    TYPE = "hello"
    KINDS = {"version": "u", "role": "s", "pid": "u", "mode": "s", "comm": "s"}
    version: int
    role: str
    pid: int  # the tracked process (agent) or the client's own pid
    mode: str = ""  # agent: "attach" or "enlist"
    comm: str = ""


@dataclass(frozen=True)
class Welcome(Message):
    """Coordinator's answer to Hello: the object everyone speaks about, in file offsets."""

    TYPE = "welcome"
    KINDS = {"version": "u", "size": "u", "page_size": "u", "major": "u", "minor": "u",
             "inode": "u", "delegate": "b"}
    version: int
    size: int
    page_size: int
    major: int
    minor: int
    inode: int
    delegate: bool = False  # agents hand their uffd to the coordinator (delegated mode)


@dataclass(frozen=True)
class Protect(Message):
    """Register (if needed) and write-protect every mapping of the object; hold nothing."""

    TYPE = "protect"
    KINDS = {"snapshot": "u"}
    snapshot: int


@dataclass(frozen=True)
class Protected(Message):
    """Every mapping of the object in the agent's process is write-protected."""

    TYPE = "protected"
    KINDS = {"snapshot": "u", "mappings": "maps", "protect_ns": "u"}
    snapshot: int
    mappings: tuple[tuple[int, int, int], ...]  # (address, length, offset)
    protect_ns: int


@dataclass(frozen=True)
class Fault(Message):
    """A write hit a protected page at object `offset` (page-aligned); the writer is blocked."""

    TYPE = "fault"
    KINDS = {"offset": "u", "tid": "u", "seen_ns": "u"}
    offset: int
    tid: int = 0
    seen_ns: int = 0  # CLOCK_MONOTONIC when the agent read the fault


@dataclass(frozen=True)
class Unprotect(Message):
    """These object ranges are saved: un-protect them and wake their waiters."""

    TYPE = "unprotect"
    KINDS = {"ranges": "ranges"}
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Release(Message):
    """The snapshot is over (done or failed): un-protect everything and unregister."""

    TYPE = "release"
    KINDS = {"snapshot": "u"}
    snapshot: int


@dataclass(frozen=True)
class Released(Message):
    """Everything is un-protected; the agent's fault service statistics for the snapshot."""

    TYPE = "released"
    KINDS = {"snapshot": "u", "faults": "u", "service_hist": "hist", "service_max_ns": "u",
             "escapes": "texts"}
    snapshot: int
    faults: int = 0
    service_hist: tuple[tuple[int, int], ...] = ()  # (bucket, count), see stats.LatencyHistogram
    service_max_ns: int = 0
    # Ways writes may have escaped tracking that the agent found (a mapping of the object that
    # was not protected: grown in place, mapped anew, in a process that exec'd): any fails the
    # snapshot.
    escapes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delegate(Message):
    """Delegated mode: here is (with this message, SCM_RIGHTS) a copy of the uffd of tracked
    process `pid` (0 if not yet known), which the agent calls `tracker`. The coordinator reads
    its faults and un-protects through it directly until `release`."""

    TYPE = "delegate"
    KINDS = {"tracker": "u", "pid": "u", "mappings": "maps"}
    fds = 1
    tracker: int
    pid: int = 0
    mappings: tuple[tuple[int, int, int], ...] = ()  # (address, length, offset)


@dataclass(frozen=True)
class FaultChannel(Message):
    """Agents mode: here is (with this message, SCM_RIGHTS) one end of a socket pair. Until
    `release`, the agent sends its `fault`s over it and the coordinator answers with
    `unprotect`s of one range each, both in the fixed encoding of docs/protocol.md, so native
    code on both ends can serve a fault with no interpreter in between."""

    TYPE = "faults"
    KINDS = {"snapshot": "u"}
    fds = 1
    snapshot: int


@dataclass(frozen=True)
class Event(Message):
    """Delegated mode: a uffd event the coordinator read for the agent's `tracker`. `kind` is
    "fork" (the child's uffd travels with the message; the agent calls it `child`), "remap"
    (a=old address, b=new address, c=length) or "unmap" (a=start, b=end)."""

    TYPE = "event"
    KINDS = {"tracker": "u", "kind": "s", "a": "u", "b": "u", "c": "u", "child": "u"}
    tracker: int
    kind: str
    a: int = 0
    b: int = 0
    c: int = 0
    child: int = 0


@dataclass(frozen=True)
class Tracked(Message):
    """Every process the agent now tracks: its own, plus descendants forked while protected
    (their uffds arrive with the fork event). Sent whenever the set changes."""

    TYPE = "tracked"
    KINDS = {"pids": "pids"}
    pids: tuple[int, ...]


@dataclass(frozen=True)
class Removed(Message):
    """MADV_REMOVE/MADV_DONTNEED hit these object ranges in a tracked process."""

    TYPE = "removed"
    KINDS = {"ranges": "ranges"}
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Gone(Message):
    """The agent's process exited (or exec'd away from the object); the agent is leaving."""

    TYPE = "gone"
    KINDS = {"reason": "s"}
    reason: str


@dataclass(frozen=True)
class Abort(Message):
    """Either side gives up; the receiver releases everything and closes."""

    TYPE = "abort"
    KINDS = {"reason": "s"}
    reason: str


@dataclass(frozen=True)
class Snap(Message):
    """Client asks the coordinator for one snapshot into `output`."""

    TYPE = "snap"
    KINDS = {"output": "s", "overwrite": "b"}
    output: str
    overwrite: bool = False


@dataclass(frozen=True)
class Result(Message):
    """Coordinator's answer to Snap: ok, or the reason it failed; summary as a small dict."""

    TYPE = "result"
    KINDS = {"ok": "b", "reason": "s", "summary": "d"}
    ok: bool
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Hello, Welcome, Protect, Protected, Fault, Unprotect, Release, Released,
                        Delegate, FaultChannel, Event, Tracked, Removed, Gone, Abort, Snap, Result)
}

# ---- states ---------------------------------------------------------------------------------


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

# ---- validation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectGeometry:
    """What offsets in messages are checked against once the coordinator has said it."""

    size: int
    page_size: int


def _check_u(name: str, v: Any) -> int:
    if type(v) is not int or not 0 <= v <= _U63:
        raise RemoteProtocolError(f"field {name!r} must be an unsigned integer, got {v!r:.60}")
    return v


def _check_list(name: str, v: Any, limit: int) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or len(v) > limit:
        raise RemoteProtocolError(f"field {name!r} must be a list of at most {limit} integers")
    return tuple(_check_u(name, x) for x in v)


def _check_pairs(name: str, v: Any, width: int, limit: int) -> tuple[tuple[int, ...], ...]:
    if not isinstance(v, list | tuple) or len(v) > limit:
        raise RemoteProtocolError(f"field {name!r} must be a list of at most {limit} entries")
    out = []
    for item in v:
        if not isinstance(item, list | tuple) or len(item) != width:
            raise RemoteProtocolError(f"field {name!r} entries must have {width} integers")
        out.append(tuple(_check_u(name, x) for x in item))
    return tuple(out)


def _check_field(name: str, kind: str, v: Any) -> Any:
    if kind == "u":
        return _check_u(name, v)
    if kind == "s":
        if not isinstance(v, str) or len(v) > MAX_TEXT:
            raise RemoteProtocolError(f"field {name!r} must be text of at most {MAX_TEXT} chars")
        return v
    if kind == "b":
        if not isinstance(v, bool):
            raise RemoteProtocolError(f"field {name!r} must be a boolean")
        return v
    if kind == "ranges":
        return _check_pairs(name, v, 2, MAX_RANGES)
    if kind == "maps":
        return _check_pairs(name, v, 3, MAX_MAPS)
    if kind == "texts":
        if not isinstance(v, list | tuple) or len(v) > MAX_TEXTS or not all(
                isinstance(t, str) and len(t) <= MAX_TEXT for t in v):
            raise RemoteProtocolError(f"field {name!r} must be a list of at most {MAX_TEXTS} "
                                      f"texts of at most {MAX_TEXT} chars")
        return tuple(v)
    if kind == "pids":
        return _check_list(name, v, MAX_RANGES)
    if kind == "hist":
        return _check_pairs(name, v, 2, MAX_HISTOGRAM_BUCKETS)
    if kind == "d":
        if not isinstance(v, dict) or len(v) > 64:
            raise RemoteProtocolError(f"field {name!r} must be a small map")
        for key, val in v.items():
            if not isinstance(key, str) or not isinstance(val, int | float | str | bool | None):
                raise RemoteProtocolError(f"field {name!r} must map names to scalars")
        return dict(v)
    raise AssertionError(kind)


def _check_span(what: str, offset: int, length: int, geo: ObjectGeometry) -> None:
    ps = geo.page_size
    # (an object whose size is not a multiple of the page size ends in a partial page)
    if offset % ps or length % ps or length == 0 or offset + length > -(-geo.size // ps) * ps:
        raise RemoteProtocolError(
            f"{what} [{offset:#x}, +{length:#x}) is not page-aligned inside the object "
            f"(size {geo.size:#x}, page {ps:#x})"
        )


def check_geometry(msg: Message, geo: ObjectGeometry | None) -> None:
    """Check that every offset in `msg` lies inside the object, page-aligned."""
    if geo is None:
        return
    if isinstance(msg, Fault):
        _check_span("fault", msg.offset, geo.page_size, geo)
    elif isinstance(msg, Unprotect | Removed):
        for off, length in msg.ranges:
            _check_span("unprotect range", off, length, geo)
    elif isinstance(msg, Protected | Delegate):
        for addr, length, off in msg.mappings:
            # a mapping may reach past the object's end (those pages would SIGBUS): only its
            # start must lie inside the object
            if addr % geo.page_size or off % geo.page_size or length % geo.page_size \
                    or off >= geo.size:
                raise RemoteProtocolError(f"mapping at offset {off:#x} (+{length:#x}) is not "
                                          "page-aligned inside the object")


def decode(payload: bytes, error: type[ProtocolError] = RemoteProtocolError) -> Message:
    """One message from its msgpack payload, fully validated (not against the geometry)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise error(f"undecodable message ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise error("message is not a map with a type field 't'")
    cls = MESSAGES.get(obj["t"])
    if cls is None:
        raise error(f"unknown message type {obj['t']!r:.40}")
    declared = {f.name for f in fields(cls)}
    extra = set(obj) - declared - {"t"}
    if extra:
        raise error(f"{cls.TYPE}: unknown fields {sorted(extra)!r:.80}")
    values = {}
    try:
        for f in fields(cls):
            if f.name in obj:
                values[f.name] = _check_field(f.name, cls.KINDS[f.name], obj[f.name])
    except RemoteProtocolError as e:
        raise error(f"{cls.TYPE}: {e}") from None
    try:
        return cls(**values)
    except TypeError:
        missing = sorted(n for n in declared - set(values))
        raise error(f"{cls.TYPE}: missing fields {missing}") from None


def encode(msg: Message) -> bytes:
    """The framed bytes of `msg`; validates it the way the peer will."""
    obj: dict[str, Any] = {"t": msg.TYPE}
    for f in fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, tuple):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        obj[f.name] = v
    payload = msgpack.packb(obj, use_bin_type=True)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"{msg.TYPE} message of {len(payload)} bytes exceeds the limit")
    decode(payload, LocalProtocolError)  # what we send must pass the peer's checks
    return _HEADER.pack(len(payload)) + payload


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

    # -- sending --
    def send(self, msg: Message) -> bytes:
        """Bytes to write for `msg`; raises LocalProtocolError if it is not legal now."""
        if self.state == State.CLOSED:
            raise LocalProtocolError(f"cannot send {msg.TYPE}: connection closed")
        role = self.our_role
        if isinstance(msg, Hello):
            if role == Role.COORDINATOR or msg.role != role.value:
                raise LocalProtocolError("hello must carry our own agent/client role")
        self.state = self._next(role, msg, LocalProtocolError)
        if isinstance(msg, Welcome):
            self.geometry = ObjectGeometry(msg.size, msg.page_size)
        try:
            check_geometry(msg, self.geometry)
        except RemoteProtocolError as e:
            raise LocalProtocolError(str(e)) from None
        return encode(msg)

    # -- receiving --
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket."""
        self._buffer += data
        if len(self._buffer) > MAX_MESSAGE_BYTES + _HEADER.size + (64 << 10) * 16:
            raise RemoteProtocolError("peer sent more than it lets us read")

    def next_message(self) -> Message | None:
        """The next complete, validated message, or None if more bytes are needed."""
        if len(self._buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > MAX_MESSAGE_BYTES:
            raise RemoteProtocolError(
                f"message of {length} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
        if len(self._buffer) < _HEADER.size + length:
            return None
        payload = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
        del self._buffer[:_HEADER.size + length]
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
