"""The wire protocol's messages: small frozen dataclasses, one per message type, each with
the kinds of its fields (checked by uffdsnap.protocol._codec) and the number of file descriptors
that travel with it (SCM_RIGHTS). docs/protocol.md describes every message."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 6
MAX_MESSAGE_BYTES = 4 << 20
MAX_RANGES = 4096
# A process can hold at most vm.max_map_count (65530 by default) mappings: a `protected` or
# `delegate` message lists every one of them that maps the object.
MAX_MAPS = 1 << 16
MAX_TEXT = 4096
MAX_TEXTS = 64
MAX_HISTOGRAM_BUCKETS = 1024



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

    def fd_count(self) -> int:
        """How many file descriptors travel with this message (SCM_RIGHTS)."""
        return self.fds


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
             "inode": "u", "delegate": "b", "fault_deadline_ms": "u"}
    version: int
    size: int
    page_size: int
    major: int
    minor: int
    inode: int
    delegate: bool = False  # agents hand their uffd to the coordinator (delegated mode)
    # the coordinator's fault deadline (0: the default): an agent whose writer waits on a
    # fault longer (plus a grace) takes the coordinator for stuck and releases it
    fault_deadline_ms: int = 0


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
    KINDS = {"snapshot": "u", "mappings": "maps", "protect_ns": "u", "gap": "s"}
    snapshot: int
    mappings: tuple[tuple[int, int, int], ...]  # (address, length, offset)
    protect_ns: int
    # Write tracking (after a `release` with keep): why the agent cannot vouch that every
    # write since that release faulted (a mapping of the object it found anew); "" if it can.
    gap: str = ""


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
    """The snapshot is over (done or failed): un-protect everything and unregister; or, with
    `keep` (write tracking for incremental snapshots), leave every page protected that is still
    protected and go on forwarding faults: the next write to each page faults once, so the
    coordinator learns what is written before the next snapshot."""

    TYPE = "release"
    KINDS = {"snapshot": "u", "keep": "b"}
    snapshot: int
    keep: bool = False


@dataclass(frozen=True)
class Released(Message):
    """Everything is un-protected; the agent's fault service statistics for the snapshot."""

    TYPE = "released"
    KINDS = {"snapshot": "u", "faults": "u", "service_hist": "hist", "service_max_ns": "u",
             "escapes": "texts", "unnamed_children": "u"}
    snapshot: int
    faults: int = 0
    service_hist: tuple[tuple[int, int], ...] = ()  # (bucket, count), see stats.LatencyHistogram
    service_max_ns: int = 0
    # Ways writes may have escaped tracking that the agent found (a mapping of the object that
    # was not protected: grown in place, mapped anew, in a process that exec'd): any fails the
    # snapshot.
    escapes: tuple[str, ...] = ()
    # children it tracked from birth (their uffds came with fork events) that exited before
    # their pid could be learned: tracked, but not named in `tracked`
    unnamed_children: int = 0


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

    def fd_count(self) -> int:
        return 1 if self.kind == "fork" else 0


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
class Written(Message):
    """Write tracking (after a `release` with keep): pages of these object ranges were written
    in the agent's processes since it last said so; it un-protected them there itself. Sent
    before `protected` (and before `gone`), so the coordinator has them all at T."""

    TYPE = "written"
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
    """Client asks the coordinator for one snapshot into `output`, or, with `to`, streamed to
    a receiver there (tcp://HOST:PORT or unix:PATH; `output` is then empty) with the stream's
    options (`max_rate` bytes/s and `staging` bytes, 0: none/default; `stream_timeout_ms`,
    0: default). `incremental`: only what was written since the previous image this
    coordinator published (a full image, with the reason, when it cannot prove that).
    `files`: two unnamed files travel with it (SCM_RIGHTS), created by the client in the
    directory of `output`: the coordinator writes the image into the first and its manifest into
    the second, and the client names them (the coordinator creates nothing on its word)."""

    TYPE = "snap"
    KINDS = {"output": "s", "overwrite": "b", "to": "s", "compress": "b", "max_rate": "u",
             "staging": "u", "stream_timeout_ms": "u", "incremental": "b", "files": "b"}
    output: str
    overwrite: bool = False
    to: str = ""
    compress: bool = False
    max_rate: int = 0
    staging: int = 0
    stream_timeout_ms: int = 0
    incremental: bool = False
    files: bool = False

    def fd_count(self) -> int:
        return 2 if self.files else 0


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
                        Delegate, FaultChannel, Event, Tracked, Removed, Written, Gone, Abort, Snap,
                        Result)
}
