"""Bounded waits for writers: the fault deadline, watched from /proc while a snapshot runs.

The native core bounds what it sends (an un-protect a peer leaves unread past the deadline drops
that peer); this watch bounds what nobody sends. A writer of a tracked process asleep on a
userfaultfd past the fault deadline (a fault held before T, an agent that stopped reading or
answering) fails the snapshot, whose release wakes it; so does an agent whose process has been
stopped (SIGSTOP) that long, since it can answer nothing. An agent host on the fault path that
stops answering is killed, which releases every target it holds (the kernel closes their uffds).
It reads /proc because the stuck party cannot be asked. Test hooks `no_stall_watch` and
`no_unprotect_for_stopped`: off (the negative controls of tests/system/test_stalls.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from uffdsnap.coordinator._peers import Peer
from uffdsnap.coordinator._policy import Phase
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import FaultWaits, process_comm, process_stopped
from uffdsnap.stats import monotonic_ns

if TYPE_CHECKING:
    from uffdsnap.coordinator._run import Run

log = logging.getLogger(__name__)

PERIOD_MAX_S = 0.1  # how often /proc is read (at most; an eighth of the deadline if shorter)


def period(deadline_s: float) -> float:
    return min(PERIOD_MAX_S, deadline_s / 8)


async def watch(run: Run) -> None:
    """Until cancelled (through the release too): enforce the fault deadline."""
    if run.coord.test_hooks.get("no_stall_watch"):  # wrong on purpose
        return
    deadline = run.coord.fault_deadline
    waits = FaultWaits()
    stopped: dict[int, float] = {}  # agent pid -> first seen stopped
    while True:
        await trio.sleep(period(deadline))  # polling /proc: nothing signals a sleeping writer
        now = time.monotonic()
        _check_writers(run, waits, now, deadline)
        _check_agents(run, stopped, now, deadline)


def _check_writers(run: Run, waits: FaultWaits, now: float, deadline: float) -> None:
    owners = {pid: peer for peer, member in run.policy.members.items()
              for pid in member.pids}
    pid, waited = waits.longest(set(owners), now)
    held = run.policy.oldest_held()  # (faults held on the main connection: a test hook's)
    if held is not None and isinstance(held.key, Peer):
        held_s = (monotonic_ns() - held.seen_ns) / 1e9
        if held_s > waited:
            pid, waited = held.key.pid, held_s
    if waited < deadline or pid not in owners:
        return
    peer = owners[pid]
    on_fault_path = run.policy.phase != Phase.PROTECTING and not run.coord.delegate
    answerer = (_describe(run, peer) if on_fault_path else
                "the fault service (delegated mode: our native core)")
    run.fail(run.policy.writer_overdue(f"pid {pid} ({process_comm(pid)})", waited, deadline,
                                       answerer))
    if on_fault_path:
        _kill_host(run, peer, f"pid {pid} waited {waited:.1f} s on a write fault")


def _check_agents(run: Run, stopped: dict[int, float], now: float, deadline: float) -> None:
    seen = set()
    for peer in list(run.policy.members):
        assert isinstance(peer, Peer)
        agent = peer.agent_pid
        if not agent or agent in seen:
            continue
        seen.add(agent)
        if not process_stopped(agent):
            stopped.pop(agent, None)
            continue
        since = stopped.setdefault(agent, now)
        if now - since >= deadline:
            run.fail(run.policy.agent_stopped(_describe(run, peer), now - since, deadline))
            _kill_host(run, peer, f"stopped for {now - since:.1f} s")
    for agent in set(stopped) - seen:
        del stopped[agent]


def _describe(run: Run, peer: Peer) -> str:
    """The agent that answers for `peer`'s processes, in words."""
    if peer.mode == "attach" and run.coord.attacher is not None:
        targets = sorted(p.pid for p in run.policy.members  # type: ignore[attr-defined]
                         if p.mode == "attach")
        return f"the agent host (pid {peer.agent_pid}) of pids {targets}"
    return f"the agent (pid {peer.agent_pid}) of pid {peer.pid} ({peer.comm})"


def _kill_host(run: Run, peer: Peer, why: str) -> None:
    """Attach agents are ours: their host is killed, which releases every target it holds.
    (An enlisted agent belongs to its workload: the snapshot's failure is all we do.)"""
    attacher = run.coord.attacher
    if peer.mode == "attach" and attacher is not None and attacher.host_pid == peer.agent_pid:
        attacher.kill_host(f"the agent for pid {peer.pid} stopped answering ({why})")


async def watched_release(run: Run, release: Callable[[], Awaitable[None]]) -> None:
    """The release (`release`), with the deadline still enforced: an agent host that stops
    then is killed rather than waited for; a failed snapshot's stopped agents' processes are
    un-protected first where we can (release_for_stopped)."""
    if run.failure and not run.coord.test_hooks.get("no_unprotect_for_stopped"):
        release_for_stopped(run)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, run)
        await release()
        nursery.cancel_scope.cancel()


def release_for_stopped(run: Run) -> None:
    """A failed snapshot is released by its agents; one that is stopped cannot, so where we
    hold copies of its uffds (delegated mode) we un-protect its processes ourselves, before
    our copies close: its writers would otherwise wait until it is continued. (In agents mode
    it holds the only references: see docs/overview.md, bounded waits.)"""
    for peer in list(run.policy.members):
        assert isinstance(peer, Peer)
        if not peer.delegated or not peer.agent_pid or not process_stopped(peer.agent_pid):
            continue
        for tracker in list(peer.delegated):
            try:
                tracker.unprotect_all()
            except KernelError as e:
                log.warning("un-protecting pid %s for its stopped agent: %s", tracker.pid, e)
