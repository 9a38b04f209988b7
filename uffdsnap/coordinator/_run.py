"""One snapshot, driven: join → protect (faults held) → T → copy → release → verdict. The rules
are the policy's (_policy.py); this is the I/O around it: messages to agents, the /proc scans,
attaching newcomers, the native core and the copy threads, deadlines, test hooks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from uffdsnap import priority
from uffdsnap.coordinator import _report
from uffdsnap.coordinator._copy import StreamJob, copy_all, stream_all
from uffdsnap.coordinator._delta import TrackedRun
from uffdsnap.coordinator._native import CoreLink
from uffdsnap.coordinator._peers import Peer
from uffdsnap.coordinator._policy import BeforeT, FaultAction, Member, SnapshotPolicy
from uffdsnap.coordinator._removing import WATCH_S, Removing
from uffdsnap.coordinator._tracking import Plan
from uffdsnap.coordinator._verdict import final_facts, verdict
from uffdsnap.coordinator._watch import watch as watch_deadline
from uffdsnap.coordinator._watch import watched_release
from uffdsnap.errors import SnapshotFailed
from uffdsnap.image import ImageWriter
from uffdsnap.native.core import SnapCore
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import ScanUnstable, all_pids, parent_pid, process_label
from uffdsnap.protocol import MAX_RANGES, Fault, Protect, Release, Unprotect
from uffdsnap.stats import monotonic_ns

if TYPE_CHECKING:
    from uffdsnap.coordinator._server import Coordinator

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 10.0
FORK_REPORT_GRACE_S = 2.0  # how long a tracked parent's agent gets to report a forked child


class Run:
    """One snapshot in progress: its policy, image, native core, and the I/O that drives it."""

    def __init__(self, coord: Coordinator, run_id: int, writer: ImageWriter | None,
                 core: SnapCore, stream: StreamJob | None = None):
        self.coord = coord
        self.id = run_id
        self.writer = writer  # the image, or None when streamed (`stream`)
        self.stream = stream
        self.core = core
        self.policy = SnapshotPolicy(run_id, coord.page_size,
                                     serve_before_t=bool(coord.test_hooks.get("serve_before_t")))
        self.link = CoreLink(core, coord.obj.object_id, coord.page_size, coord.idents,
                             self.fail, self.removed, self.unprotect_everywhere)
        self.failed = trio.Event()
        self.changed = trio.Event()  # a member protected, left, or reported children
        self.timeline = _report.Timeline()
        self.held_wait_max_ns = 0
        self.bytes_scanned = 0
        self.paused_in: set[str] = set()
        self.existed: set[int] = set()  # every pid when the copy ended
        self.tracked: TrackedRun | None = None  # write tracking (see _delta): None when off
        self.removing = Removing()  # unsaved pages a remove event named: its punch may follow

    def track(self, plan: Plan, incremental: bool) -> None:
        self.tracked = TrackedRun(plan, incremental, self.core, self.coord.page_size)

    @property
    def failure(self) -> str | None:
        return self.policy.failure

    def fail(self, reason: str) -> None:
        if self.policy.fail(reason):
            self.failed.set()

    def changed_now(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # ---- events from the coordinator's connections ------------------------------------------

    def joined(self, peer: Peer) -> None:
        maps = self.coord.maps_object_writable(peer.pid)
        if self.policy.join(peer, peer.pid, peer.comm, maps):
            peer.released = trio.Event()
            peer.post_nowait(Protect(self.id))  # a fresh outbox has room
        self._note_failure()
        self.changed_now()

    def lost(self, peer: Peer, why: str) -> None:
        if peer in self.policy.members:
            alive = peer.any_alive()  # (before close_peer closes the uffds it lent us)
            self.link.close_peer(peer)
            self.policy.lost(peer, alive, why)
            peer.released.set()
            self._note_failure()
            self.changed_now()

    def gone(self, peer: Peer, reason: str) -> None:
        self.policy.gone(peer, reason)
        peer.released.set()
        self.changed_now()

    def protected(self, peer: Peer, msg_snapshot: int) -> None:
        if msg_snapshot != self.id:
            return
        self.link.relay_for(peer)
        early = self.policy.protected(peer, len(peer.mappings), peer.protect_ns)
        if self.policy.serve_before_t:  # test hook, wrong on purpose: serve before T
            self.core.go()
            for held in early:
                self._serve(peer, held.offset)
        self.changed_now()

    def fault(self, peer: Peer, msg: Fault) -> None:
        page = msg.offset // self.coord.page_size
        action = self.policy.fault(peer, msg.offset, msg.seen_ns, bool(self.core.saved[page]))
        if action == FaultAction.SAVE:
            self._serve(peer, msg.offset)
        elif action == FaultAction.WAKE:
            if self.tracked is not None:
                self.tracked.mark_written(msg.offset, self.coord.page_size)
            self.coord.wake(peer, msg.offset)

    def written_before_t(self, ranges: tuple[tuple[int, int], ...]) -> bool:
        """Pages an agent un-protected itself between snapshots: until T, this snapshot's
        (True); after T, not (False)."""
        if self.tracked is None or self.timeline.t_mono:
            return False
        self.tracked.written_before_t(ranges)
        return True

    def removed(self, ranges: list[tuple[int, int]]) -> None:
        """MADV_REMOVE hit these ranges: unsaved pages that are holes now lost their content;
        the others are looked at until the copy is over (watch_removed: the punch follows)."""
        ps = self.coord.page_size
        unsaved = [page for off, length in ranges
                   for page in range(off // ps, min((off + length) // ps, len(self.core.saved)))
                   if not self.core.saved[page]]
        if self.tracked is not None:
            unsaved += self.tracked.removed(ranges)
        self.policy.removed(self.removing.note(unsaved, self.coord.obj, ps))
        self._note_failure()

    def unprotect_everywhere(self, ranges: list[tuple[int, int]]) -> None:
        """Saved ranges (relayed by the core's batcher) for agents on the main connection."""
        for start in range(0, len(ranges), MAX_RANGES):
            msg = Unprotect(tuple(sorted(ranges[start:start + MAX_RANGES])))
            for peer in self.coord.peers:
                if peer.can_unprotect() and not peer.delegated and peer.fault_channel < 0:
                    if not peer.post_nowait(msg):
                        self.fail(f"agent for pid {peer.pid} ({peer.comm}) stopped answering")

    def _serve(self, peer: Peer, offset: int) -> None:
        """Save a faulting page (the core un-protects it everywhere), wake the faulting one."""
        try:
            self.core.save_page(offset // self.coord.page_size)
        except KernelError as e:
            self.fail(f"saving a faulting page: {e}")
        self.coord.wake(peer, offset)

    def _note_failure(self) -> None:
        if self.policy.failure is not None:
            self.failed.set()

    # ---- the snapshot -------------------------------------------------------------------------

    async def take(self) -> dict[str, Any]:
        coord, t = self.coord, self.timeline
        t.start = monotonic_ns()
        self._check_size("since the coordinator opened it")
        self.core.set_fault_deadline(coord.fault_deadline)
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on, self.failed, scope)
                    nursery.start_soon(self.link.serve_events, self._channel_lost)
                    nursery.start_soon(watch_deadline, self)  # no writer waits on us longer
                    await _way_to_t(self)
                    nursery.start_soon(coord.escape_audit.audit_armed, self)
                    nursery.start_soon(watch_removed, self)
                    await test_pause(self, "copying")
                    await self._copy()
                    check_removing(self)  # (punched since the watch last looked)
                    await coord.escape_audit.after_copy(self)  # (--strict may fail us)
                    self._check_size("during the snapshot")
                    await test_pause(self, "finishing")
                    # who could have written during the snapshot: processes born after this
                    # (a fork chain's next one, once we released) could not
                    self.existed = set(all_pids())
                    scope.cancel()
            if self.failure:
                raise SnapshotFailed(self.failure)
            t.copied = monotonic_ns()
        finally:
            with trio.CancelScope(shield=True):
                await watched_release(self, self._release)  # (an agent stuck at release)
                facts = final_facts(self)
        verdict(self, *facts)
        return _summary(self)

    def _check_size(self, when: str) -> None:
        """Write-protect does not see a truncation (like a hole punch): an object whose size
        changed has no one state at T to save, so the snapshot fails rather than save zeros."""
        obj = self.coord.obj
        size = os.fstat(obj.fd).st_size
        if size != obj.size:
            self.fail(f"the object changed size {when} ({obj.size} -> {size} bytes): it has no "
                      "one state to save; snapshot it again (a long-running coordinator: "
                      "restart it)")

    async def _protect(self) -> None:
        """Protect every member; before T, make sure no writable mapper is left untracked
        (attaching newcomers when we can). Returns at T; a failure cancels us."""
        hooks, coord = self.coord.test_hooks, self.coord
        self.timeline.protect = monotonic_ns()
        members = self.policy.start_protect()
        if hooks.get("no_protect"):  # wrong on purpose: copy while nothing is protected
            self.policy.skip_protection()
            return
        for peer in members:
            peer.released = trio.Event()
            peer.release_stats = None
            await peer.post(Protect(self.id), self.fail)
        forks_settled_at: float | None = None
        with trio.move_on_after(coord.protect_timeout) as timeout:
            while True:
                while not self.policy.all_protected():
                    await self.changed.wait()
                await test_pause(self, "protecting")
                if hooks.get("ignore_late_mappers"):  # wrong on purpose
                    return
                tracked = self.policy.tracked_pids()
                try:
                    untracked = coord.untracked_writers(tracked)
                except ScanUnstable as e:
                    self.policy.fail(str(e))
                    break
                attachable = coord.attachable(untracked)
                # children of tracked processes (a fork event brought their uffd; the agent
                # reports them once found), or already registered: wait for their report
                children = any(parent_pid(pid) in tracked or pid not in attachable
                               for pid in untracked)
                settled = forks_settled_at is not None and trio.current_time() >= forks_settled_at
                decision = self.policy.before_t([process_label(p) for p in untracked], children,
                                                coord.attacher is not None, settled)
                decision = await coord.escape_audit.before_t(self, decision)  # (--strict)
                log.debug("before T: tracked %s, untracked %s (attachable %s): %s",
                          sorted(tracked), untracked, attachable, decision.value)
                if decision == BeforeT.DECLARE_T:
                    return
                if decision == BeforeT.FAIL:
                    break
                if decision == BeforeT.WAIT_FOR_FORKS:
                    if forks_settled_at is None:
                        forks_settled_at = trio.current_time() + FORK_REPORT_GRACE_S
                    with trio.move_on_at(forks_settled_at):
                        await self.changed.wait()  # an agent reports its children
                    continue
                await coord.attach(attachable)  # they join mid-protect and are sent Protect
        if timeout.cancelled_caught:
            self.policy.protect_timed_out(coord.protect_timeout)
        self._note_failure()
        await trio.sleep_forever()  # the failure cancels us

    def _declare_t(self) -> None:
        """T. The core serves the faults it held, then every fault as it comes; ours first."""
        held = self.policy.declare_t()
        if self.tracked is not None:
            self.tracked.decide(self.coord.tracking,
                                [(p, f"pid {p.pid} ({p.comm})") for p in self.policy.members],
                                str(self.stream.sender.address) if self.stream else "")
        self.core.go()
        now = monotonic_ns()
        for fault in held:
            self.held_wait_max_ns = max(self.held_wait_max_ns, now - fault.seen_ns)
            self._serve(fault.key, fault.offset)  # type: ignore[arg-type]

    async def _copy(self) -> None:
        coord = self.coord
        delay_s = float(coord.test_hooks.get("scan_delay_s", 0))
        tracked = self.tracked
        if self.stream is not None:  # to a receiver, at the link's pace
            self.bytes_scanned, error = await stream_all(
                self.core, self.stream, coord.obj.fd, coord.obj.size, coord.page_size,
                coord.chunk_bytes, self.timeline.t_wall, self.failed, coord.on_progress,
                delay_s, tracked.windows(coord.obj.size, coord.chunk_bytes, gaps=True)
                if tracked else None, tracked.parent_field() if tracked else None)
        else:
            assert self.writer is not None
            windows = tracked.windows(coord.obj.size, coord.chunk_bytes) if tracked else None
            self.bytes_scanned, error = await copy_all(
                self.core, self.writer, coord.obj.fd, coord.obj.size, coord.page_size,
                coord.chunk_bytes, self.failed, coord.on_progress, delay_s, windows)
        if error:
            self.fail(error)

    async def _release(self) -> None:
        """Everyone un-protects (done or failed); wait (bounded) for their word."""
        self.link.stop()
        for peer in self.coord.peers:
            self.link.close_peer(peer)  # before the agents read their uffds again
        # tracking writes: protection stays (the record of what is written next) unless the
        # snapshot failed
        keep = self.tracked is not None and not self.failure
        for peer in self.coord.peers:
            peer.keeps_protection = keep and peer in self.policy.members
        for peer in self.policy.start_release():
            if peer.chan.conn.state.value in ("protecting", "active"):
                if not peer.post_nowait(Release(self.id, keep)):
                    peer.chan.close()  # closing releases the agent as surely as a message
            else:  # never protected: nothing to release, nothing to audit
                self.policy.released(peer, ())
                peer.released.set()
        with trio.move_on_after(RELEASE_TIMEOUT_S):
            for peer in list(self.policy.members):
                await peer.released.wait()  # type: ignore[attr-defined]
        self.coord.stuck_agents([p for p in self.policy.members  # type: ignore[misc]
                                 if not p.released.is_set()])  # type: ignore[attr-defined]
        if self.tracked is not None and keep and not self.failure:
            self.tracked.kept_agents = {p for p in self.policy.members  # type: ignore[misc]
                                        if p.release_stats is not None}  # type: ignore

    def released(self, peer: Peer) -> None:
        stats = peer.release_stats
        self.policy.released(peer, stats.escapes if stats else ())
        peer.released.set()

    def _channel_lost(self, peer: Peer) -> None:
        """A fault channel ended: fine if the agent's processes are gone, otherwise its writers
        would wait for un-protects that cannot come."""
        if peer in self.policy.members and not peer.released.is_set() and peer.any_alive():
            self.fail(f"agent for pid {peer.pid} ({peer.comm}) lost: its fault channel closed")


async def _way_to_t(run: Run) -> None:
    """Join (a first snapshot), protect, declare T: at the highest share we may take (see
    priority), our agent host too from the first protect, when writers start being held (not
    while it injects: the targets it waits on would wait longer)."""
    coord = run.coord
    with priority.urgent():
        if coord.attacher is not None and not coord.peers:
            with contextlib.suppress(ScanUnstable):  # (the look before T decides)
                await coord.attach_first()
        await test_pause(run, "joining")
        coord.escape_audit.arm(run)  # (it runs beside the copy: T does not wait)
        host = coord.attacher.host_pid if coord.attacher is not None else None
        with priority.urgent_thread(host):
            await run._protect()
            run.timeline.t_mono, run.timeline.t_wall = monotonic_ns(), time.time_ns()
            run._declare_t()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _summary(run: Run) -> dict[str, Any]:
    members = list(run.policy.members)

    def described(peer: Peer, member: Member) -> dict[str, Any]:
        # every child it tracked during the snapshot, those that exited since included
        stats = peer.release_stats
        return {**peer.describe(), "children": sorted(member.children_seen),
                "children_unnamed": stats.unnamed_children if stats else 0}

    out = _report.summary(
        mode="delegated" if run.coord.delegate else "agents", obj=run.coord.obj,
        timeline=run.timeline, core=run.core.stats(),
        processes=[described(p, run.policy.members[p]) for p in members],  # type: ignore
        gone=[{**described(k, m), "reason": why} for k, m, why in run.policy.departed],
        agent_hists=[(p.release_stats.service_hist, p.release_stats.service_max_ns)
                     for p in members if p.release_stats],  # type: ignore[attr-defined]
        faults=run.policy.faults, duplicate_faults=run.policy.duplicate_faults,
        held_wait_max_ns=run.held_wait_max_ns, fault_channels=run.link.fault_channels,
        bytes_scanned=run.bytes_scanned, escapes=run.coord.escape_audit.report(run.id))
    tracked = run.tracked
    out["image_kind"] = "delta" if tracked is not None and tracked.plan.delta else "full"
    if tracked is not None:
        out["incremental"] = tracked.summary()
    return out


def check_removing(run: Run) -> None:
    """A page a remove event named while unsaved that is a hole now (punched since we handled
    the event, perhaps before the page was saved: zeros saved) fails the snapshot."""
    run.policy.removed(run.removing.holes(run.coord.obj, run.coord.page_size))
    run._note_failure()


async def watch_removed(run: Run) -> None:
    """Until the copy is over (cancelled): look for the punches of the remove events handled
    before them, so that a snapshot they spoil fails at once (not only after the copy)."""
    while run.policy.failure is None:
        await run.removing.wait()
        check_removing(run)
        await trio.sleep(WATCH_S)


async def test_pause(run: Run, phase: str) -> None:
    """Test hooks: `at_phase` (our test's code, in-process), or `pause_in` (say so on
    stderr and stay in this phase, serving faults, until SIGUSR1, an agent joins or leaves,
    the snapshot fails, or we are killed). Once per phase per snapshot."""
    hooks = run.coord.test_hooks
    at_phase: Callable[[], Awaitable[None]] | None = hooks.get("at_phase", {}).get(phase)
    if phase in run.paused_in or (at_phase is None and hooks.get("pause_in") != phase):
        return
    run.paused_in.add(phase)
    if at_phase is not None:
        await at_phase()
        return
    # the change to wait for is any after we say we paused (the test acts on that line,
    # and what it causes may be handled before our waiting task first runs)
    changed = run.coord.peers_changed
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        log.warning("test hook: paused in %s", phase)
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

            async def on_peers() -> None:
                await changed.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(on_signal)
            nursery.start_soon(on_peers)
