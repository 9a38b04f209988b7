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
import socket
import sys
from collections.abc import Callable

import trio

from uffdsnap import testhooks
from uffdsnap.agent.tracker import GONE, Tracker, boot_ticks, covered
from uffdsnap.channel import Channel, PeerClosed, connect
from uffdsnap.groups import unwrap_group
from uffdsnap.native import core as snapcore
from uffdsnap.native import uffd as K
from uffdsnap.native.core import SC_EVENT, SC_FAILED, SC_GONE, SnapCore, describe_error
from uffdsnap.native.libc import KernelError
from uffdsnap.native.pidfd import pidfd_open
from uffdsnap.procfs import (
    Mapping,
    ObjectId,
    mappings_of,
    process_comm,
    process_running,
    start_ticks,
    wp_registered_ranges,
)
from uffdsnap.protocol import (
    MAX_TEXTS,
    PROTOCOL_VERSION,
    Abort,
    Delegate,
    Event,
    Fault,
    FaultChannel,
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
from uffdsnap.stats import LatencyHistogram, monotonic_ns

JOIN_TIMEOUT_S = 30.0
# Features asked of the kernel for a snapshot uffd (those it lacks are simply not requested,
# except the required ones, whose absence fails the API call with a clear error).
WANTED_FEATURES = K.REQUIRED_FEATURES | K.FEATURES["THREAD_ID"] | K.EVENT_FEATURES


def negotiate(uffd: int) -> K.ApiInfo:
    """Enable the snapshot features on `uffd`, or fail naming the ones this kernel lacks."""
    supported = K.supported_features()
    missing = K.REQUIRED_FEATURES & ~supported
    if missing:
        raise KernelError("UFFDIO_API", errno.EINVAL, f"features={WANTED_FEATURES:#x}",
                          f"kernel lacks {', '.join(K.feature_names(missing))}")
    return K.api(uffd, WANTED_FEATURES & supported)


class _FaultLog:
    """Pending faults by offset (first time seen) and the service-time histogram."""

    def __init__(self) -> None:
        self.pending: dict[int, int] = {}
        self.hist = LatencyHistogram()
        self.faults = 0

    def seen(self, offset: int, now: int) -> None:
        """Record a fault; a duplicate keeps the time of the first one pending on its page."""
        self.faults += 1
        self.pending.setdefault(offset, now)

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
    await chan.send(Hello(PROTOCOL_VERSION, Role.AGENT.value, pid, mode, process_comm(pid)))
    with trio.fail_after(JOIN_TIMEOUT_S):
        msg = await chan.receive()
    if not isinstance(msg, Welcome):
        raise ProtocolError(f"coordinator answered {msg.TYPE} instead of welcome")
    return msg


async def run_agent(coordinator: str, pid: int, uffd: int, mode: str,
                    on_joined: Callable[[], None] | None = None,
                    test_hooks: testhooks.Hooks | None = None) -> str:
    """Track process `pid` through `uffd` (which this call now owns) for `coordinator`.

    Returns why it ended ("process exited", "coordinator closed the connection", ...). Whatever
    happens, every tracked process is left un-protected and unregistered and every uffd closed.
    """
    try:
        pidfd = pidfd_open(pid)
    except BaseException:
        os.close(uffd)
        raise
    agent = Agent(pid, test_hooks)
    try:
        negotiate(uffd)
        snapcore.load()  # now, not inside a protect phase, where writers may be waiting
        chan = await connect(coordinator, Role.AGENT)
        try:
            welcome = await _join(chan, pid, mode)
            obj = ObjectId(welcome.major, welcome.minor, welcome.inode)
            agent.delegate = welcome.delegate
            agent.page_size = welcome.page_size
            agent.object_id = obj
            agent.add(Tracker(uffd, pid, obj, welcome.page_size, pidfd=pidfd))
            uffd = pidfd = -1  # the tracker owns them now
            if on_joined is not None:
                on_joined()
            with unwrap_group():
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

    def __init__(self, pid: int, test_hooks: testhooks.Hooks | None = None):
        self.pid = pid
        self.trackers: list[Tracker] = []
        self.log = _FaultLog()
        self.ended: list[str] = []
        self._nursery: trio.Nursery | None = None
        self._chan: Channel | None = None
        # Between protect and release our Python tasks do not read the uffds: in delegated
        # mode the coordinator does (it holds copies), otherwise our native core does, which
        # forwards faults over a fault channel and applies the un-protects that come back.
        self.delegate = False
        self.lent = False
        self._resumed = trio.Event()
        self._next_ident = 1
        self.page_size = 0
        self.object_id = ObjectId(0, 0, 0)
        self.core: SnapCore | None = None
        self._fault_sock: socket.socket | None = None
        self._hooks: testhooks.Hooks = test_hooks or {}

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

    def drop(self, tracker: Tracker) -> None:
        """Stop tracking one process (it exited or exec'd away from the object), and tell the
        coordinator: a process that lives on (exec) is then no longer counted as tracked."""
        if tracker in self.trackers:
            self.trackers.remove(tracker)
            if self._nursery is not None and tracker.pid is not None:
                self._nursery.start_soon(self._report_tracked)
            if self.core is not None:
                self.core.remove(tracker.ident)
            # tasks may be waiting on these fds: wake them (they see the tracker gone)
            trio.lowlevel.notify_closing(tracker.uffd)
            if tracker.pidfd >= 0:
                trio.lowlevel.notify_closing(tracker.pidfd)
            tracker.close()

    def release_all(self) -> None:
        self._stop_core()  # the core's thread must not read uffds we are about to close
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
                if self.ended or chan.conn.state.value == "closed":
                    return  # we are leaving (gone): what the coordinator had in flight is moot
                if isinstance(msg, Protect):
                    await self._test_hold_protect()
                    self.log.reset()
                    use_core = not self.delegate and not self._hooks.get("no_fault_channel")
                    # the coordinator or our core reads the uffds from now: stop reading them
                    # before anything can fault
                    self.lent = self.delegate or use_core
                    self._resumed = trio.Event()
                    theirs = self._start_core() if use_core else None
                    t0 = monotonic_ns()
                    maps = [m for t in list(self.trackers) for m in self._protect(t)]
                    protect_ns = monotonic_ns() - t0
                    if self.delegate:
                        for t in list(self.trackers):
                            spans = tuple(t.spans_with_offsets())
                            await chan.send(Delegate(t.ident, t.pid or 0, spans), fds=[t.uffd])
                    elif theirs is not None:
                        assert self.core is not None
                        for t in list(self.trackers):
                            self.core.set_maps(t.ident, t.spans_with_offsets())
                        try:
                            await chan.send(FaultChannel(msg.snapshot), fds=[theirs.fileno()])
                        finally:
                            theirs.close()
                    await chan.send(Protected(
                        msg.snapshot, tuple((m.start, m.length, m.offset) for m in maps),
                        protect_ns))
                elif isinstance(msg, Unprotect):
                    for tracker in list(self.trackers):
                        self._unprotect(tracker, msg.ranges)
                    self.log.served(msg.ranges, self.trackers[0].page_size if self.trackers
                                    else 1, monotonic_ns())
                elif isinstance(msg, Event):
                    self._delegated_event(chan, msg)
                elif isinstance(msg, Release):
                    self._stop_core()
                    escapes = [] if self._hooks.get("no_escape_audit") else self._audit()
                    for tracker in list(self.trackers):
                        tracker.release()
                    if self.lent:
                        self.lent = False
                        self._resumed.set()
                    await chan.send(Released(msg.snapshot, self.log.faults, self.log.hist.buckets(),
                                             self.log.hist.max_ns, tuple(escapes[:MAX_TEXTS])))
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

    def _audit(self) -> list[str]:
        """Before releasing: every writable mapping of the object in the processes we answer
        for must lie inside what we protected. One that does not (a mapping grown in place,
        one mapped anew, a process that exec'd and mapped the object again) may have taken
        writes no fault told us of: the coordinator fails the snapshot. (A mapping that came
        and went before now escapes this look: see docs/overview.md, limits.)"""
        found = [e for t in self.trackers for e in t.escapes]
        by_pid = {t.pid: t for t in self.trackers if t.pid is not None}
        for pid in sorted({self.pid, *by_pid}):
            tracker = by_pid.get(pid)
            try:
                maps = [m for m in mappings_of(pid, self.object_id) if m.writable]
                in_kernel = wp_registered_ranges(pid) if maps else []
            except (ProcessLookupError, OSError):
                continue  # gone: nothing of it can write any more
            # ours: inside what we registered, and registered as the kernel sees it (after an
            # exec, or munmap+mmap at the same address, our table matches and the kernel's not)
            found += [f"pid {pid} maps the object at {m.start:#x}-{m.end:#x} (offset "
                      f"{m.offset:#x}) writable without write-protection ("
                      + ("its tracking was lost" if tracker is None else
                         "a mapping that grew, or appeared after an exec or mmap") + ")"
                      for m in maps
                      if tracker is None or not covered(m.start, m.end, tracker.registered)
                      or not covered(m.start, m.end, in_kernel)]
        return found

    async def _test_hold_protect(self) -> None:
        """Test hook hold_protect: say so on the hook's FIFO, then protect only on SIGUSR1 (a
        deterministically slow protector, while the other agents protect at once)."""
        spec = testhooks.for_pid(self._hooks, "hold_protect", self.pid)
        if spec is None:
            return
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            line = f"held agent={os.getpid()} target={self.pid}\n".encode()

            def say() -> None:
                with open(spec["fifo"], "wb") as fifo:
                    fifo.write(line)

            await trio.to_thread.run_sync(say)
            async for _ in signals:
                break

    # ---- the native core (agents mode) ---------------------------------------------------

    def _start_core(self) -> socket.socket:
        """Lend every uffd to a native core that forwards faults over a new fault channel;
        return the coordinator's end of it (to be sent with a `faults` message)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            core = SnapCore.for_agent(self.page_size)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        self.core, self._fault_sock = core, ours
        core.forward(FORWARD_IDENT, ours.fileno())
        for tracker in list(self.trackers):
            tracker.lend(core, tracker.ident)
        assert self._nursery is not None
        self._nursery.start_soon(self._core_events, core)
        return theirs

    def _stop_core(self) -> None:
        """Take the uffds back: what the core read but did not handle goes to the backlogs
        (handled in order once we read again); its fault counts go into our log."""
        core, self.core = self.core, None
        if core is None:
            return
        core.stop()
        tracked = {t.ident for t in self.trackers}
        events = [e for e in core.take_events() if e.kind == SC_EVENT]
        for tracker in list(self.trackers):
            tracker.drain = None
            msgs = [e.msg for e in events if e.ident == tracker.ident]
            msgs += core.take_pending(tracker.ident)
            for i, msg in enumerate(msgs):
                # moves and unmaps now, so that a release that follows covers the right
                # ranges; the rest waits in the backlog for the reader
                event = K.decode_message(msg)
                try:
                    if isinstance(event, K.Remap):
                        if not self._hooks.get("ignore_remap"):  # (the hook: wrong on purpose)
                            tracker.remapped(event)
                    elif isinstance(event, K.Unmap):
                        tracker.unmapped(event.start, event.end)
                    else:
                        tracker.backlog.append(event)
                except (KernelError, ProcessLookupError):
                    self.drop(tracker)  # its address space is gone
                    for rest in msgs[i + 1:]:
                        K.close_fork_uffd(rest)
                    break
        for e in events:  # a dropped tracker's fork event: nobody will serve that child
            if e.ident not in tracked:
                K.close_fork_uffd(e.msg)
        stats = core.stats()
        self.log.faults += stats.faults
        self.log.hist.merge(stats.service_buckets, stats.service_max_ns)
        trio.lowlevel.notify_closing(core.notify_fd)  # wakes _core_events, which then ends
        core.close()
        if self._fault_sock is not None:
            self._fault_sock.close()
            self._fault_sock = None

    async def _core_events(self, core: SnapCore) -> None:
        """Handle what the core cannot: fork/mremap/munmap/remove events (each pauses its uffd
        until handled here), processes gone, a broken fault channel."""
        while self.core is core:
            try:
                await trio.lowlevel.wait_readable(core.notify_fd)
            except trio.ClosedResourceError:
                return  # the snapshot is over (_stop_core)
            if self.core is not core:
                return
            failed = ""
            for ev in core.take_events():
                tracker = next((t for t in self.trackers if t.ident == ev.ident), None)
                if ev.kind == SC_FAILED:
                    where = ("fault channel" if ev.ident == FORWARD_IDENT else
                             f"serving pid {tracker.pid if tracker else '?'}")
                    failed = failed or f"{where}: {describe_error(ev.err)}"
                elif ev.kind == SC_GONE:
                    if tracker is not None:
                        self.drop(tracker)  # exited or exec'd
                    # (the channel: the coordinator closed it or is gone)
                elif tracker is None:
                    K.close_fork_uffd(ev.msg)  # dropped meanwhile: nobody will serve a child
                else:
                    await self._event(tracker, K.decode_message(ev.msg))
                    if self.core is core and tracker in self.trackers:
                        core.set_maps(tracker.ident, tracker.spans_with_offsets())
                        core.resume(tracker.ident)
            if failed:
                self._end(failed)
                return

    def _delegated_event(self, chan: Channel, msg: Event) -> None:
        """An event the coordinator read from one of our uffds while delegated: apply it as if
        we had read it ourselves."""
        fd = chan.take_fd() if msg.kind == "fork" else -1
        tracker = next((t for t in self.trackers if t.ident == msg.tracker), None)
        if tracker is None:
            if fd >= 0:
                os.close(fd)
            return
        if msg.kind == "fork":
            self._adopt_child(tracker, fd, msg.child)
        elif msg.kind == "remap":
            tracker.remapped(K.Remap(msg.a, msg.b, msg.c))
        elif msg.kind == "unmap":
            tracker.unmapped(msg.a, msg.b)

    def _adopt_child(self, parent: Tracker, uffd: int, ident: int = 0) -> None:
        """Track a child forked by `parent` (its uffd came with the fork event); find its pid."""
        child = Tracker(uffd, None, parent.object_id, parent.page_size, list(parent.mappings),
                        list(parent.registered), parent.protected,
                        registered_since=boot_ticks(), ident=ident)
        if self._hooks.get("drop_forks"):  # wrong on purpose: untracked, yet reported tracked
            child.release()
            child.mappings = []
        self.add(child)
        assert self._nursery is not None
        self._nursery.start_soon(self._find_child, parent, child)

    def _protect(self, tracker: Tracker) -> list[Mapping]:
        skip = testhooks.for_pid(self._hooks, "skip_protect", tracker.pid)
        core = self.core

        def mapped() -> None:  # our core must place the first fault
            if core is not None:
                core.set_maps(tracker.ident, tracker.spans_with_offsets())

        try:
            return tracker.protect(leave_unprotected=skip.get("which", "all") if skip else None,
                                   mapped=mapped)
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
                if self.lent:
                    await self._resumed.wait()
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
            while tracker.backlog:
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
            self.log.seen(offset, monotonic_ns())  # duplicates (after a signal) go on too:
            await self._send(Fault(offset, event.tid, self.log.pending[offset]))  # idempotent
        elif isinstance(event, K.Fork):
            self._adopt_child(tracker, event.uffd)
        elif isinstance(event, K.Remap):
            if not self._hooks.get("ignore_remap"):  # (the hook: wrong on purpose)
                tracker.remapped(event)
        elif isinstance(event, K.Unmap):
            tracker.unmapped(event.start, event.end)
        elif isinstance(event, K.Remove):
            ranges = [(tracker.offset_of(a) or 0, n) for a, n in
                      tracker.spans_of(event.start, event.end)]
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
        pid = tracker.pid
        try:
            await trio.lowlevel.wait_readable(tracker.pidfd)
        except trio.ClosedResourceError:
            # dropped meanwhile: its address space is gone. If the process lives on, it exec'd:
            # stay (drop() told the coordinator it is no longer tracked; our audit at release
            # reports it if the new program maps the object)
            if pid is not None and process_running(pid):
                return
        self.drop(tracker)
        if not self.trackers and not (pid != self.pid and process_running(self.pid)):
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
FORWARD_IDENT = 0  # the core's name for the fault channel (trackers are 1, 2, ...)


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


def report(message: str) -> None:
    sys.stderr.write(f"uffdsnap agent: {message}\n")
    sys.stderr.flush()
