"""The Agent: the trackers of one agent process (its process and descendants forked while
protected) and the trio tasks that serve them: the coordinator's messages, one fault reader and
one exit watcher per process. The native core's part is in _corelink, fork children in
_children, the escape audit in _audit."""

from __future__ import annotations

import logging
import os
import signal
import socket
import weakref
from typing import ClassVar

import trio

from uffdsnap import testhooks
from uffdsnap.agent._children import (
    adopt_child,
    delegated_event,
    departed_event,
    find_child,
)
from uffdsnap.agent._corelink import stop_core
from uffdsnap.agent._faultlog import FaultLog
from uffdsnap.agent._phases import on_protect, on_release
from uffdsnap.agent._written import flush_written, written_here
from uffdsnap.channel import Channel, PeerClosed
from uffdsnap.native import uffd as K
from uffdsnap.native.core import SnapCore
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import ObjectId, process_running
from uffdsnap.protocol import (
    Abort,
    Event,
    Fault,
    Gone,
    Message,
    Protect,
    ProtocolError,
    Release,
    Removed,
    Tracked,
    Unprotect,
)
from uffdsnap.stats import monotonic_ns
from uffdsnap.tracker import GONE, Tracker

log = logging.getLogger(__name__)

DEPARTED_KEPT = 256


class Agent:
    """The trackers of one agent (its process and descendants forked while protected) and the
    tasks that serve them: one fault reader and one exit watcher per process."""

    # every agent of this process (an agent host runs many): naming a fork child must not
    # mistake another agent's process for it
    _here: ClassVar[weakref.WeakSet[Agent]] = weakref.WeakSet()

    def __init__(self, pid: int, test_hooks: testhooks.Hooks | None = None,
                 handle_signals: bool = True):
        self.pid = pid
        self._handles_signals = handle_signals
        self.trackers: list[Tracker] = []
        self.log = FaultLog()
        self.ended: list[str] = []
        self._nursery: trio.Nursery | None = None
        self._chan: Channel | None = None
        # Between protect and release our Python tasks do not read the uffds: in delegated
        # mode the coordinator does (it holds copies), otherwise our native core does, which
        # forwards faults over a fault channel and applies the un-protects that come back.
        self.delegate = False
        self.lent = False
        self.resumed = trio.Event()
        self._next_ident = 1
        self.page_size = 0
        self.object_id = ObjectId(0, 0, 0)
        self.core: SnapCore | None = None
        self._fault_sock: socket.socket | None = None
        self.hooks: testhooks.Hooks = test_hooks or {}
        # trackers dropped lately (their process exited), by ident: a fork event of theirs may
        # still be on its way to us (read before the exit, handled after); its child is theirs
        self.departed: dict[int, Tracker] = {}
        Agent._here.add(self)
        self.unnamed_children = 0  # this snapshot's (see Released)
        self.releasing = False  # between un-protecting and unregistering, at release
        self.keeping = False  # the last release kept protection (write tracking)
        self.written: set[int] = set()  # since then: offsets of pages we un-protected
        self._backlog_locks: dict[Tracker, trio.Lock] = {}  # (see handle_backlog)

    def add(self, tracker: Tracker) -> None:
        if not tracker.ident:
            tracker.ident = self._next_ident
            self._next_ident += 1
        self.trackers.append(tracker)
        if self.core is not None:
            tracker.lend(self.core, tracker.ident)
        if self._nursery is not None:
            self._nursery.start_soon(self._read_faults, tracker)
            if tracker.pidfd >= 0:
                self._nursery.start_soon(self._watch_exit, tracker)

    def pids_tracked_here(self) -> set[int | None]:
        """The processes tracked by any agent of this process."""
        return {t.pid for agent in list(Agent._here) for t in agent.trackers}

    def drop(self, tracker: Tracker) -> None:
        """Stop tracking one process (it exited or exec'd away from the object), and tell the
        coordinator: a process that lives on (exec) is then no longer counted as tracked."""
        if tracker in self.trackers:
            log.debug("pid %s: no longer tracked (%d events read, not handled)", tracker.pid,
                      len(tracker.backlog))
            self.trackers.remove(tracker)
            self._backlog_locks.pop(tracker, None)  # a handler holding it keeps its own
            if tracker.pid is None and tracker.born_in_snapshot:
                self.unnamed_children += 1  # tracked from birth, gone before /proc showed it
            if self._nursery is not None:
                self._nursery.start_soon(self.tracked_changed)
            late: list[bytes] = []
            if self.core is not None:
                late = self.core.take_pending(tracker.ident)  # read, not yet handled
                self.core.remove(tracker.ident)
            self.departed[tracker.ident] = tracker
            while len(self.departed) > DEPARTED_KEPT:
                del self.departed[next(iter(self.departed))]
            for msg in late:
                departed_event(self, tracker.ident, msg)
            # forks an ioctl of ours read while retrying (EAGAIN), not handled yet: the children
            # live on, registered and perhaps protected
            forks = [e for e in tracker.backlog if isinstance(e, K.Fork)]
            tracker.backlog.clear()
            for fork in forks:
                if self._nursery is not None:
                    adopt_child(self, tracker, fork.uffd)
                else:
                    os.close(fork.uffd)  # we are ending: our uffds all close
            # tasks may be waiting on these fds: wake them (they see the tracker gone)
            trio.lowlevel.notify_closing(tracker.uffd)
            if tracker.pidfd >= 0:
                trio.lowlevel.notify_closing(tracker.pidfd)
            tracker.close()

    def release_all(self) -> None:
        stop_core(self)  # the core's thread must not read uffds we are about to close
        for tracker in list(self.trackers):
            try:
                tracker.release()
            except KernelError as e:
                report(f"releasing pid {tracker.pid}: {e}")
            tracker.close()
        self.trackers.clear()

    async def serve(self, chan: Channel) -> str:
        self._chan = chan
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for tracker in self.trackers:
                    nursery.start_soon(self._read_faults, tracker)
                    nursery.start_soon(self._watch_exit, tracker)
                if self._handles_signals:
                    nursery.start_soon(self._handle_signals)
                await self._messages(chan)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
        return self.ended[0] if self.ended else "done"

    def _end(self, why: str) -> None:
        self.ended.append(why)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _send(self, msg: Message) -> None:
        """Send to the coordinator; losing it ends the agent (which then releases everything)."""
        assert self._chan is not None
        try:
            await self._chan.send(msg)
        except (PeerClosed, ProtocolError, OSError) as e:
            self._end(f"lost the coordinator: {e}")

    async def _messages(self, chan: Channel) -> None:
        try:
            while True:
                msg, fds = await chan.receive()
                if self.ended or chan.conn.state.value == "closed":
                    for fd in fds:
                        os.close(fd)
                    return  # we are leaving (gone): what the coordinator had in flight is moot
                if isinstance(msg, Protect):
                    await on_protect(self, chan, msg)
                elif isinstance(msg, Unprotect):
                    for tracker in list(self.trackers):
                        self._unprotect(tracker, msg.ranges)
                    self.log.served(msg.ranges, self.trackers[0].page_size if self.trackers
                                    else 1, monotonic_ns())
                elif isinstance(msg, Event):
                    delegated_event(self, msg, fds)
                elif isinstance(msg, Release):
                    await on_release(self, chan, msg)
                elif isinstance(msg, Abort):
                    self.ended.append(f"coordinator aborted: {msg.reason}")
                    return
        except PeerClosed:
            self.ended.append("coordinator closed the connection")
        except ProtocolError as e:
            self.ended.append(f"protocol error: {e}")
            with trio.move_on_after(1):
                try:
                    await chan.send(Abort(f"protocol error: {e}"))
                except (PeerClosed, ProtocolError, OSError):
                    pass
        except KernelError as e:
            self.ended.append(str(e))
            with trio.move_on_after(1):
                try:
                    await chan.send(Abort(f"agent for pid {self.pid}: {e}"))
                except (PeerClosed, ProtocolError, OSError):
                    pass

    def _unprotect(self, tracker: Tracker, ranges: tuple[tuple[int, int], ...]) -> None:
        try:
            for off, length in ranges:
                tracker.unprotect(off, length)
        except KernelError as e:
            if e.errno not in GONE:
                raise
            self.drop(tracker)  # exited or exec'd: its old address space is gone

    async def _read_faults(self, tracker: Tracker) -> None:
        """Read this process's uffd: forward faults, follow fork/remap/unmap/remove."""
        while tracker in self.trackers:
            if not tracker.backlog:
                if self.lent:
                    await self.resumed.wait()
                    continue
                # Events drained during an EAGAIN retry wait in the backlog: look again soon.
                with trio.move_on_after(0.05):
                    try:
                        await trio.lowlevel.wait_readable(tracker.uffd)
                    except trio.ClosedResourceError:
                        return  # dropped
                if self.lent:
                    continue  # lent while we waited: the coordinator or our core reads now
                try:
                    tracker.backlog.extend(K.read_events(tracker.uffd))
                except KernelError:
                    self.drop(tracker)
                    return
            if tracker.backlog:
                await self.handle_backlog(tracker)

    async def handle_backlog(self, tracker: Tracker) -> None:
        """Handle, in order, the events read for `tracker` so far: by its reader, or before the
        uffds are delegated (one at a time: whoever comes second finds fewer)."""
        lock = self._backlog_locks.setdefault(tracker, trio.Lock())
        async with lock:
            while tracker.backlog and tracker in self.trackers:
                await self._event(tracker, tracker.backlog.popleft())

    async def _event(self, tracker: Tracker, event: K.UffdEvent) -> None:
        if isinstance(event, K.PageFault):
            offset = tracker.offset_of(event.address)
            if offset is None:
                # Events come in order (a move is read before any fault at its new address),
                # so a fault we cannot place means our address table is wrong: tracking is
                # lost. Ending releases (and wakes) everything, and fails the snapshot.
                self._end(f"pid {tracker.pid}: a write fault at {event.address:#x}, outside "
                          "every mapping of the object we know of: tracking lost")
                return
            if self.keeping and not self.lent:  # write tracking, between snapshots
                await written_here(self, tracker, offset)
                return
            self.log.seen(offset, monotonic_ns())  # duplicates (after a signal) go on too:
            await self._send(Fault(offset, event.tid, self.log.pending[offset]))  # idempotent
        elif isinstance(event, K.Fork):
            adopt_child(self, tracker, event.uffd)
        elif isinstance(event, K.Remap):
            if not self.hooks.get("ignore_remap"):  # (the hook: wrong on purpose)
                tracker.remapped(event)
        elif isinstance(event, K.Unmap):
            tracker.unmapped(event.start, event.end)
        elif isinstance(event, K.Remove):
            ranges = [(tracker.offset_of(a) or 0, n) for a, n in
                      tracker.spans_of(event.start, event.end)]
            if ranges:
                await self._send(Removed(tuple(ranges)))

    async def _watch_exit(self, tracker: Tracker) -> None:
        if tracker.pidfd < 0:
            return
        pid = tracker.pid
        try:
            await trio.lowlevel.wait_readable(tracker.pidfd)
        except trio.ClosedResourceError:
            # dropped meanwhile: its address space is gone. If the process lives on, it exec'd:
            # stay (drop() told the coordinator it is no longer tracked; our audit at release
            # reports it if the new program maps the object)
            if pid is not None and process_running(pid):
                return
        else:
            if tracker.address_space_alive():
                # the pid exited but this uffd's address space lives: a fork child was given
                # the wrong pid (its siblings are born in the same clock tick). Closing the uffd
                # would let the real one write untracked: name it again instead.
                log.warning("pid %s exited but its uffd's process lives: naming it again", pid)
                self.rename(tracker)
                return
        self.drop(tracker)

    async def tracked_changed(self) -> None:
        """After a drop: with nothing tracked and our process gone, we are done; otherwise the
        coordinator learns what we track now. Not while lent: in delegated mode a fork event
        the coordinator read may still be on its way (its parent forked, then exited), with a
        child to track; we end after the release."""
        if not self.trackers and not self.lent and not process_running(self.pid):
            await flush_written(self)
            await self._send(Gone("process exited"))
            self._end("process exited")
        else:
            await self._report_tracked()

    def rename(self, tracker: Tracker) -> None:
        """Forget a wrong pid of a fork child's tracker and search for the right one."""
        if tracker.pidfd >= 0:
            os.close(tracker.pidfd)
            tracker.pidfd = -1
        tracker.pid = None
        assert self._nursery is not None
        self._nursery.start_soon(self._report_tracked)
        self._nursery.start_soon(find_child, self, None, tracker)

    async def _report_tracked(self) -> None:
        await self._send(Tracked(tuple(t.pid for t in self.trackers if t.pid is not None)))

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                name = signal.Signals(signum).name
                with trio.move_on_after(1):
                    await self._send(Abort(f"agent for pid {self.pid} got {name}"))
                self._end(f"signal {name}")


def report(message: str) -> None:
    log.error("%s", message)
