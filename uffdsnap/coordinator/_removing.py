"""Pages a remove event (MADV_REMOVE, MADV_DONTNEED) named while they were unsaved and not holes.

The kernel raises UFFD_EVENT_REMOVE *before* it punches, and lets madvise go on as soon as the
event is read: the punch may come after the coordinator has handled the event (in delegated
mode it reads the event itself, and a loaded machine may run the puncher milliseconds later).
So those pages are looked at again until the copy is over: one that has become a hole lost its
content at T, perhaps before it was saved (which saved zeros), and fails the snapshot. (An
MADV_DONTNEED punches nothing: it passes.)"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from uffdsnap.procfs import SharedObject
from uffdsnap.tracker import Union

WATCH_S = 0.002  # how often the pages are looked at for the punch


@dataclass(eq=False)
class Removing:
    """One snapshot's pages to look at for a punch."""

    runs: list[tuple[int, int]] = field(default_factory=list)  # pages [first, end)
    added: trio.Event = field(default_factory=trio.Event)

    def note(self, pages: list[int], obj: SharedObject, page_size: int) -> list[int]:
        """`pages`, unsaved, were named by a remove event: the first that is a hole now (which
        fails the snapshot), or none, and then they are kept, to be looked at again."""
        named = page_runs([], pages)
        hole = _first_hole_page(named, obj, page_size)
        if named and not hole:
            self.runs = page_runs(self.runs, pages)
            self.added.set()
        return hole

    def holes(self, obj: SharedObject, page_size: int) -> list[int]:
        """The first page kept that is a hole now (or none)."""
        return _first_hole_page(self.runs, obj, page_size)

    async def wait(self) -> None:
        """Until there are pages to look at."""
        while not self.runs:
            await self.added.wait()
            self.added = trio.Event()


def page_runs(runs: list[tuple[int, int]], pages: list[int]) -> list[tuple[int, int]]:
    """`runs` of pages [first, end) with `pages` added, sorted and merged."""
    union = Union(runs + [(page, page + 1) for page in pages])
    return list(zip(union.starts, union.ends, strict=True))


def _first_hole_page(runs: list[tuple[int, int]], obj: SharedObject,
                     page_size: int) -> list[int]:
    """The first page of `runs` that is a hole now, as a list of one (or none): one lseek per
    run, however many pages a remove event named."""
    for first, end in runs:
        hole = first_hole(obj.fd, first * page_size, min(end * page_size, obj.size))
        if hole is not None:
            return [hole // page_size]
    return []


def first_hole(fd: int, start: int, end: int) -> int | None:
    """The offset of the first hole in [start, end), None if it is all data (or past the end
    of the object: a size that changed is reported as such)."""
    try:
        hole = os.lseek(fd, start, os.SEEK_HOLE)
    except OSError:
        return None  # ENXIO: at or past the end
    return hole if hole < end else None
