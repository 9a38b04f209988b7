"""Write tracking for incremental snapshots: which pages any tracked process wrote since the
last image this coordinator published, and whether that record can be trusted.

The record is kept by the protection itself. After a tracked snapshot the agents leave every
page protected that was not written after T (the scan's saves do not un-protect, see the core's
sc_track_writes), so the first write to a page in any process faults; the page is recorded here
(or in the run's `written` map, by whoever serves the fault) before that process is told to
un-protect it. A delta then holds exactly the recorded pages: at its T every other page still
has its content at the parent's T.

The record is only as good as the tracking, so every way a write could have gone unseen since
the parent is a `gap`, and a snapshot with a gap is taken full, with the reason: no parent yet, a
tracked agent lost while its process lives, a process that joined since (it wrote before it was
protected), an agent that found a mapping its registration did not cover, a failed snapshot
(its release un-protected everything), a streamed one (its image is not ours to name).

Pure bookkeeping: no I/O, no trio (the coordinator feeds it events)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Parent:
    """The last image published while tracking: what a delta names as its parent."""

    image: str  # absolute path, as published; streamed: its name in the receiver's directory
    manifest_sha256: str
    snapshot_unix_ns: int
    location: str = ""  # "" (a local file) or the receiver it was streamed to

    def reference(self, delta_image: str = "") -> dict[str, object]:
        """The manifest's `parent` field for a delta published at `delta_image`: the parent's
        path relative to the delta's directory (both usually sit side by side); streamed,
        its name, beside the delta at the receiver."""
        image = self.image
        if not self.location:
            image = os.path.relpath(image, os.path.dirname(os.path.abspath(delta_image)))
        return {"image": image, "manifest_sha256": self.manifest_sha256,
                "snapshot_unix_ns": self.snapshot_unix_ns}

    def where(self) -> str:
        return f"streamed to {self.location}" if self.location else "as a local file"


@dataclass
class Plan:
    """What one tracked run starts from: the pages written since the parent (`dirty`), and
    later, at T, whether it may be a delta."""

    dirty: bytearray
    parent: Parent | None
    gap: str
    full_reason: str = ""  # set at T when a delta was asked for and cannot be proven
    delta: bool = False


@dataclass(eq=False)
class WriteTracking:
    """The coordinator's record of writes between snapshots (one byte per page)."""

    npages: int
    page_size: int
    active: bool = False
    parent: Parent | None = None
    gap: str = "no parent: this is the first snapshot since write tracking started"
    kept: set[Hashable] = field(default_factory=set)  # agents that kept protection
    carry: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.carry = bytearray(self.npages)

    def start(self) -> None:
        """The first incremental request: from this snapshot on, writes are tracked."""
        self.active = True

    # ---- between snapshots --------------------------------------------------------------------

    def record(self, offset: int, length: int) -> None:
        """A page range was written (a fault, before its un-protect) or removed."""
        mark(self.carry, offset, length, self.page_size)

    def agent_left(self, agent: Hashable, name: str, process_alive: bool) -> None:
        """A kept agent is gone: if its process lives, its uffd closed and with it every
        protection it kept; the process's later writes are unseen."""
        if agent in self.kept:
            self.kept.discard(agent)
            if process_alive and self.active and not self.gap:
                self.gap = f"the agent of {name} was lost since the previous snapshot"

    # ---- one run ------------------------------------------------------------------------------

    def begin(self) -> Plan:
        """A tracked run starts: what was written so far is its `dirty` set; what is written
        from now on (served after its T) goes to a fresh record."""
        plan = Plan(self.carry, self.parent, self.gap)
        self.carry = bytearray(self.npages)
        return plan

    def decide(self, plan: Plan, incremental: bool, members: Iterable[tuple[Hashable, str]],
               agent_gaps: Iterable[str], location: str) -> None:
        """At T: a delta only if asked for, every write since the parent was seen, and the
        delta goes where its parent is (`location`: "" local, else the receiver's address)."""
        if not incremental:
            return
        reasons = [plan.gap] if plan.gap else []
        if plan.parent is None and not reasons:
            reasons.append("no parent: no image was published while tracking writes")
        if plan.parent is not None and plan.parent.location != location:
            here = f"streamed to {location}" if location else "to a local file"
            reasons.append(f"the previous image was published {plan.parent.where()}, this one "
                           f"goes {here}")
        reasons += [f"{name} joined since the previous snapshot (it wrote before it was "
                    "protected)" for key, name in members if key not in self.kept]
        reasons += [g for g in agent_gaps if g]
        plan.full_reason = reasons[0] if reasons else ""
        plan.delta = not reasons

    def end(self, plan: Plan, written: memoryview | bytearray | None, *, released_kept:
            set[Hashable] | None, published: Parent | None, failure: str = "") -> None:
        """After the run: what was written after its T joins the record; if it published, it is
        the new parent, and the record restarts from its T; if not, the record still runs
        from the old parent (its dirty pages stay in). `released_kept`: the agents that kept
        protection (None: the release un-protected everything, so tracking restarts)."""
        if written is not None:
            merge(self.carry, written)
        if published is None:
            merge(self.carry, plan.dirty)
        if released_kept is None:
            self.kept = set()
            self.gap = (f"the previous snapshot failed ({failure}); its release un-protected "
                        "everything" if failure else
                        "write tracking was interrupted (the previous snapshot released "
                        "everything)")
            return
        self.kept = set(released_kept)
        if published is not None:
            self.parent = published
            self.gap = ""

    def unnamed(self) -> None:
        """Published where we cannot name it (a stream on a pipe: no answer comes back)."""
        self.parent = None
        self.gap = ("the previous snapshot was streamed to a pipe: no answer named its image, "
                    "so it cannot be a parent")


def mark(pages: bytearray, offset: int, length: int, page_size: int) -> None:
    first = offset // page_size
    last = min(len(pages), -(-(offset + length) // page_size))
    if first < last:
        pages[first:last] = b"\x01" * (last - first)


def merge(into: bytearray, other: memoryview | bytearray) -> None:
    """into |= other (maps of 0/1 bytes of the same length), without a per-page loop."""
    n = min(len(into), len(other))
    a = int.from_bytes(into[:n], "little")
    b = int.from_bytes(bytes(other[:n]), "little")
    into[:n] = (a | b).to_bytes(n, "little")


def runs(pages: bytearray | memoryview) -> Iterator[tuple[int, int]]:
    """(first page, end page) of each run of 1s."""
    data = bytes(pages)
    pos, n = 0, len(data)
    while pos < n:
        start = data.find(b"\x01", pos)
        if start < 0:
            return
        end = data.find(b"\x00", start)
        end = n if end < 0 else end
        yield start, end
        pos = end


def count(pages: bytearray | memoryview) -> int:
    return bytes(pages).count(b"\x01")
