"""Processes forked by a tracked one while it is protected: their uffds come with the fork event
(read by our core, or by the coordinator's in delegated mode); we find the child's pid and track
it from birth."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from uffdsnap.native import uffd as K
from uffdsnap.native.libc import KernelError
from uffdsnap.native.pidfd import pidfd_open
from uffdsnap.procfs import (
    ObjectId,
    ScanUnstable,
    find_mappers,
    parent_pid,
    process_running,
    start_ticks,
    wp_registered_ranges,
)
from uffdsnap.protocol import Event
from uffdsnap.tracker import GONE, Tracker, Union, boot_ticks

if TYPE_CHECKING:
    from uffdsnap.agent._agent import Agent

log = logging.getLogger(__name__)

CHILD_SEARCH_S = 2.0


def delegated_event(agent: Agent, msg: Event, fds: list[int]) -> None:
    """An event the coordinator read from one of our uffds while delegated: apply it as if
    we had read it ourselves (a fork's child uffd comes with it)."""
    fd = fds[0] if fds else -1
    tracker = next((t for t in agent.trackers if t.ident == msg.tracker), None)
    log.debug("delegated %s event of tracker %d (%s)", msg.kind, msg.tracker,
              "tracked" if tracker else "departed" if msg.tracker in agent.departed else "unknown")
    if tracker is None:
        parent = agent.departed.get(msg.tracker)
        if msg.kind == "fork" and parent is not None and fd >= 0:
            adopt_child(agent, parent, fd, msg.child, from_coordinator=True)  # (then exited)
        elif fd >= 0:
            os.close(fd)
        return
    if msg.kind == "fork":
        adopt_child(agent, tracker, fd, msg.child, from_coordinator=True)
    elif msg.kind == "remap":
        tracker.remapped(K.Remap(msg.a, msg.b, msg.c))
    elif msg.kind == "unmap":
        tracker.unmapped(msg.a, msg.b)


def departed_event(agent: Agent, ident: int, msg: bytes) -> None:
    """A uffd message of a tracker dropped since it was read (its process forked, then exited
    before we handled the fork): the child lives on, registered and protected, and is tracked
    like any other (closing its uffd would let it write untracked). Other events of a gone
    address space mean nothing any more."""
    parent = agent.departed.get(ident)
    event = K.decode_message(msg)
    if parent is not None and isinstance(event, K.Fork):
        adopt_child(agent, parent, event.uffd)
    else:
        K.close_fork_uffd(msg)


def adopt_child(agent: Agent, parent: Tracker, uffd: int, ident: int = 0, *,
                from_coordinator: bool = False) -> None:
    """Track a child forked by `parent` (its uffd came with the fork event, read by us or, in
    delegated mode, by the coordinator, which then serves it); find its pid."""
    log.debug("pid %s forked (protected %s, registered %s)", parent.pid, parent.protected,
              parent.registered)
    child = Tracker(uffd, None, parent.object_id, parent.page_size, list(parent.mappings),
                    list(parent.registered), parent.protected,
                    # its registration is its parent's: any child of its own is younger
                    registered_since=parent.registered_since or boot_ticks(), ident=ident,
                    # write tracking: it inherited its parent's protection, page for page
                    kept=parent.kept, gap=parent.gap)
    if from_coordinator:
        child.coordinator_reads = True  # (before protect_registered below meets EAGAIN)
    if agent.hooks.get("drop_forks"):  # wrong on purpose: untracked, yet reported tracked
        child.release()
        child.mappings = []
    elif parent.protected:
        # during a snapshot: protect all it inherited, before anyone can count it as tracked
        # (its agent reports it only once found; T waits for that)
        child.born_in_snapshot = True
        try:
            child.protect_registered()
        except KernelError as e:
            if e.errno not in GONE:
                raise
    elif agent.releasing and not agent.keeping:
        # forked after the snapshot (while we were releasing its parent): born registered and
        # perhaps partly protected; between snapshots nothing is tracked
        child.registered = [(m.start, m.end) for m in child.mappings]
        try:
            child.release()
        except KernelError as e:
            log.warning("releasing a child of pid %s: %s", parent.pid, e)
        child.close()
        return
    agent.add(child)
    assert agent._nursery is not None
    agent._nursery.start_soon(find_child, agent, parent, child)


async def find_child(agent: Agent, parent: Tracker | None, child: Tracker) -> None:
    """A forked child's pid is not in the fork event: find the new child of the parent in
    /proc (it appears once the parent, released by our read, finishes fork()). A child we
    cannot name is never dropped while its address space lives (closing its uffd would let it
    write untracked): it stays tracked without a pid, and the coordinator, which cannot count
    it, refuses the snapshot rather than guess."""
    with trio.move_on_after(CHILD_SEARCH_S):
        while child in agent.trackers:
            known = agent.pids_tracked_here()
            parent_pid_ = parent.pid if parent is not None else None
            pid = (_new_child(parent_pid_, known, parent.registered_since)
                   if parent is not None and parent_pid_ is not None else None)
            if pid is None and (parent_pid_ is None or not process_running(parent_pid_)):
                # the parent exited right after forking (a fork chain): its child was
                # reparented; or we are naming again (parent unknown): look among the
                # object's mappers for it
                pid = _orphan(agent.object_id, known, child.registered_since,
                              only_orphans=parent is not None)
            if pid is not None:
                try:
                    child.pidfd = pidfd_open(pid)
                except OSError:
                    continue  # it exited meanwhile: look again (its address space decides)
                child.pid = pid
                if not child.address_space_alive():
                    # its own process is gone (and `pid` a younger sibling's): drop it unnamed
                    os.close(child.pidfd)
                    child.pidfd, child.pid = -1, None
                    break
                log.debug("child of pid %s found: pid %d", parent_pid_, pid)
                inherited = child.mappings
                try:
                    child.refresh()
                except ProcessLookupError:
                    pass
                if not child.mappings:
                    # it exited since (a fork chain's member lives milliseconds): its maps read
                    # empty. Its forks, whose events may still come, inherit these mappings, and
                    # their faults are placed through them (an empty table loses the child:
                    # the core fails its first fault, EFAULT, and the agent ends)
                    child.mappings = inherited
                assert agent._nursery is not None
                agent._nursery.start_soon(agent._watch_exit, child)
                await agent._report_tracked()
                return
            if not child.address_space_alive():
                break
            await trio.sleep(0.001)  # /proc has no event for a new process
    if child in agent.trackers and child.pid is None:
        if child.address_space_alive():
            log.warning("a child of pid %s could not be named: kept tracked without a pid",
                        parent.pid if parent else "?")
        else:
            log.debug("child of pid %s exited before we could see it",
                      parent.pid if parent else "?")
            agent.drop(child)  # (counted among the unnamed)  # nothing of it can write any more


def _orphan(obj: ObjectId, known: set[int | None], since: int,
            only_orphans: bool = True) -> int | None:
    """A child whose parent exited before we could see it among its children: the one process
    started since `since` that maps the object, is tracked by nobody we know, has its mappings
    registered with a userfaultfd (the kernel's `uw` flag: only a fork of a registered process
    gives that, attach and enlist go through agents) and whose parent is no such process (its
    own children are younger generations). None unless exactly one qualifies: a wrong guess
    would let us drop the wrong process's tracking later."""
    try:
        mappers = find_mappers(obj, exclude={os.getpid()})
    except ScanUnstable:
        return None  # (we look again)
    registered: set[int] = set()
    started: dict[int, int] = {}
    for pid, maps in mappers.items():
        try:
            ranges = Union(wp_registered_ranges(pid))
            started[pid] = start_ticks(pid)
        except (ProcessLookupError, OSError, ValueError):
            continue
        if any(ranges.covers(m.start, m.end) for m in maps):
            registered.add(pid)
    candidates = [pid for pid in registered
                  if pid not in known and started[pid] >= since and process_running(pid)
                  and not (only_orphans and parent_pid(pid) in registered)]
    return candidates[0] if len(candidates) == 1 else None


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
    fresh = []
    for pid in candidates:
        if pid in known or not process_running(pid):  # (a zombie is no child to track)
            continue
        try:
            started = start_ticks(pid)
        except (OSError, ValueError):
            continue
        if started >= since:
            fresh.append((started, pid))  # (pids grow: they order children of one tick)
    return min(fresh)[1] if fresh else None
