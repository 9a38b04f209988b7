"""One snapshot's part in write tracking (see _tracking): the faults it serves after T are
recorded for the next delta; at T it decides whether it is a delta, and a delta saves only the
pages written since its parent (the others count as saved from the start, so a fault on one is
answered at once and the scan passes them by)."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from uffdsnap.coordinator._tracking import Plan, WriteTracking, count, mark, runs
from uffdsnap.native.core import SnapCore

_FLIP = bytes.maketrans(b"\x00\x01", b"\x01\x00")


@dataclass(eq=False)
class TrackedRun:
    plan: Plan
    incremental: bool  # a delta was asked for
    core: SnapCore
    page_size: int
    agent_gaps: dict[Hashable, str] = field(default_factory=dict)  # from each `protected`
    kept_agents: set[Hashable] | None = None  # who kept protection at release

    def __post_init__(self) -> None:
        self.core.track_writes()  # the scan's saves keep pages protected; faults recorded

    def mark_written(self, offset: int, length: int) -> None:
        """A page un-protected after T (a fault Python served): the next delta has it."""
        assert self.core.written is not None
        mark(self.core.written, offset, length, self.page_size)  # type: ignore[arg-type]

    def written_before_t(self, ranges: tuple[tuple[int, int], ...]) -> None:
        """Pages an agent un-protected itself between snapshots: this delta's."""
        for offset, length in ranges:
            mark(self.plan.dirty, offset, length, self.page_size)

    def decide(self, tracking: WriteTracking, members: list[tuple[Hashable, str]],
               location: str) -> None:
        """At T (nothing saved yet): a delta if asked for and proven; then only the pages
        written since the parent are left to save."""
        tracking.decide(self.plan, self.incremental, members,
                        [self.agent_gaps.get(key, "") for key, _ in members], location)
        if self.plan.delta:
            self.core.saved[:] = bytes(self.plan.dirty).translate(_FLIP)

    def removed(self, ranges: list[tuple[int, int]]) -> list[int]:
        """MADV_REMOVE hit `ranges`: recorded for the next delta; in a delta, the pages it named
        that are left to the parent (one that is a hole, now or once the punch follows, lost
        its state at T: see _removing)."""
        for off, length in ranges:
            self.mark_written(off, length)
        if not self.plan.delta:
            return []
        ps, dirty = self.page_size, self.plan.dirty
        return [page for off, length in ranges
                for page in range(off // ps, min((off + length) // ps, len(dirty)))
                if not dirty[page]]

    def windows(self, size: int, window: int, gaps: bool = False
                ) -> Iterator[tuple[int, int, bool | None]] | None:
        """A delta's copy windows (None: a full copy); `gaps`: with (start, length, None) for
        each run left to the parent (a stream covers every page)."""
        return delta_windows(self.plan.dirty, self.page_size, size, window, gaps) \
            if self.plan.delta else None

    def parent_field(self) -> dict[str, Any] | None:
        """A streamed delta's HEADER parent (None: full)."""
        parent = self.plan.parent
        return parent.reference() if self.plan.delta and parent is not None else None

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        return {"requested": self.incremental, "delta": plan.delta,
                "full_reason": plan.full_reason,
                "pages_written_since_parent": count(plan.dirty),
                "parent": plan.parent.image if plan.delta and plan.parent is not None else ""}


def delta_windows(dirty: bytearray, page_size: int, size: int, window: int,
                  gaps: bool = False) -> Iterator[tuple[int, int, bool | None]]:
    """The runs of pages written since the parent, in pieces of at most `window`, all copied
    (a hole among them is zeros in the delta, not "the parent's"); `gaps`: and the runs
    between them, as (start, length, None)."""
    pos = 0
    for first, end in runs(dirty):
        a, b = first * page_size, min(end * page_size, size)
        if gaps and a > pos:
            yield pos, a - pos, None
        for start in range(a, b, window):
            yield start, min(window, b - start), True
        pos = b
    if gaps and pos < size:
        yield pos, size - pos, None
