"""One snapshot, as an agent sees it: `protect` (write-protect every tracked process, lend the
uffds to our core or to the coordinator) and `release` (audit, un-protect, name the children
born meanwhile, unregister). Between the two, faults travel through _corelink or the
coordinator's core."""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

import trio

from uffdsnap import testhooks
from uffdsnap.agent._audit import audit
from uffdsnap.agent._children import CHILD_SEARCH_S
from uffdsnap.agent._corelink import start_core, start_watch, stop_core
from uffdsnap.agent._written import flush_written
from uffdsnap.channel import Channel
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import Mapping
from uffdsnap.protocol import (
    MAX_TEXTS,
    Delegate,
    FaultChannel,
    Protect,
    Protected,
    Release,
    Released,
)
from uffdsnap.stats import monotonic_ns
from uffdsnap.tracker import GONE, Tracker

if TYPE_CHECKING:
    from uffdsnap.agent._agent import Agent

log = logging.getLogger(__name__)

BACKLOG_S = 1.0  # (bounds _forks_read_here_adopted)


async def on_protect(agent: Agent, chan: Channel, msg: Protect) -> None:
    """Protect every tracked process, hand the uffds (delegated) or a fault channel (agents
    mode) to the coordinator, then say `protected` with what we covered."""
    await _test_hold_protect(agent)
    # write tracking: from now on faults go to the snapshot; what we noted since the last
    # release goes to the coordinator first (before `protected`, so before T)
    agent.keeping = False
    await flush_written(agent)
    agent.log.reset()
    agent.unnamed_children = 0
    agent.releasing = False
    for tracker in agent.trackers:
        tracker.born_in_snapshot = False  # (one kept unnamed was counted by its snapshot)
    use_core = not agent.delegate and not agent.hooks.get("no_fault_channel")
    # the coordinator or our core reads the uffds from now: stop reading them before anything
    # can fault
    agent.lent = agent.delegate or use_core
    agent.resumed = trio.Event()
    theirs = start_core(agent) if use_core else None
    if agent.lent:
        start_watch(agent)  # a coordinator that stops answering: writers released anyway
    t0 = monotonic_ns()
    maps = [m for t in list(agent.trackers) for m in _protect(agent, t)]
    protect_ns = monotonic_ns() - t0
    log.debug("agent for pid %d protected %s", agent.pid,
              [(t.pid, len(t.registered)) for t in agent.trackers])
    if agent.delegate:
        await _forks_read_here_adopted(agent)
        for t in list(agent.trackers):
            if t not in agent.trackers:
                continue  # dropped while we sent the others (its uffd is closed)
            spans = tuple(t.spans_with_offsets())
            lent = os.dup(t.uffd)  # ours to close, whatever a drop does meanwhile
            try:
                await chan.send(Delegate(t.ident, t.pid or 0, spans), fds=[lent])
            finally:
                os.close(lent)
            t.coordinator_reads = True
    elif theirs is not None:
        assert agent.core is not None
        for t in list(agent.trackers):
            agent.core.set_maps(t.ident, t.spans_with_offsets())
        try:
            await chan.send(FaultChannel(msg.snapshot), fds=[theirs.fileno()])
        finally:
            theirs.close()
    gap = next((t.gap for t in agent.trackers if t.gap), "")
    for t in agent.trackers:
        t.gap = ""
    await chan.send(Protected(msg.snapshot, tuple((m.start, m.length, m.offset) for m in maps),
                              protect_ns, gap))


async def on_release(agent: Agent, chan: Channel, msg: Release) -> None:
    """The copy is over: take back the uffds, audit for escapes, let writers run, name the
    children forked meanwhile, unregister, and report. With `keep` (write tracking), nothing
    is un-protected or unregistered: the pages still protected stay so, and their next writes
    fault to us, which we forward as between snapshots."""
    for tracker in agent.trackers:
        tracker.coordinator_reads = False  # (delegated: it closed its copies before Release)
    await children_found(agent)  # so that `tracked` precedes `released`
    stop_core(agent)  # (fork events it read last: their children adopted)
    agent.departed.clear()
    escapes = [] if agent.hooks.get("no_escape_audit") else audit(agent)
    agent.releasing = True  # forks from now on are after the snapshot
    agent.keeping = msg.keep
    for tracker in list(agent.trackers):
        tracker.kept = msg.keep
        if msg.keep:
            tracker.protected = False  # (between snapshots: new mappings are a gap, not an
            # escape; the next protect reports them)
            # faults the coordinator or our core read and never answered: their writers
            # fault again, to our reader (which forwards them as between snapshots)
            tracker.wake_all()
        else:
            tracker.unprotect_all()  # writers run on
    if agent.lent:
        agent.lent = False
        agent.resumed.set()
    # children adopted last: still registered, so we can tell whether they live while we look
    # for their pids
    await children_found(agent)
    for tracker in list(agent.trackers):
        if not msg.keep:
            tracker.release()
        if tracker.pid is None and tracker.born_in_snapshot:
            agent.unnamed_children += 1  # tracked, never named (see find_child)
    agent.releasing = False
    # what we track now, before `released` (the coordinator's last look follows it): a child
    # that a task of ours named just now may not have said so yet
    await agent._report_tracked()
    await chan.send(Released(msg.snapshot, agent.log.faults, agent.log.hist.buckets(),
                             agent.log.hist.max_ns, tuple(escapes[:MAX_TEXTS]),
                             agent.unnamed_children))
    if not agent.trackers:
        await agent.tracked_changed()  # (ends us if our process is gone)


async def _forks_read_here_adopted(agent: Agent) -> None:
    """Delegated: the events our protect read (an ioctl met EAGAIN) are handled before the
    uffds go to the coordinator, so that a child forked meanwhile goes with them (here, once
    lent, nobody would serve its faults). Its own protect may read more: until none is left."""
    with trio.move_on_after(BACKLOG_S):
        while waiting := [t for t in agent.trackers if t.backlog]:
            for t in waiting:
                await agent.handle_backlog(t)


def _protect(agent: Agent, tracker: Tracker) -> list[Mapping]:
    skip = testhooks.for_pid(agent.hooks, "skip_protect", tracker.pid)
    core = agent.core

    def mapped() -> None:  # our core must place the first fault
        if core is not None:
            core.set_maps(tracker.ident, tracker.spans_with_offsets())

    try:
        return tracker.protect(leave_unprotected=skip.get("which", "all") if skip else None,
                               mapped=mapped)
    except ProcessLookupError:
        agent.drop(tracker)  # exited between two looks: nothing to protect
        return []
    except KernelError as e:
        if e.errno not in GONE:
            raise
        agent.drop(tracker)
        return []


async def children_found(agent: Agent) -> None:
    """Wait (bounded) until every child forked during the snapshot and still registered has been
    found in /proc and reported: the coordinator's last look for untracked writers follows our
    `released`, and must not mistake a child we track for one nobody does."""
    with trio.move_on_after(CHILD_SEARCH_S):
        while any(t.pid is None and t.registered and t.born_in_snapshot
                  for t in agent.trackers):
            await trio.sleep(0.002)  # find_child polls /proc: there is no event to wait on


async def _test_hold_protect(agent: Agent) -> None:
    """Test hook hold_protect: say so on the hook's FIFO, then protect only on SIGUSR1 (a
    deterministically slow protector, while the other agents protect at once)."""
    spec = testhooks.for_pid(agent.hooks, "hold_protect", agent.pid)
    if spec is None:
        return
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        line = f"held agent={os.getpid()} target={agent.pid}\n".encode()

        def say() -> None:
            with open(spec["fifo"], "wb") as fifo:
                fifo.write(line)

        await trio.to_thread.run_sync(say)
        async for _ in signals:
            break
