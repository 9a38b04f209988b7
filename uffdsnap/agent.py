"""The agent: one per tracked process, a separate process from it (a thread inside a Python
workload would deadlock on the GIL while the workload is blocked on a protected page).

It holds the only reference to its process's uffd, so its death releases the process. It translates
object offsets ⇄ addresses for every mapping of the object in that process, registers and protects
on command, forwards write faults as offsets, applies un-protect + wake, and reports exit. Every way
out — coordinator gone, abort, protocol error, signal, crash — releases protection first.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from uffdsnap.channel import Channel, PeerClosed, connect
from uffdsnap.kernel import uffd as K
from uffdsnap.kernel._libc import KernelError
from uffdsnap.kernel.pidfd import pidfd_open
from uffdsnap.kernel.procmaps import Mapping, ObjectId, mappings_of
from uffdsnap.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Fault,
    Gone,
    Hello,
    Message,
    Protect,
    Protected,
    ProtocolError,
    Release,
    Released,
    Removed,
    Role,
    Tracked,
    Unprotect,
    Welcome,
)
from uffdsnap.stats import LatencyHistogram

JOIN_TIMEOUT_S = 30.0
# Features asked of the kernel for a snapshot uffd (those it lacks are simply not requested,
# except the required ones, whose absence fails the API call with a clear error).
WANTED_FEATURES = K.REQUIRED_FEATURES | K.FEATURES["THREAD_ID"] | K.EVENT_FEATURES


def monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def negotiate(uffd: int) -> K.ApiInfo:
    """Enable the snapshot features on `uffd`, or fail naming the ones this kernel lacks."""
    supported = K.supported_features()
    missing = K.REQUIRED_FEATURES & ~supported
    if missing:
        raise KernelError("UFFDIO_API", errno.EINVAL, f"features={WANTED_FEATURES:#x}",
                          f"kernel lacks {', '.join(K.feature_names(missing))}")
    return K.api(uffd, WANTED_FEATURES & supported)


# errnos with which a uffd ioctl says its creator's address space is gone (exit or exec):
# REGISTER/UNREGISTER report ENOMEM, the others ESRCH.
GONE = (errno.ESRCH, errno.ENOMEM)
EAGAIN_RETRIES = 2000


@dataclass(eq=False)
class Tracker:
    """The uffd of one process and its mappings of the object: protect, translate, release.

    `pid` is None for a child forked during a snapshot until we have found it in /proc; its
    mappings are then the parent's at the fork (the kernel copied them, registered and
    write-protected, into the child).
    """

    uffd: int
    pid: int | None
    object_id: ObjectId
    page_size: int
    mappings: list[Mapping] = field(default_factory=list)
    registered: list[tuple[int, int]] = field(default_factory=list)  # (start, end)
    protected: bool = False
    backlog: deque[K.UffdEvent] = field(default_factory=deque)
    pidfd: int = -1
    # Clock ticks since boot (the unit of /proc/PID/stat start times) when this process was
    # first registered: only children started since then can arrive with a fork event.
    registered_since: int = 0

    def _call(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run one uffd ioctl; while a fork/remap/remove event is pending the kernel answers
        EAGAIN: read the pending events (kept in `backlog` for the reader) and retry."""
        for _ in range(EAGAIN_RETRIES):
            try:
                fn(*args, **kwargs)
                return
            except KernelError as e:
                if e.errno != errno.EAGAIN:
                    raise
            events = K.read_events(self.uffd)
            self.backlog.extend(events)
            if not events:
                time.sleep(0.0001)
        raise KernelError("uffd ioctl", errno.EAGAIN, f"uffd={self.uffd}",
                          "an event stayed pending; the process is changing its mappings")

    def refresh(self) -> None:
        """Re-read this process's mappings of the object (once we know its pid)."""
        if self.pid is not None:
            self.mappings = mappings_of(self.pid, self.object_id)

    def protect(self) -> list[Mapping]:
        """Register and write-protect every shared mapping of the object in the process."""
        self.refresh()
        self.protected = True
        if not self.registered:
            self.registered_since = boot_ticks()
        for m in self.mappings:
            self._call(K.register, self.uffd, m.start, m.length, K.REGISTER_MODE_WP)
            self._call(K.writeprotect, self.uffd, m.start, m.length, protect=True)
        self.registered = [(m.start, m.end) for m in self.mappings]
        return self.mappings

    def remapped(self, event: K.Remap) -> None:
        """mremap moved [old, old+len) to new: the kernel moved the registration and the
        protected PTEs with it. Follow it, and protect any part that is new (a grown mapping)."""
        delta = event.new_address - event.old_address
        lo, hi = event.old_address, event.old_address + event.length

        def moved(a: int, b: int) -> tuple[int, int]:
            return (a + delta, b + delta) if lo <= a and b <= hi else (a, b)

        self.registered = [moved(a, b) for a, b in self.registered]
        self.mappings = [replace(m, start=moved(m.start, m.end)[0], end=moved(m.start, m.end)[1])
                         for m in self.mappings]
        self._adopt()

    def unmapped(self, start: int, end: int) -> None:
        """[start, end) was unmapped: forget it."""
        self.registered = _cut(self.registered, start, end)
        self.mappings = [m for m in self.mappings if m.end <= start or m.start >= end] + [
            replace(m, start=a, end=b, offset=m.offset + a - m.start)
            for m in self.mappings if not (m.end <= start or m.start >= end)
            for a, b in _cut([(m.start, m.end)], start, end)]
        self._adopt()

    def _adopt(self) -> None:
        """After the layout changed: re-read it if we can, and register (and, during a snapshot,
        protect) whatever part of it is not covered by what we registered."""
        self.refresh()
        if not self.protected:
            return
        for m in self.mappings:
            if not _covered(m.start, m.end, self.registered):
                self._call(K.register, self.uffd, m.start, m.length, K.REGISTER_MODE_WP)
                self._call(K.writeprotect, self.uffd, m.start, m.length, protect=True)
        self.registered = [(m.start, m.end) for m in self.mappings]

    def offset_of(self, address: int) -> int | None:
        """Page-aligned object offset of a faulting address, None if outside every mapping."""
        for m in self.mappings:
            off = m.offset_of(address)
            if off is not None:
                return off - off % self.page_size
        return None

    def spans(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(address, length) of object range [offset, offset+length) in every mapping."""
        end = offset + length
        out = []
        for m in self.mappings:
            lo, hi = max(offset, m.offset), min(end, m.offset + m.length)
            if lo < hi:
                out.append((m.start + lo - m.offset, hi - lo))
        return out

    def unprotect(self, offset: int, length: int) -> None:
        """Un-protect object range [offset, offset+length) in every mapping, waking waiters."""
        for address, span in self.spans(offset, length):
            self._call(K.writeprotect, self.uffd, address, span, protect=False)

    def release(self) -> None:
        """Un-protect and unregister everything registered; tolerate a process that is gone."""
        self.protected = False
        for start, end in self.registered:
            for op in (K.writeprotect, K.unregister):
                try:
                    if op is K.writeprotect:
                        self._call(K.writeprotect, self.uffd, start, end - start, protect=False)
                    else:
                        self._call(K.unregister, self.uffd, start, end - start)
                except KernelError as e:
                    if e.errno not in (*GONE, errno.EINVAL, errno.ENOENT):
                        raise
        self.registered = []

    def close(self) -> None:
        os.close(self.uffd)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _cut(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """`ranges` minus [start, end)."""
    out = []
    for a, b in ranges:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


def _covered(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    """True if [start, end) lies inside the union of `ranges`."""
    pos = start
    for a, b in sorted(ranges):
        if a <= pos < b:
            pos = b
        if pos >= end:
            return True
    return pos >= end


class _FaultLog:
    """Pending faults by offset (first time seen) and the service-time histogram."""

    def __init__(self) -> None:
        self.pending: dict[int, int] = {}
        self.hist = LatencyHistogram()
        self.faults = 0

    def seen(self, offset: int, now: int) -> bool:
        """Record a fault; False if the page already has one pending (a duplicate)."""
        self.faults += 1
        if offset in self.pending:
            return False
        self.pending[offset] = now
        return True

    def served(self, ranges: tuple[tuple[int, int], ...], page_size: int, now: int) -> None:
        if not self.pending:
            return
        for off, length in ranges:
            if length // page_size <= len(self.pending):
                for page in range(off, off + length, page_size):
                    t0 = self.pending.pop(page, None)
                    if t0 is not None:
                        self.hist.record(now - t0)
            else:
                for page in [p for p in self.pending if off <= p < off + length]:
                    self.hist.record(now - self.pending.pop(page))

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


async def _join(chan: Channel, pid: int, mode: str) -> Welcome:
    await chan.send(Hello(PROTOCOL_VERSION, Role.AGENT.value, pid, mode, _comm(pid)))
    with trio.fail_after(JOIN_TIMEOUT_S):
        msg = await chan.receive()
    if not isinstance(msg, Welcome):
        raise ProtocolError(f"coordinator answered {msg.TYPE} instead of welcome")
    return msg


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


async def run_agent(coordinator: str, pid: int, uffd: int, mode: str,
                    on_joined: Callable[[], None] | None = None) -> str:
    """Track process `pid` through `uffd` (which this call now owns) for `coordinator`.

    Returns why it ended ("process exited", "coordinator closed the connection", ...). Whatever
    happens, every tracked process is left un-protected and unregistered and every uffd closed.
    """
    try:
        pidfd = pidfd_open(pid)
    except BaseException:
        os.close(uffd)
        raise
    agent = Agent(pid)
    try:
        negotiate(uffd)
        chan = await connect(coordinator, Role.AGENT)
        try:
            welcome = await _join(chan, pid, mode)
            obj = ObjectId(welcome.major, welcome.minor, welcome.inode)
            agent.add(Tracker(uffd, pid, obj, welcome.page_size, pidfd=pidfd))
            uffd = pidfd = -1  # the tracker owns them now
            if on_joined is not None:
                on_joined()
            return await agent.serve(chan)
        finally:
            chan.close()
    finally:
        agent.release_all()
        if uffd >= 0:
            os.close(uffd)
        if pidfd >= 0:
            os.close(pidfd)


class Agent:
    """The trackers of one agent (its process and descendants forked while protected) and the
    tasks that serve them: one fault reader and one exit watcher per process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.trackers: list[Tracker] = []
        self.log = _FaultLog()
        self.ended: list[str] = []
        self._nursery: trio.Nursery | None = None
        self._chan: Channel | None = None

    def add(self, tracker: Tracker) -> None:
        self.trackers.append(tracker)
        if self._nursery is not None:
            self._nursery.start_soon(self._read_faults, tracker)
            if tracker.pidfd >= 0:
                self._nursery.start_soon(self._watch_exit, tracker)

    def drop(self, tracker: Tracker) -> None:
        """Stop tracking one process (it exited or exec'd away from the object)."""
        if tracker in self.trackers:
            self.trackers.remove(tracker)
            tracker.close()

    def release_all(self) -> None:
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
                msg = await chan.receive()
                if isinstance(msg, Protect):
                    self.log.reset()
                    t0 = monotonic_ns()
                    maps = [m for t in list(self.trackers) for m in self._protect(t)]
                    await chan.send(Protected(
                        msg.snapshot, tuple((m.start, m.length, m.offset) for m in maps),
                        monotonic_ns() - t0))
                elif isinstance(msg, Unprotect):
                    for tracker in list(self.trackers):
                        self._unprotect(tracker, msg.ranges)
                    self.log.served(msg.ranges, self.trackers[0].page_size if self.trackers
                                    else 1, monotonic_ns())
                elif isinstance(msg, Release):
                    for tracker in list(self.trackers):
                        tracker.release()
                    await chan.send(Released(msg.snapshot, self.log.faults, self.log.hist.buckets(),
                                             self.log.hist.max_ns))
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

    def _protect(self, tracker: Tracker) -> list[Mapping]:
        try:
            return tracker.protect()
        except ProcessLookupError:
            self.drop(tracker)  # exited between two looks: nothing to protect
            return []
        except KernelError as e:
            if e.errno not in GONE:
                raise
            self.drop(tracker)
            return []

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
                # Events drained during an EAGAIN retry wait in the backlog: look again soon.
                with trio.move_on_after(0.05):
                    await trio.lowlevel.wait_readable(tracker.uffd)
                try:
                    tracker.backlog.extend(K.read_events(tracker.uffd))
                except KernelError:
                    self.drop(tracker)
                    return
            while tracker.backlog:
                await self._event(tracker, tracker.backlog.popleft())

    async def _event(self, tracker: Tracker, event: K.UffdEvent) -> None:
        if isinstance(event, K.PageFault):
            offset = tracker.offset_of(event.address)
            if offset is None:
                # Not a mapping of the object (it moved away under us): never leave it waiting.
                page = event.address - event.address % tracker.page_size
                tracker._call(K.wake, tracker.uffd, page, tracker.page_size)
                return
            self.log.seen(offset, monotonic_ns())  # duplicates (after a signal) go on too:
            await self._send(Fault(offset, event.tid, self.log.pending[offset]))  # idempotent
        elif isinstance(event, K.Fork):
            child = Tracker(event.uffd, None, tracker.object_id, tracker.page_size,
                            list(tracker.mappings), list(tracker.registered), tracker.protected,
                            registered_since=boot_ticks())
            self.add(child)
            assert self._nursery is not None
            self._nursery.start_soon(self._find_child, tracker, child)
        elif isinstance(event, K.Remap):
            tracker.remapped(event)
        elif isinstance(event, K.Unmap):
            tracker.unmapped(event.start, event.end)
        elif isinstance(event, K.Remove):
            ranges = [(tracker.offset_of(a) or 0, n) for a, n in
                      _page_spans(event.start, event.end, tracker)]
            if ranges:
                await self._send(Removed(tuple(ranges)))

    async def _find_child(self, parent: Tracker, child: Tracker) -> None:
        """A forked child's pid is not in the fork event: find the new child of the parent in
        /proc (it appears once the parent, released by our read, finishes fork())."""
        known = {t.pid for t in self.trackers}
        with trio.move_on_after(CHILD_SEARCH_S):
            while child in self.trackers:
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
                    assert self._nursery is not None
                    self._nursery.start_soon(self._watch_exit, child)
                    await self._report_tracked()
                    return
                await trio.sleep(0.001)
        self.drop(child)  # gone before we could see it: nothing of it can write any more

    async def _watch_exit(self, tracker: Tracker) -> None:
        if tracker.pidfd < 0:
            return
        await trio.lowlevel.wait_readable(tracker.pidfd)
        self.drop(tracker)
        if not self.trackers:
            await self._send(Gone("process exited"))
            self._end("process exited")
        else:
            await self._report_tracked()

    async def _report_tracked(self) -> None:
        await self._send(Tracked(tuple(t.pid for t in self.trackers if t.pid is not None)))

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                name = signal.Signals(signum).name
                with trio.move_on_after(1):
                    await self._send(Abort(f"agent for pid {self.pid} got {name}"))
                self._end(f"signal {name}")


CHILD_SEARCH_S = 2.0


def _page_spans(start: int, end: int, tracker: Tracker) -> list[tuple[int, int]]:
    """(address, length) pieces of [start, end) that map the object, page-aligned."""
    out = []
    for m in tracker.mappings:
        lo, hi = max(start, m.start), min(end, m.end)
        if lo < hi:
            lo -= (lo - m.start) % tracker.page_size
            out.append((lo, hi - lo + (-(hi - lo)) % tracker.page_size))
    return out


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat start times use."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


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
    fresh = [(_start_time(p), p) for p in candidates if p not in known]
    fresh = [(t, p) for t, p in fresh if t >= since]
    return min(fresh)[1] if fresh else None


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def report(message: str) -> None:
    sys.stderr.write(f"uffdsnap agent: {message}\n")
    sys.stderr.flush()
