"""The escape audit an agent runs before releasing: every writable mapping of the object in the
processes it answers for must lie inside what it protected, as the kernel confirms."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uffdsnap.procfs import mappings_of, wp_registered_ranges
from uffdsnap.tracker import Union

if TYPE_CHECKING:
    from uffdsnap.agent._agent import Agent


def audit(agent: Agent) -> list[str]:
    """Before releasing: every writable mapping of the object in the processes we answer
    for must lie inside what we protected. One that does not (a mapping grown in place,
    one mapped anew, a process that exec'd and mapped the object again) may have taken
    writes no fault told us of: the coordinator fails the snapshot. (A mapping that came
    and went before now escapes this look: see docs/overview.md, limits.)"""
    found = [e for t in agent.trackers for e in t.escapes]
    by_pid = {t.pid: t for t in agent.trackers if t.pid is not None}
    for pid in sorted({agent.pid, *by_pid}):
        tracker = by_pid.get(pid)
        try:
            maps = [m for m in mappings_of(pid, agent.object_id) if m.writable]
            in_kernel = wp_registered_ranges(pid) if maps else []
        except (ProcessLookupError, OSError):
            continue  # gone: nothing of it can write any more
        # ours: inside what we registered, and registered as the kernel sees it (after an
        # exec, or munmap+mmap at the same address, our table matches and the kernel's not)
        ours = Union(tracker.registered if tracker else [])
        kernels = Union(in_kernel)
        found += [f"pid {pid} maps the object at {m.start:#x}-{m.end:#x} (offset "
                  f"{m.offset:#x}) writable without write-protection ("
                  + ("its tracking was lost" if tracker is None else
                     "a mapping that grew, or appeared after an exec or mmap") + ")"
                  for m in maps
                  if not (ours.covers(m.start, m.end) and kernels.covers(m.start, m.end))]
    return found
