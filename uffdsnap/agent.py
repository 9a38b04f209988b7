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
from collections.abc import Callable
from dataclasses import dataclass, field

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
    Protect,
    Protected,
    ProtocolError,
    Release,
    Released,
    Role,
    Unprotect,
    Welcome,
)
from uffdsnap.stats import LatencyHistogram

JOIN_TIMEOUT_S = 30.0
# Features asked of the kernel for a snapshot uffd (those it lacks are simply not requested,
# except the required ones, whose absence fails the API call with a clear error).
WANTED_FEATURES = K.REQUIRED_FEATURES | K.FEATURES["THREAD_ID"]


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


@dataclass
class Tracker:
    """The uffd of one process and its mappings of the object: protect, translate, release."""

    uffd: int
    pid: int
    object_id: ObjectId
    page_size: int
    mappings: list[Mapping] = field(default_factory=list)
    registered: list[Mapping] = field(default_factory=list)

    def protect(self) -> list[Mapping]:
        """Register and write-protect every shared mapping of the object in the process."""
        self.mappings = mappings_of(self.pid, self.object_id)
        for m in self.mappings:
            if m not in self.registered:
                K.register(self.uffd, m.start, m.length, K.REGISTER_MODE_WP)
                self.registered.append(m)
            K.writeprotect(self.uffd, m.start, m.length, protect=True)
        return self.mappings

    def offset_of(self, address: int) -> int | None:
        """Page-aligned object offset of a faulting address, None if outside every mapping."""
        for m in self.mappings:
            off = m.offset_of(address)
            if off is not None:
                return off - off % self.page_size
        return None

    def unprotect(self, offset: int, length: int) -> None:
        """Un-protect object range [offset, offset+length) in every mapping, waking waiters."""
        end = offset + length
        for m in self.mappings:
            lo, hi = max(offset, m.offset), min(end, m.offset + m.length)
            if lo < hi:
                K.writeprotect(self.uffd, m.start + lo - m.offset, hi - lo, protect=False)

    def release(self) -> None:
        """Un-protect and unregister everything registered; tolerate a process that is gone."""
        for m in self.registered:
            for op in (lambda m=m: K.writeprotect(self.uffd, m.start, m.length, protect=False),
                       lambda m=m: K.unregister(self.uffd, m.start, m.length)):
                try:
                    op()
                except KernelError as e:
                    if e.errno not in (errno.ESRCH, errno.EINVAL, errno.ENOMEM, errno.ENOENT):
                        raise
        self.registered.clear()


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

    Returns why it ended ("process exited", "coordinator closed", ...). Whatever happens, the
    process is left un-protected and unregistered and the uffd is closed.
    """
    pidfd = -1
    tracker: Tracker | None = None
    try:
        pidfd = pidfd_open(pid)
        negotiate(uffd)
        chan = await connect(coordinator, Role.AGENT)
        try:
            welcome = await _join(chan, pid, mode)
            obj = ObjectId(welcome.major, welcome.minor, welcome.inode)
            tracker = Tracker(uffd, pid, obj, welcome.page_size)
            if on_joined is not None:
                on_joined()
            return await _serve(chan, tracker, pidfd)
        finally:
            if tracker is not None:
                tracker.release()
                tracker = None
            chan.close()
    finally:
        if tracker is not None:
            tracker.release()
        os.close(uffd)
        if pidfd >= 0:
            os.close(pidfd)


async def _serve(chan: Channel, tracker: Tracker, pidfd: int) -> str:
    log = _FaultLog()
    ended: list[str] = []

    async def watch_exit() -> None:
        await trio.lowlevel.wait_readable(pidfd)
        ended.append("process exited")
        tracker.registered.clear()  # nothing left to release in a dead address space
        try:
            await chan.send(Gone("process exited"))
        except (PeerClosed, ProtocolError, OSError):
            pass
        nursery.cancel_scope.cancel()

    async def read_faults() -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(tracker.uffd)
                for event in K.read_events(tracker.uffd):
                    if isinstance(event, K.PageFault):
                        await _forward_fault(chan, tracker, log, event)
        except (PeerClosed, OSError) as e:
            ended.append(f"lost the coordinator while forwarding a fault: {e}")
            nursery.cancel_scope.cancel()

    async def handle_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                ended.append(f"signal {signal.Signals(signum).name}")
                try:
                    await chan.send(Abort(f"agent for pid {tracker.pid} got "
                                          f"{signal.Signals(signum).name}"))
                except (PeerClosed, ProtocolError, OSError):
                    pass
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_exit)
        nursery.start_soon(read_faults)
        nursery.start_soon(handle_signals)
        try:
            while True:
                msg = await chan.receive()
                if isinstance(msg, Protect):
                    log.reset()
                    t0 = monotonic_ns()
                    maps = tracker.protect()
                    await chan.send(Protected(
                        msg.snapshot, tuple((m.start, m.length, m.offset) for m in maps),
                        monotonic_ns() - t0))
                elif isinstance(msg, Unprotect):
                    for off, length in msg.ranges:
                        tracker.unprotect(off, length)
                    log.served(msg.ranges, tracker.page_size, monotonic_ns())
                elif isinstance(msg, Release):
                    tracker.release()
                    await chan.send(Released(msg.snapshot, log.faults, log.hist.buckets(),
                                             log.hist.max_ns))
                elif isinstance(msg, Abort):
                    ended.append(f"coordinator aborted: {msg.reason}")
                    break
        except PeerClosed:
            ended.append("coordinator closed the connection")
        except ProtocolError as e:
            ended.append(f"protocol error: {e}")
            try:
                await chan.send(Abort(f"protocol error: {e}"))
            except (PeerClosed, ProtocolError, OSError):
                pass
        except KernelError as e:
            if e.errno == errno.ESRCH:
                ended.append("process exited")
            else:
                ended.append(str(e))
                try:
                    await chan.send(Abort(f"agent for pid {tracker.pid}: {e}"))
                except (PeerClosed, ProtocolError, OSError):
                    pass
        nursery.cancel_scope.cancel()
    return ended[0] if ended else "done"


async def _forward_fault(chan: Channel, tracker: Tracker, log: _FaultLog,
                         event: K.PageFault) -> None:
    offset = tracker.offset_of(event.address)
    if offset is None:
        # Not a mapping of the object (it moved away under us): never leave a writer waiting.
        page = event.address - event.address % tracker.page_size
        K.wake(tracker.uffd, page, tracker.page_size)
        return
    log.seen(offset, monotonic_ns())  # duplicates (after a signal) are forwarded too: the
    await chan.send(Fault(offset, event.tid, log.pending[offset]))  # answer is idempotent


def report(message: str) -> None:
    sys.stderr.write(f"uffdsnap agent: {message}\n")
    sys.stderr.flush()
