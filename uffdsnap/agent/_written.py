"""Write tracking between snapshots (after a `release` with keep): a write to a page still
protected faults to us; we note the page and un-protect it in that process at once (no round
trip: the writer waits only for us), and tell the coordinator what we noted before it can
matter: before `protected` (so before the next T) and before `gone`. Should we die instead,
our uffds close and the coordinator, seeing our process live on, takes the next snapshot full."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uffdsnap.protocol import MAX_RANGES, Written

if TYPE_CHECKING:
    from uffdsnap.agent._agent import Agent
    from uffdsnap.tracker import Tracker


async def written_here(agent: Agent, tracker: Tracker, offset: int) -> None:
    """A write between snapshots: note the page, then let the writer go on. Only this process
    is un-protected: a write to the page elsewhere faults there once, and is noted again."""
    agent.written.add(offset)
    agent._unprotect(tracker, ((offset, tracker.page_size),))
    if len(agent.written) >= MAX_RANGES:
        await flush_written(agent)


async def flush_written(agent: Agent) -> None:
    """Tell the coordinator every page noted since we last did."""
    if not agent.written:
        return
    pages = sorted(agent.written)
    agent.written.clear()
    size = agent.page_size or 1
    ranges: list[tuple[int, int]] = []
    for off in pages:
        if ranges and ranges[-1][0] + ranges[-1][1] == off:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + size)
        else:
            ranges.append((off, size))
    for start in range(0, len(ranges), MAX_RANGES):
        await agent._send(Written(tuple(ranges[start:start + MAX_RANGES])))
