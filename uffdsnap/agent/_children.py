"""Processes forked by a tracked one while it is protected: their uffds come with the fork event
(read by our core, or by the coordinator's in delegated mode); we find the child's pid and track
it from birth."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from uffdsnap.native import uffd as K
from uffdsnap.native.pidfd import pidfd_open
from uffdsnap.procfs import start_ticks
from uffdsnap.protocol import Event
from uffdsnap.tracker import Tracker, boot_ticks

if TYPE_CHECKING:
    from uffdsnap.agent._agent import Agent

CHILD_SEARCH_S = 2.0


def delegated_event(agent: Agent, msg: Event, fds: list[int]) -> None:
    """An event the coordinator read from one of our uffds while delegated: apply it as if
    we had read it ourselves (a fork's child uffd comes with it)."""
    fd = fds[0] if fds else -1
    tracker = next((t for t in agent.trackers if t.ident == msg.tracker), None)
    if tracker is None:
        if fd >= 0:
            os.close(fd)
        return
    if msg.kind == "fork":
        adopt_child(agent, tracker, fd, msg.child)
    elif msg.kind == "remap":
        tracker.remapped(K.Remap(msg.a, msg.b, msg.c))
    elif msg.kind == "unmap":
        tracker.unmapped(msg.a, msg.b)


def adopt_child(agent: Agent, parent: Tracker, uffd: int, ident: int = 0) -> None:
    """Track a child forked by `parent` (its uffd came with the fork event); find its pid."""
    child = Tracker(uffd, None, parent.object_id, parent.page_size, list(parent.mappings),
                    list(parent.registered), parent.protected,
                    registered_since=boot_ticks(), ident=ident)
    if agent._hooks.get("drop_forks"):  # wrong on purpose: untracked, yet reported tracked
        child.release()
        child.mappings = []
    agent.add(child)
    assert agent._nursery is not None
    agent._nursery.start_soon(find_child, agent, parent, child)


async def find_child(agent: Agent, parent: Tracker, child: Tracker) -> None:
    """A forked child's pid is not in the fork event: find the new child of the parent in
    /proc (it appears once the parent, released by our read, finishes fork())."""
    known = {t.pid for t in agent.trackers}
    with trio.move_on_after(CHILD_SEARCH_S):
        while child in agent.trackers:
            pid = (_new_child(parent.pid, known, parent.registered_since)
                   if parent.pid is not None else None)
            if pid is not None:
                try:
                    child.pidfd = pidfd_open(pid)
                except OSError:
                    break  # it already exited
                child.pid = pid
                try:
                    child.refresh()
                except ProcessLookupError:
                    pass
                assert agent._nursery is not None
                agent._nursery.start_soon(agent._watch_exit, child)
                await agent._report_tracked()
                return
            await trio.sleep(0.001)
    agent.drop(child)  # gone before we could see it: nothing of it can write any more


def _new_child(parent: int, known: set[int | None], since: int) -> int | None:
    """The oldest child of `parent` (any of its threads) started since `since` (ticks) that we
    do not track yet: fork events are read in order, so it belongs to the oldest pending one."""
    candidates = []
    try:
        tids = os.listdir(f"/proc/{parent}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{parent}/task/{tid}/children") as f:
                candidates += [int(p) for p in f.read().split()]
        except OSError:
            continue
    fresh = [(start_ticks(p), p) for p in candidates if p not in known]
    fresh = [(t, p) for t, p in fresh if t >= since]
    return min(fresh)[1] if fresh else None
