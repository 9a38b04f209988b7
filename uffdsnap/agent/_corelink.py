"""An agent's native core during a snapshot (agents mode): it reads the processes' uffds,
forwards faults over a fault channel to the coordinator's core and applies the un-protects that
come back, with no interpreter on a fault's path; Python handles only what needs policy."""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import TYPE_CHECKING

import trio

from uffdsnap.agent._children import adopt_child, departed_event
from uffdsnap.native import uffd as K
from uffdsnap.native.core import (
    FAULT_DEADLINE_MS,
    SC_EVENT,
    SC_FAILED,
    SC_GONE,
    SnapCore,
    describe_error,
)
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import FaultWaits
from uffdsnap.protocol import Abort

if TYPE_CHECKING:
    from uffdsnap.agent._agent import Agent

log = logging.getLogger(__name__)

FORWARD_IDENT = 0  # the core's name for the fault channel (trackers are 1, 2, ...)
WATCH_PERIOD_MAX_S = 0.1  # how often the watch reads /proc (at most)
ABORT_SEND_S = 0.1  # the watch's word to the coordinator may not delay the release longer
DEADLINE_MAX_S = 3600.0  # (the native core's limit)


class Deadline:
    """The fault deadline at this agent's end (seconds): the longest its core lets a frame
    wait for the coordinator, and, with a grace that lets a coordinator that still runs act
    first (its reason is the clearer one), the longest a writer of ours may wait on a fault
    before we release it ourselves. The coordinator's, from its `welcome` (set_fault_deadline;
    an agent host's agents all serve one coordinator)."""

    seconds = FAULT_DEADLINE_MS / 1000

    @classmethod
    def ours(cls) -> float:
        return cls.seconds + min(0.5, cls.seconds / 2)


def set_fault_deadline(seconds: float) -> None:
    """(Kept within what the core takes: from 1 ms to an hour.)"""
    Deadline.seconds = min(max(seconds, 0.001), DEADLINE_MAX_S)


def start_core(agent: Agent) -> socket.socket:
    """Lend every uffd to a native core that forwards faults over a new fault channel;
    return the coordinator's end of it (to be sent with a `faults` message)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        core = SnapCore.for_agent(agent.page_size)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    agent.core, agent._fault_sock = core, ours
    core.set_fault_deadline(Deadline.seconds)
    core.forward(FORWARD_IDENT, ours.fileno())
    for tracker in list(agent.trackers):
        tracker.lend(core, tracker.ident)
    assert agent._nursery is not None
    agent._nursery.start_soon(serve_core_events, agent, core)
    return theirs


def stop_core(agent: Agent) -> None:
    """Take the uffds back: what the core read but did not handle is applied now (moves,
    unmaps, and forks: their children are adopted while their parents are still protected) or
    goes to the backlogs (handled in order once we read again); its fault counts go into our
    log."""
    core, agent.core = agent.core, None
    if core is None:
        return
    core.stop()
    tracked = {t.ident for t in agent.trackers}
    events = [e for e in core.take_all_events() if e.kind == SC_EVENT]  # none left behind
    for tracker in list(agent.trackers):
        tracker.drain = None
        msgs = [e.msg for e in events if e.ident == tracker.ident]
        msgs += core.take_pending(tracker.ident)
        for i, msg in enumerate(msgs):
            # moves and unmaps now, so that a release that follows covers the right
            # ranges; the rest waits in the backlog for the reader
            event = K.decode_message(msg)
            try:
                if isinstance(event, K.Remap):
                    if not agent.hooks.get("ignore_remap"):  # (the hook: wrong on purpose)
                        tracker.remapped(event)
                elif isinstance(event, K.Unmap):
                    tracker.unmapped(event.start, event.end)
                elif isinstance(event, K.Fork) and agent._nursery is not None:
                    adopt_child(agent, tracker, event.uffd)  # now, as its parent is protected
                else:
                    tracker.backlog.append(event)
            except (KernelError, ProcessLookupError):
                agent.drop(tracker)  # its address space is gone
                for rest in msgs[i + 1:]:
                    K.close_fork_uffd(rest)
                break
    for e in events:  # a dropped tracker's (its process forked, then exited)
        if e.ident not in tracked:
            if agent._nursery is not None:
                departed_event(agent, e.ident, e.msg)
            else:
                K.close_fork_uffd(e.msg)  # we are ending: nobody will serve that child
    stats = core.stats()
    agent.log.faults += stats.faults
    agent.log.hist.merge(stats.service_buckets, stats.service_max_ns)
    trio.lowlevel.notify_closing(core.notify_fd)  # wakes serve_core_events, which ends
    core.close()
    if agent._fault_sock is not None:
        agent._fault_sock.close()
        agent._fault_sock = None


async def serve_core_events(agent: Agent, core: SnapCore) -> None:
    """Handle what the core cannot: fork/mremap/munmap/remove events (each pauses its uffd
    until handled here), processes gone, a broken fault channel."""
    while agent.core is core:
        try:
            await trio.lowlevel.wait_readable(core.notify_fd)
        except trio.ClosedResourceError:
            return  # the snapshot is over (stop_core)
        if agent.core is not core:
            return
        failed = ""
        for ev in core.take_events():
            tracker = next((t for t in agent.trackers if t.ident == ev.ident), None)
            if ev.kind == SC_FAILED:
                if ev.ident == FORWARD_IDENT and ev.err == errno.ETIMEDOUT:
                    # our faults cannot reach the coordinator: say so and end (which releases
                    # our processes and tells the coordinator), not wait silently
                    why = "the coordinator took no fault within the fault deadline"
                else:
                    why = describe_error(ev.err)
                where = ("fault channel" if ev.ident == FORWARD_IDENT else
                         f"serving pid {tracker.pid if tracker else '?'}")
                failed = failed or f"{where}: {why}"
            elif ev.kind == SC_GONE:
                if tracker is not None:
                    agent.drop(tracker)  # exited or exec'd
                elif ev.ident == FORWARD_IDENT:
                    # the coordinator closed it (it does before `release`, or when it drops
                    # us, failing the snapshot) or is gone (our connection ends too): either
                    # way a release comes, and faults wait for it
                    log.info("fault channel closed by the coordinator (%s)",
                             describe_error(ev.err) if ev.err else "end of file")
            elif ev.kind != SC_EVENT:
                continue  # (SC_SAVED, SC_UNPROTECT: not in an agent's core)
            elif tracker is None:
                departed_event(agent, ev.ident, ev.msg)  # its process exited meanwhile
            else:
                await agent._event(tracker, K.decode_message(ev.msg))
                if agent.core is core and tracker in agent.trackers:
                    core.set_maps(tracker.ident, tracker.spans_with_offsets())
                    core.resume(tracker.ident)
        if failed:
            agent._end(failed)
            return


def start_watch(agent: Agent) -> None:
    """From protect to release (our uffds lent to our core or to the coordinator): watch for a
    coordinator that stopped answering (see watch_coordinator). Test hook `no_stall_watch`:
    not (the negative control)."""
    if agent._nursery is not None and not agent.hooks.get("no_stall_watch"):
        agent._nursery.start_soon(watch_coordinator, agent, agent.resumed)


async def watch_coordinator(agent: Agent, released: trio.Event) -> None:
    """A writer of ours asleep on a write fault past the deadline means nobody answers it: a
    stopped or stuck coordinator (in delegated mode it reads our faults itself, so our core
    sees nothing, but /proc shows the writer waiting). End, which releases our processes (the
    coordinator, if it ever runs again, finds us gone and fails the snapshot)."""
    waits = FaultWaits()
    period = min(WATCH_PERIOD_MAX_S, Deadline.seconds / 8)
    while True:
        with trio.move_on_after(period):  # polling /proc: nothing signals a sleeping writer
            await released.wait()
            return
        pid, waited = waits.longest({t.pid for t in agent.trackers if t.pid}, time.monotonic())
        if waited >= Deadline.ours():
            why = (f"pid {pid}: a writer waited {waited:.1f} s on a write fault, past the fault "
                   f"deadline ({Deadline.seconds:g} s): the coordinator stopped answering; "
                   "released")
            with trio.move_on_after(ABORT_SEND_S):  # (its socket takes it: it is stopped)
                await agent._send(Abort(why))  # the reason it finds when it runs again
            agent._end(why)
            return
