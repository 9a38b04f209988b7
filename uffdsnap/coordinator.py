"""The coordinator: owns one snapshot at a time of one shared-memory object.

Lifecycle of a snapshot (DESIGN §1–§2): every joined agent is told to protect; faults that arrive
meanwhile are *held*. When the last agent reports its mappings protected and no untracked writable
mapper exists, that instant is T. Then held faults are saved first, then a linear scan saves the
rest in large chunks (holes skipped with SEEK_DATA/SEEK_HOLE); every saved range is un-protected in
every agent. Then release, then publish the image. Any failure releases every agent and publishes
nothing.

The coordinator reads the object only through a read-only fd (pread), so it never faults itself,
and speaks only in object offsets.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from uffdsnap.attacher import Attacher
from uffdsnap.channel import Channel, PeerClosed
from uffdsnap.errors import SnapshotFailed
from uffdsnap.image import ImageWriter, extent_checksum
from uffdsnap.kernel import uffd as K
from uffdsnap.kernel._libc import KernelError
from uffdsnap.kernel.pidfd import pidfd_open, process_alive
from uffdsnap.kernel.procmaps import (
    Mapping,
    SharedObject,
    find_mappers,
    parent_pid,
    process_comm,
    process_running,
)
from uffdsnap.protocol import (
    MAX_RANGES,
    PROTOCOL_VERSION,
    Abort,
    Delegate,
    Event,
    Fault,
    Gone,
    Hello,
    Protect,
    Protected,
    ProtocolError,
    Release,
    Released,
    Removed,
    Result,
    Role,
    Snap,
    Tracked,
    Unprotect,
    Welcome,
)
from uffdsnap.stats import LatencyHistogram, monotonic_ns
from uffdsnap.tracker import GONE, Tracker

CHUNK_BYTES = 1 << 20
COPY_WORKERS = 2
OUTBOX_DEPTH = 256
HANDSHAKE_TIMEOUT_S = 10.0
RELEASE_TIMEOUT_S = 10.0
# An agent that cannot take a message for this long is dropped (its process is then released
# by the agent itself, or by the kernel when the agent dies) and the snapshot fails.
PEER_SEND_TIMEOUT_S = 10.0


@dataclass(eq=False)
class Peer:
    """A joined agent: its connection, its process, and its part in the current snapshot."""

    chan: Channel
    pid: int
    comm: str
    mode: str
    pidfd: int
    outbox: trio.MemorySendChannel[Any]
    protected: bool = False
    mappings: tuple[tuple[int, int, int], ...] = ()
    protect_ns: int = 0
    released: trio.Event = field(default_factory=trio.Event)
    release_stats: Released | None = None
    send_error: str = ""
    children: tuple[int, ...] = ()  # descendants it tracks (forked while protected)
    delegated: list[Tracker] = field(default_factory=list)  # our copies of its uffds

    @property
    def pids(self) -> set[int]:
        return {self.pid, *self.children}

    def any_alive(self) -> bool:
        return process_alive(self.pidfd) or any(process_running(p) for p in self.children)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "mode": self.mode,
                "mappings": len(self.mappings), "protect_ns": self.protect_ns,
                "children": list(self.children)}


@dataclass(eq=False)
class Run:
    """One snapshot in progress."""

    id: int
    writer: ImageWriter
    npages: int
    page_size: int
    phase: str = "joining"  # joining -> protecting -> copying -> releasing
    saved: bytearray = field(init=False)
    held: list[tuple[Peer, int, int]] = field(default_factory=list)
    failure: str | None = None
    failed: trio.Event = field(default_factory=trio.Event)
    all_protected: trio.Event = field(default_factory=trio.Event)
    peers: list[Peer] = field(default_factory=list)
    gone: list[dict[str, Any]] = field(default_factory=list)
    faults: int = 0
    duplicate_faults: int = 0
    fault_pages_saved: int = 0
    bytes_scanned: int = 0
    held_wait_max_ns: int = 0
    protect_started_ns: int = 0
    delegated_service: LatencyHistogram = field(default_factory=LatencyHistogram)
    # Guards `saved` (and the image write that precedes marking a page saved) between the event
    # loop's fault path and the copy workers, which claim pages from their threads.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.saved = bytearray(self.npages)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self.failed.set()


class Coordinator:
    """Serves agent and client connections for one object and takes snapshots on request."""

    def __init__(self, obj: SharedObject, *, protect_timeout: float = 30.0,
                 attach_path: str | None = None, delegate: bool = False,
                 chunk_bytes: int = CHUNK_BYTES,
                 on_progress: Callable[[int, int], None] | None = None,
                 test_hooks: dict[str, Any] | None = None):
        self.obj = obj
        self.page_size = obj.page_size
        self.npages = obj.size // obj.page_size
        self.protect_timeout = protect_timeout
        self.chunk_bytes = max(chunk_bytes - chunk_bytes % obj.page_size, obj.page_size)
        self.on_progress = on_progress
        self.peers: list[Peer] = []
        self.peers_changed = trio.Event()
        self.run: Run | None = None
        self._snapshot_lock = trio.Lock()
        self._next_id = 1
        self._pending_unprotect: list[tuple[int, int]] = []
        self._unprotect_ready = trio.Event()
        # With attach_path (this coordinator's own socket), every writable mapper without an
        # agent gets an attach agent at each snapshot, for the duration of that snapshot.
        self.attacher = Attacher(attach_path) if attach_path else None
        # Delegated mode: agents hand us copies of their uffds while protected; we read their
        # faults and un-protect directly, with no message round trips.
        self.delegate = delegate
        self._next_child_ident = 1 << 32
        self._nursery: trio.Nursery | None = None
        # Test hooks (never set in normal use): deliberately wrong behaviours that prove the
        # checker catches them, and pauses at a phase so tests can kill a process there.
        self._hooks = test_hooks if test_hooks is not None else hooks_from_environment()
        self._paused: set[str] = set()

    # ---- connections ----------------------------------------------------------------------

    async def serve(self, listener: trio.socket.SocketType,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept agents and clients on a listening Unix socket until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._broadcast_unprotects)
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(self._serve_connection, Channel(sock, Role.COORDINATOR))

    async def _serve_connection(self, chan: Channel) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                hello = await chan.receive()
            assert isinstance(hello, Hello)  # the state machine admits nothing else first
            if hello.role == Role.CLIENT.value:
                await chan.send(self._welcome())
                await self._serve_client(chan)
            else:
                await self._serve_agent(chan, hello)
        except (PeerClosed, trio.TooSlowError):
            pass
        except ProtocolError as e:
            with trio.move_on_after(1):
                try:
                    await chan.send(Abort(f"protocol error: {e}"))
                except (PeerClosed, ProtocolError, OSError):
                    pass
        finally:
            chan.close()

    def _welcome(self) -> Welcome:
        oid = self.obj.object_id
        return Welcome(PROTOCOL_VERSION, self.obj.size, self.page_size, oid.major, oid.minor,
                       oid.inode, self.delegate)

    async def _serve_client(self, chan: Channel) -> None:
        while True:
            msg = await chan.receive()
            if isinstance(msg, Snap):
                try:
                    summary = await self.snapshot(msg.output, overwrite=msg.overwrite)
                    await chan.send(Result(True, "", _flat(summary)))
                except SnapshotFailed as e:
                    await chan.send(Result(False, str(e), {}))
            elif isinstance(msg, Abort):
                return

    async def _serve_agent(self, chan: Channel, hello: Hello) -> None:
        try:
            pidfd = pidfd_open(hello.pid)
        except OSError as e:
            await chan.send(Abort(f"cannot watch pid {hello.pid}: {e}"))
            return
        outbox_send, outbox_recv = trio.open_memory_channel[Any](OUTBOX_DEPTH)
        peer = Peer(chan, hello.pid, hello.comm, hello.mode, pidfd, outbox_send)
        # Join before the welcome goes out: an enlisting workload carries on as soon as its
        # agent is welcomed, and a snapshot started then must already count it as tracked.
        self._join(peer)
        try:
            await chan.send(self._welcome())  # first; whatever _join queued follows it
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, peer, outbox_recv, nursery.cancel_scope)
                await self._agent_messages(peer)
                nursery.cancel_scope.cancel()
        except (PeerClosed, ProtocolError, OSError) as e:
            self._lost(peer, f"agent for pid {peer.pid} ({peer.comm}) lost: {e}")
        else:
            self._lost(peer, f"agent for pid {peer.pid} ({peer.comm}) lost: {peer.send_error}"
                       if peer.send_error else "")
        finally:
            self._close_delegated(peer)
            os.close(pidfd)

    async def _send_loop(self, peer: Peer, outbox: trio.MemoryReceiveChannel[Any],
                         scope: trio.CancelScope) -> None:
        async with outbox:
            async for item in outbox:
                msg, fds = item if isinstance(item, tuple) else (item, ())
                if isinstance(msg, Unprotect) and not _unprotectable(peer):
                    continue  # released meanwhile: nothing is protected there any more
                try:
                    await peer.chan.send(msg, fds)
                except (PeerClosed, ProtocolError, OSError, trio.ClosedResourceError) as e:
                    peer.send_error = f"sending {msg.TYPE}: {e}"
                    scope.cancel()
                    return

    async def _post(self, peer: Peer, msg: Any) -> None:
        """Queue `msg` for `peer`, waiting (bounded) when its outbox is full; a peer that stays
        full is dropped and fails the running snapshot."""
        try:
            peer.outbox.send_nowait(msg)
            return
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # its connection is over; _lost() has judged it
        with trio.move_on_after(PEER_SEND_TIMEOUT_S):
            try:
                await peer.outbox.send(msg)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return
        if self.run is not None:
            self.run.fail(f"agent for pid {peer.pid} ({peer.comm}) stopped answering")
        peer.chan.close()

    def _join(self, peer: Peer) -> None:
        self.peers.append(peer)
        self._changed()
        run = self.run
        if run is None:
            return
        if run.phase == "joining":
            run.peers.append(peer)  # a participant already; protected with the others
            return
        if run.phase == "protecting":
            run.peers.append(peer)
            peer.outbox.send_nowait(Protect(run.id))  # a fresh outbox has room
        else:
            run.fail(f"process {peer.pid} ({peer.comm}) joined after T: its earlier writes "
                     "were not tracked")

    def _lost(self, peer: Peer, why: str) -> None:
        """A peer's connection ended. Fatal to a running snapshot unless its process is gone."""
        if peer in self.peers:
            self.peers.remove(peer)
            self._changed()
        run = self.run
        if run is None or peer not in run.peers or peer.released.is_set():
            return
        if not peer.any_alive():
            self._peer_gone(run, peer, "process exited")
            return
        peer.released.set()  # its connection is gone: there is nothing left to release there
        if run.phase == "releasing":
            return
        run.fail(why or f"agent for pid {peer.pid} ({peer.comm}) left while its process lives: "
                 "its writes are no longer tracked")

    def _peer_gone(self, run: Run, peer: Peer, reason: str) -> None:
        run.peers.remove(peer)
        run.gone.append({**peer.describe(), "reason": reason})
        peer.released.set()
        self._check_all_protected(run)

    def _changed(self) -> None:
        self.peers_changed.set()
        self.peers_changed = trio.Event()

    async def _agent_messages(self, peer: Peer) -> None:
        while True:
            msg = await peer.chan.receive()
            run = self.run
            if isinstance(msg, Fault):
                self._on_fault(peer, msg)
            elif isinstance(msg, Protected):
                peer.protected = True
                peer.mappings = msg.mappings
                peer.protect_ns = msg.protect_ns
                if run is not None and run.id == msg.snapshot:
                    self._check_all_protected(run)
            elif isinstance(msg, Released):
                peer.release_stats = msg
                peer.released.set()
            elif isinstance(msg, Delegate):
                self._take_delegate(peer, msg, peer.chan.take_fd())
            elif isinstance(msg, Tracked):
                peer.children = tuple(p for p in msg.pids if p != peer.pid)
                self._changed()
            elif isinstance(msg, Removed):
                if run is not None:
                    self._on_removed(run, msg)
            elif isinstance(msg, Gone):
                if run is not None and peer in run.peers:
                    self._peer_gone(run, peer, msg.reason)
                return
            elif isinstance(msg, Abort):
                raise PeerClosed(f"agent aborted: {msg.reason}")

    def _on_removed(self, run: Run, msg: Removed) -> None:
        """MADV_REMOVE punches holes without a write fault: if an unsaved page has become a
        hole, its content at T is lost and the snapshot cannot be proven. (MADV_DONTNEED
        raises the same event but changes no data: those pages still hold data.)"""
        for off, length in msg.ranges:
            for page in range(off // self.page_size, (off + length) // self.page_size):
                if not run.saved[page] and _is_hole(self.obj.fd, page * self.page_size):
                    run.fail(f"pages at offset {page * self.page_size:#x} were removed "
                             "(MADV_REMOVE or a hole punch) during the snapshot: not trackable")
                    return

    def _check_all_protected(self, run: Run) -> None:
        if run.phase == "protecting" and all(p.protected for p in run.peers):
            run.all_protected.set()

    # ---- faults and un-protects -------------------------------------------------------------

    def _on_fault(self, peer: Peer, msg: Fault) -> None:
        run = self.run
        if run is None or run.phase == "releasing":
            self._unprotect_one(peer, msg.offset)
            return
        run.faults += 1
        if run.phase == "protecting":
            run.held.append((peer, msg.offset, msg.seen_ns))
            return
        page = msg.offset // self.page_size
        if run.saved[page]:
            run.duplicate_faults += 1
            self._unprotect_one(peer, msg.offset)
            return
        self._save_page(run, page)
        self._unprotect_one(peer, msg.offset)  # the waiting writer first; the others batched

    def _save_page(self, run: Run, page: int) -> None:
        """Copy one page from the object into the image, then un-protect it everywhere. A copy
        worker may have claimed it meanwhile: then it holds the page's content at T already."""
        offset = page * self.page_size
        with run.lock:
            if run.saved[page]:
                return
            data = os.pread(self.obj.fd, self.page_size, offset)
            run.writer.write(offset, data)
            run.saved[page] = 1
        run.fault_pages_saved += 1
        self._queue_unprotect(offset, self.page_size)

    def _unprotect_one(self, peer: Peer, offset: int) -> None:
        try:
            peer.outbox.send_nowait(Unprotect(((offset, self.page_size),)))
        except trio.WouldBlock:
            self._queue_unprotect(offset, self.page_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _queue_unprotect(self, offset: int, length: int) -> None:
        """Un-protect a saved range everywhere, batched: ranges queued while the coordinator is
        busy go out together, coalesced (see _broadcast_unprotects)."""
        self._pending_unprotect.append((offset, length))
        self._unprotect_ready.set()

    # ---- delegated mode ----------------------------------------------------------------------

    def _take_delegate(self, peer: Peer, msg: Delegate, uffd: int) -> None:
        """Keep a copy of one of the agent's uffds and start reading it."""
        maps = [Mapping(a, a + n, "rw-s", off, self.obj.object_id, "")
                for a, n, off in msg.mappings]
        tracker = Tracker(uffd, msg.pid or None, self.obj.object_id, self.page_size, maps,
                          [(m.start, m.end) for m in maps], True, ident=msg.tracker)
        self._adopt_delegated(peer, tracker)

    def _adopt_delegated(self, peer: Peer, tracker: Tracker) -> None:
        peer.delegated.append(tracker)
        assert self._nursery is not None
        self._nursery.start_soon(self._read_delegated, peer, tracker)

    def _close_delegated(self, peer: Peer) -> None:
        """Drop our copies of the peer's uffds. If the agent is gone, ours were the last
        references: closing them releases its processes."""
        for tracker in peer.delegated:
            trio.lowlevel.notify_closing(tracker.uffd)
            tracker.close()
        peer.delegated.clear()

    def _unprotect_delegated(self, peer: Peer, tracker: Tracker, offset: int,
                             length: int) -> None:
        try:
            tracker.unprotect(offset, length)
        except KernelError as e:
            if e.errno not in GONE and self.run is not None:
                self.run.fail(f"un-protecting in pid {tracker.pid}: {e}")
            peer.delegated.remove(tracker)  # its process exited or exec'd (or is unusable)
            trio.lowlevel.notify_closing(tracker.uffd)
            tracker.close()

    async def _read_delegated(self, peer: Peer, tracker: Tracker) -> None:
        try:
            while tracker in peer.delegated:
                if not tracker.backlog:
                    await trio.lowlevel.wait_readable(tracker.uffd)
                    if tracker not in peer.delegated:
                        return
                    tracker.backlog.extend(K.read_events(tracker.uffd))
                while tracker.backlog and tracker in peer.delegated:
                    self._delegated_event(peer, tracker, tracker.backlog.popleft())
        except (trio.ClosedResourceError, KernelError):
            return

    def _delegated_event(self, peer: Peer, tracker: Tracker, event: K.UffdEvent) -> None:
        if isinstance(event, K.PageFault):
            self._delegated_fault(peer, tracker, event)
        elif isinstance(event, K.Fork):
            child = Tracker(event.uffd, None, tracker.object_id, tracker.page_size,
                            list(tracker.mappings), list(tracker.registered), tracker.protected,
                            ident=self._next_child_ident)
            self._next_child_ident += 1
            self._adopt_delegated(peer, child)
            self._forward(peer, Event(tracker.ident, "fork", child=child.ident), [child.uffd])
        elif isinstance(event, K.Remap):
            tracker.remapped(event)
            self._forward(peer, Event(tracker.ident, "remap", event.old_address,
                                      event.new_address, event.length))
        elif isinstance(event, K.Unmap):
            tracker.unmapped(event.start, event.end)
            self._forward(peer, Event(tracker.ident, "unmap", event.start, event.end))
        elif isinstance(event, K.Remove) and self.run is not None:
            spans = [(tracker.offset_of(a), n) for a, n in tracker.spans_of(event.start,
                                                                            event.end)]
            self._on_removed(self.run, Removed(tuple((o, n) for o, n in spans
                                                     if o is not None)))

    def _forward(self, peer: Peer, msg: Event, fds: list[int] | None = None) -> None:
        try:
            peer.outbox.send_nowait((msg, fds or []))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            if self.run is not None:
                self.run.fail(f"agent for pid {peer.pid} fell behind on events")

    def _delegated_fault(self, peer: Peer, tracker: Tracker, fault: K.PageFault) -> None:
        seen = monotonic_ns()
        offset = tracker.offset_of(fault.address)
        if offset is None:  # not the object (moved away under us): never leave it waiting
            page = fault.address - fault.address % tracker.page_size
            tracker._call(K.wake, tracker.uffd, page, tracker.page_size)
            return
        run = self.run
        if run is None or run.phase in ("releasing", "joining"):
            self._unprotect_delegated(peer, tracker, offset, self.page_size)
            return
        run.faults += 1
        if run.phase == "protecting":
            run.held.append((peer, offset, seen))
            return
        page = offset // self.page_size
        if run.saved[page]:
            run.duplicate_faults += 1
        else:
            self._save_page(run, page)
        # the waiting writer's process at once; the other processes with the next batch (a
        # write there to the saved page meanwhile faults and is answered from `saved`)
        self._unprotect_delegated(peer, tracker, offset, self.page_size)
        run.delegated_service.record(monotonic_ns() - seen)

    async def _broadcast_unprotects(self) -> None:
        """Apply queued un-protects everywhere, coalesced: directly through the uffds delegated
        to us, and in as few messages as possible to the other agents."""
        while True:
            await self._unprotect_ready.wait()
            self._unprotect_ready = trio.Event()
            ranges, self._pending_unprotect = coalesce(self._pending_unprotect), []
            for peer in list(self.peers):
                for tracker in list(peer.delegated):
                    for offset, length in ranges:
                        if tracker in peer.delegated:
                            self._unprotect_delegated(peer, tracker, offset, length)
            for start in range(0, len(ranges), MAX_RANGES):
                msg = Unprotect(tuple(ranges[start:start + MAX_RANGES]))
                for peer in list(self.peers):
                    if _unprotectable(peer) and not peer.delegated:
                        await self._post(peer, msg)

    # ---- the snapshot ----------------------------------------------------------------------

    async def snapshot(self, output: str, *, overwrite: bool = False) -> dict[str, Any]:
        """Take one snapshot into `output`; return its summary or raise SnapshotFailed."""
        async with self._snapshot_lock:
            writer = ImageWriter(output, self.obj.size, self.page_size, overwrite=overwrite)
            run = Run(self._next_id, writer, self.npages, self.page_size)
            self._next_id += 1
            self.run = run
            self._paused.clear()
            try:
                summary = await self._take(run)
                writer.publish(self._manifest(run, summary))
                return summary
            except BaseException:
                writer.abort()
                raise
            finally:
                self.run = None

    async def _take(self, run: Run) -> dict[str, Any]:
        t_start = monotonic_ns()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on, run.failed, scope)
                    if self.attacher is not None:
                        await self._attach(self._untracked_writers(self.peers))
                    await self._test_pause("joining")
                    await self._protect_all(run)
                    t_mono, t_wall = monotonic_ns(), time.time_ns()
                    run.phase = "copying"
                    await self._test_pause("copying")
                    await self._copy(run)
                    await self._test_pause("finishing")
                    scope.cancel()
            if run.failure:
                raise SnapshotFailed(run.failure)
            t_copied = monotonic_ns()
            self._check_no_untracked_writers(run, "after the copy")
            if run.failure:
                raise SnapshotFailed(run.failure)
        finally:
            with trio.CancelScope(shield=True):
                await self._release_all(run)
                await self._dismiss_attached()
        return self._summary(run, t_start, t_mono, t_wall, t_copied)

    async def _test_pause(self, phase: str) -> None:
        """With the hook pause_in=PHASE, say so on stderr and stay in that phase (still serving
        faults) until SIGUSR1, an agent joins or leaves, the snapshot fails, or we are killed."""
        if self._hooks.get("pause_in") != phase or phase in self._paused:
            return
        self._paused.add(phase)  # once per phase per snapshot
        import signal
        import sys

        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            sys.stderr.write(f"uffdsnap test hook: paused in {phase}\n")
            sys.stderr.flush()
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()

                async def on_peers() -> None:
                    await self.peers_changed.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(on_signal)
                nursery.start_soon(on_peers)

    async def _attach(self, pids: list[int]) -> None:
        """Start attach agents for `pids` and wait until each has joined or its process is gone."""
        assert self.attacher is not None and self._nursery is not None
        if not pids:
            return
        agents = await self.attacher.start(pids, self._nursery)
        await self.attacher.wait_joined(agents, lambda: {p.pid for p in self.peers},
                                        lambda: self.peers_changed, self.protect_timeout)

    async def _dismiss_attached(self) -> None:
        """Send this snapshot's attach agents away (they release and exit) and reap them."""
        if self.attacher is None or not self.attacher.agents:
            return
        for peer in list(self.peers):
            if peer.pid in self.attacher.agents and peer.mode == "attach":
                try:
                    peer.outbox.send_nowait(Abort("snapshot over"))
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    peer.chan.close()
        await self.attacher.reap()

    async def _protect_all(self, run: Run) -> None:
        """Protect every joined agent; before declaring T, make sure no writable mapper is left
        untracked (attaching late arrivals when we can, failing when we cannot)."""
        if self._hooks.get("no_protect"):  # wrong on purpose: copy while nothing is protected
            return
        run.phase = "protecting"
        run.protect_started_ns = monotonic_ns()
        run.peers = list(self.peers)  # who joined (those lost meanwhile have failed the run)
        for peer in run.peers:
            peer.protected = False
            peer.released = trio.Event()
            peer.release_stats = None
        for peer in run.peers:
            await self._post(peer, Protect(run.id))
        with trio.move_on_after(self.protect_timeout) as timeout:
            for _round in range(8):
                run.all_protected = trio.Event()
                self._check_all_protected(run)
                await run.all_protected.wait()
                await self._test_pause("protecting")
                untracked = await self._settle_forks(run, self._untracked_writers(run.peers))
                if not untracked:
                    return
                if self.attacher is None:
                    break
                await self._attach(untracked)  # they join mid-protect and are sent Protect
        if timeout.cancelled_caught:
            slow = [p.pid for p in run.peers if not p.protected]
            run.fail(f"agents for pids {slow} did not protect within {self.protect_timeout:g} s")
        else:
            self._check_no_untracked_writers(run, "before T")
        await trio.sleep_forever()  # the failure cancels us

    async def _settle_forks(self, run: Run, untracked: list[int]) -> list[int]:
        """A child forked by a tracked process while protected is tracked by its parent's agent
        (the uffd comes with the fork event), which reports it a moment later: give such
        children a moment before calling them untracked."""
        tracked = {pid for p in run.peers for pid in p.pids}
        with trio.move_on_after(FORK_REPORT_GRACE_S):
            while any(parent_pid(pid) in tracked for pid in untracked):
                await self.peers_changed.wait()
                untracked = self._untracked_writers(run.peers)
                tracked = {pid for p in run.peers for pid in p.pids}
        return untracked

    def _untracked_writers(self, peers: list[Peer]) -> list[int]:
        """Pids that map the object writable and have no agent among `peers`."""
        tracked = {pid for p in peers for pid in p.pids}
        mappers = find_mappers(self.obj.object_id, exclude={os.getpid()})
        return sorted(pid for pid, maps in mappers.items()
                      if pid not in tracked and any(m.writable for m in maps))

    def _check_no_untracked_writers(self, run: Run, when: str) -> None:
        if self._hooks.get("no_protect"):
            return
        untracked = self._untracked_writers(run.peers)
        if untracked:
            names = ", ".join(f"{pid} ({process_comm(pid)})" for pid in untracked)
            run.fail(f"untracked process(es) map the object writable {when}: {names}")

    async def _copy(self, run: Run) -> None:
        """Held faults first, then every remaining page in large chunks."""
        now = monotonic_ns()
        for peer, offset, seen_ns in run.held:
            run.held_wait_max_ns = max(run.held_wait_max_ns, now - seen_ns)
            if not run.saved[offset // self.page_size]:
                self._save_page(run, offset // self.page_size)
            if peer.delegated:
                run.delegated_service.record(monotonic_ns() - seen_ns)
        run.held.clear()
        # Each window is read, claimed and stored by one worker thread, two windows in flight.
        # 1 MiB windows: 4 MiB ones measured worse for fault service (longer synchronous claims
        # and un-protects in the event loop) and no better for copy throughput.
        in_flight = trio.Semaphore(COPY_WORKERS)
        async with trio.open_nursery() as nursery:
            for start, length, is_data in copy_windows(self.obj.fd, self.obj.size,
                                                       self.page_size, self.chunk_bytes):
                if is_data:
                    if self._hooks.get("scan_delay_s"):
                        await trio.sleep(self._hooks["scan_delay_s"])
                    await in_flight.acquire()
                    nursery.start_soon(self._copy_window, run, start, length, in_flight)
                else:
                    self._claim_hole(run, start, length)
                if self.on_progress:
                    self.on_progress(start + length, self.obj.size)

    def _claim_hole(self, run: Run, start: int, length: int) -> None:
        """A hole now was a hole at T (a page filled since then faulted and was saved): it is
        zero in the image already; un-protect its unsaved pages."""
        for a, b in self._claim(run, start, length):
            self._queue_unprotect(a, b - a)

    def _claim(self, run: Run, start: int, length: int) -> list[tuple[int, int]]:
        """Mark unsaved pages of [start, start+length) saved; return them as runs (start, end)."""
        with run.lock:
            return _claim_runs(run.saved, start, length, self.page_size)

    async def _copy_window(self, run: Run, offset: int, length: int,
                           in_flight: trio.Semaphore) -> None:
        try:
            claimed = await trio.to_thread.run_sync(_copy_window, run, self.obj.fd, offset,
                                                    length, self.page_size)
        finally:
            in_flight.release()
        for a, b in claimed:
            self._queue_unprotect(a, b - a)
        run.bytes_scanned += length

    async def _release_all(self, run: Run) -> None:
        run.phase = "releasing"
        for peer in self.peers:
            self._close_delegated(peer)  # before the agents read their uffds again
        for peer in run.peers:
            if peer.chan.conn.state.value in ("protecting", "active"):
                try:
                    peer.outbox.send_nowait(Release(run.id))
                except trio.WouldBlock:
                    peer.chan.close()  # closing releases the agent as surely as a message
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass
            else:
                peer.released.set()
        with trio.move_on_after(RELEASE_TIMEOUT_S):
            for peer in list(run.peers):
                await peer.released.wait()

    # ---- reporting -------------------------------------------------------------------------

    def _summary(self, run: Run, t_start: int, t_mono: int, t_wall: int,
                 t_copied: int) -> dict[str, Any]:
        hist = LatencyHistogram()
        hist.merge(run.delegated_service.buckets(), run.delegated_service.max_ns)
        for peer in run.peers:
            if peer.release_stats is not None:
                hist.merge(peer.release_stats.service_hist, peer.release_stats.service_max_ns)
        copy_s = max(t_copied - t_mono, 1) / 1e9
        return {
            "ok": True,
            "mode": "delegated" if self.delegate else "agents",
            "snapshot_time_unix_ns": t_wall,
            "snapshot_time": datetime.fromtimestamp(t_wall / 1e9, UTC).isoformat(),
            "object_size": self.obj.size,
            "page_size": self.page_size,
            "processes": [p.describe() for p in run.peers],
            "processes_gone": run.gone,
            "join_ns": (run.protect_started_ns or t_mono) - t_start,
            "protect_phase_ns": t_mono - (run.protect_started_ns or t_mono),
            "kernel_protect_max_ns": max((p.protect_ns for p in run.peers), default=0),
            "start_pause_max_ns": run.held_wait_max_ns,
            "faults": run.faults,
            "duplicate_faults": run.duplicate_faults,
            "pages_saved_by_faults": run.fault_pages_saved,
            "fault_service": hist.summary(),
            "bytes_scanned": run.bytes_scanned,
            "copy_ns": t_copied - t_mono,
            "copy_throughput_bytes_per_s": math.floor(run.bytes_scanned / copy_s),
            "duration_ns": monotonic_ns() - t_start,
        }

    def _manifest(self, run: Run, summary: dict[str, Any]) -> dict[str, Any]:
        oid = self.obj.object_id
        return {
            "object": {"size": self.obj.size, "page_size": self.page_size,
                       "source": self.obj.spec,
                       "kind": "hugetlbfs" if self.obj.hugetlb else "shmem",
                       "dev": os.makedev(oid.major, oid.minor), "inode": oid.inode},
            "snapshot_time": summary["snapshot_time_unix_ns"],
            "processes": summary["processes"] + summary["processes_gone"],
            "stats": {k: v for k, v in summary.items()
                      if k not in ("processes", "processes_gone", "snapshot_time",
                                   "snapshot_time_unix_ns", "ok")},
        }


TEST_HOOKS_ENV = "UFFDSNAP_TEST_HOOKS"


def hooks_from_environment() -> dict[str, Any]:
    """Test hooks for a coordinator running in a subprocess: JSON in $UFFDSNAP_TEST_HOOKS."""
    import json

    raw = os.environ.get(TEST_HOOKS_ENV)
    return json.loads(raw) if raw else {}


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


FORK_REPORT_GRACE_S = 2.0


def _is_hole(fd: int, offset: int) -> bool:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) != offset
    except OSError:
        return True  # ENXIO: no data at or after offset


def _flat(summary: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of a summary, for a Result message (nested values dropped)."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": v for k, v in value.items()
                        if isinstance(v, int | float | str | bool)})
        elif isinstance(value, int | float | str | bool):
            out[key] = value
        elif isinstance(value, list):
            out[f"{key}_count"] = len(value)
    return out


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (offset, length) ranges."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            out.append((off, length))
    return out


def _next_zero(buf: bytearray, start: int, stop: int) -> int:
    i = buf.find(0, start, stop)
    return stop if i < 0 else i


def _next_nonzero(buf: bytearray, start: int, stop: int) -> int:
    i = buf.find(1, start, stop)
    return stop if i < 0 else i


def _unprotectable(peer: Peer) -> bool:
    return peer.chan.conn.state.value in ("active", "releasing")


def copy_windows(fd: int, size: int, page_size: int,
                 window: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, has_data) covering [0, size), found lazily as the scan advances: whole
    `window`-aligned windows that hold any data (holes inside them read as zeros, which is what
    they were at T), and runs of windows that are holes throughout (SEEK_DATA skips them).
    Copying whole windows keeps a fragmented object as fast as a dense one."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size
        data = min(size, data - data % window)  # the window holding the next data
        if data > pos:
            yield (pos, data - pos, False)
        if data >= size:
            break
        end = min(size, data + window)
        yield (data, end - data, True)
        pos = end


def _pread_exact(fd: int, length: int, offset: int) -> bytearray:
    buf = bytearray(length)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:  # the object shrank: what is beyond its end reads as zeros
            break
        done += n
    return buf


def _claim_runs(saved: bytearray, start: int, length: int,
                page_size: int) -> list[tuple[int, int]]:
    """Mark the unsaved pages of [start, start+length) saved; return them as byte runs."""
    first, last = start // page_size, (start + length) // page_size
    runs: list[tuple[int, int]] = []
    page = first
    while page < last:
        page = _next_zero(saved, page, last)
        if page >= last:
            break
        end = _next_nonzero(saved, page, last)
        saved[page:end] = b"\x01" * (end - page)
        runs.append((page * page_size, end * page_size))
        page = end
    return runs


def _copy_window(run: Run, fd: int, offset: int, length: int,
                 page_size: int) -> list[tuple[int, int]]:
    """In a worker thread: read a window, then claim its unsaved pages. Pages still unsaved
    at the claim were protected everywhere during the read (a page is un-protected only after
    it is marked saved), so what was read is their content at T; pages saved earlier by a fault
    are taken from the image (written before they were marked). Store, checksum, and return the
    claimed runs for un-protecting."""
    buf = _pread_exact(fd, length, offset)
    with run.lock:
        was_saved = bytes(run.saved[offset // page_size:(offset + length) // page_size])
        claimed = _claim_runs(run.saved, offset, length, page_size)
    _store_chunk(run.writer, buf, offset, was_saved, claimed, page_size)
    return claimed


def _store_chunk(writer: ImageWriter, buf: bytearray, offset: int, was_saved: bytes,
                 claimed: list[tuple[int, int]], page_size: int) -> None:
    view = memoryview(buf)
    page = 0
    while page < len(was_saved):
        page = was_saved.find(1, page)
        if page < 0:
            break
        end = was_saved.find(0, page)
        end = len(was_saved) if end < 0 else end
        a, b = page * page_size, end * page_size
        view[a:b] = writer.read(offset + a, b - a)
        page = end
    for a, b in claimed:
        writer.write(a, view[a - offset:b - offset])
    writer.record_extent(offset, len(buf), extent_checksum(view))
