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
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from uffdsnap import testhooks
from uffdsnap.agent.tracker import GONE, Tracker
from uffdsnap.channel import Channel, PeerClosed
from uffdsnap.coordinator.attach import Attacher
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.groups import unwrap_group
from uffdsnap.image import ImageWriter, extent_checksum
from uffdsnap.native import core as snapcore_module
from uffdsnap.native import uffd as K
from uffdsnap.native.core import SC_EVENT, SC_FAILED, SC_GONE, SnapCore, describe_error
from uffdsnap.native.core import load as load_snapcore
from uffdsnap.native.libc import KernelError
from uffdsnap.native.pidfd import pidfd_open, process_alive
from uffdsnap.native.scm import is_unix_stream
from uffdsnap.procfs import (
    Mapping,
    SharedObject,
    find_mappers,
    mappings_of,
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
    FaultChannel,
    Gone,
    Hello,
    Protect,
    Protected,
    ProtocolError,
    Release,
    Released,
    RemoteProtocolError,
    Removed,
    Result,
    Role,
    Snap,
    Tracked,
    Unprotect,
    Welcome,
)
from uffdsnap.stats import LatencyHistogram, monotonic_ns

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Copy worker threads: each keeps one CPU busy copying, and a writer blocked on a fault needs a
# CPU for the fault service: leave one free (measured on 2 vCPUs: two workers copy 1.1-1.5x raw
# but push fault service p99 to ~5 ms; one copies at ~raw speed).
COPY_WORKERS = max(1, min(2, (os.cpu_count() or 1) - 1))
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
    lost_own: bool = False  # its own process lives on untracked (it exec'd)
    delegated: list[Tracker] = field(default_factory=list)  # our copies of its uffds
    fault_channel: int = -1  # our end of its fault channel (agents mode), during a snapshot

    @property
    def pids(self) -> set[int]:
        return {*([] if self.lost_own else [self.pid]), *self.children}

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
    # The native data path: the `saved` page map, image writes, window copies, and the
    # service of delegated faults (uffdsnap/native/src/snapcore.c).
    core: SnapCore
    phase: str = "joining"  # joining -> protecting -> copying -> releasing
    held: list[tuple[Peer, int, int]] = field(default_factory=list)
    failure: str | None = None
    failed: trio.Event = field(default_factory=trio.Event)
    all_protected: trio.Event = field(default_factory=trio.Event)
    peers: list[Peer] = field(default_factory=list)
    gone: list[dict[str, Any]] = field(default_factory=list)
    faults: int = 0
    duplicate_faults: int = 0
    bytes_scanned: int = 0
    held_wait_max_ns: int = 0
    protect_started_ns: int = 0
    # Delegated uffds and fault channels the core serves, by the core's name for them.
    delegated: dict[int, tuple[Peer, Tracker]] = field(default_factory=dict)
    channels: dict[int, Peer] = field(default_factory=dict)
    fault_channels: int = 0  # agents that served their faults through one this snapshot

    @property
    def saved(self) -> memoryview:
        """One byte per page, 1 once the page's content at T is in the image."""
        return self.core.saved

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
        load_snapcore()  # build (once, cached) and load the native data path, or fail now
        self.obj = obj
        self.page_size = obj.page_size
        self.npages = -(-obj.size // obj.page_size)  # the last page may be partial
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
        self._hooks: testhooks.Hooks = test_hooks or {}
        self.attacher = (Attacher(attach_path, self._hooks.get("agent")) if attach_path
                         else None)
        # Delegated mode: agents hand us copies of their uffds while protected; we read their
        # faults and un-protect directly, with no message round trips.
        self.delegate = delegate
        self._next_child_ident = 1 << 32
        self._next_core_ident = 0
        self._nursery: trio.Nursery | None = None
        # (self._hooks, set above: test hooks, never set in normal use: deliberately wrong
        # behaviours that prove the checker catches them, pauses at a phase; see testhooks.py)
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
        """One peer, start to end. Whatever goes wrong here ends this connection only: the
        coordinator keeps serving every other peer and client."""
        try:
            with unwrap_group():
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    hello = await chan.receive()
                assert isinstance(hello, Hello)  # the state machine admits nothing else first
                if hello.role == Role.CLIENT.value:
                    await chan.send(self._welcome())
                    await self._serve_client(chan)
                else:
                    await self._serve_agent(chan, hello)
        except (PeerClosed, trio.TooSlowError, OSError):
            pass
        except ProtocolError as e:
            with trio.move_on_after(1):
                try:
                    await chan.send(Abort(f"protocol error: {e}"))
                except (PeerClosed, ProtocolError, OSError):
                    pass
        except Exception as e:  # a bug must not take every other peer down with it
            log.error("connection dropped after an unexpected error: %s: %s",
                      type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
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
                except (SnapshotFailed, UserError, OSError) as e:
                    await chan.send(Result(False, str(e) or type(e).__name__, {}))
                else:
                    await chan.send(Result(True, "", _flat(summary)))
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
        why = ""
        try:
            await chan.send(self._welcome())  # first; whatever _join queued follows it
            with unwrap_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, peer, outbox_recv, nursery.cancel_scope)
                    await self._agent_messages(peer)
                    nursery.cancel_scope.cancel()
        except (PeerClosed, ProtocolError, OSError) as e:
            why = f"agent for pid {peer.pid} ({peer.comm}) lost: {e}"
        except Exception as e:
            log.error("agent for pid %d: unexpected error: %s: %s", peer.pid,
                      type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            why = f"agent for pid {peer.pid} ({peer.comm}) lost: {type(e).__name__}: {e}"
        finally:
            if not why and peer.send_error:
                why = f"agent for pid {peer.pid} ({peer.comm}) lost: {peer.send_error}"
            self._lost(peer, why)  # on every way out, cancellation included
            self._close_delegated(peer)
            self._close_channel(peer)
            os.close(pidfd)

    async def _send_loop(self, peer: Peer, outbox: trio.MemoryReceiveChannel[Any],
                         scope: trio.CancelScope) -> None:
        async with outbox:
            try:
                async for item in outbox:
                    msg, fds = item if isinstance(item, tuple) else (item, [])
                    if isinstance(msg, Unprotect) and not _unprotectable(peer):
                        continue  # released meanwhile: nothing is protected there any more
                    try:
                        await peer.chan.send(msg, fds)
                    except (PeerClosed, ProtocolError, OSError, trio.ClosedResourceError) as e:
                        peer.send_error = f"sending {msg.TYPE}: {e}"
                        scope.cancel()
                        return
                    finally:
                        _close_all(fds)
            finally:  # fds queued with messages that will never go out
                while True:
                    try:
                        item = outbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                    if isinstance(item, tuple):
                        _close_all(item[1])

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
        elif self._maps_object_writable(peer.pid):
            run.fail(f"process {peer.pid} ({peer.comm}) joined after T: its earlier writes "
                     "were not tracked")
        # (one that does not map the object cannot have written it: it joins the next one)

    def _maps_object_writable(self, pid: int) -> bool:
        try:
            return any(m.writable for m in mappings_of(pid, self.obj.object_id))
        except OSError:
            return False  # gone, or hidden from us: then it is no mapper we could track

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
                    if self._hooks.get("serve_before_t"):
                        self._serve_before_t(run, peer)
                    self._check_all_protected(run)
            elif isinstance(msg, Released):
                peer.release_stats = msg
                peer.released.set()
            elif isinstance(msg, Delegate):
                self._take_delegate(peer, msg, peer.chan.take_fd())
            elif isinstance(msg, FaultChannel):
                self._take_channel(peer, msg, peer.chan.take_fd())
            elif isinstance(msg, Tracked):
                peer.children = tuple(p for p in msg.pids if p != peer.pid)
                peer.lost_own = peer.pid not in msg.pids
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
            last = min((off + length) // self.page_size, self.npages)
            for page in range(off // self.page_size, last):
                if not run.saved[page] and _is_hole(self.obj.fd, page * self.page_size):
                    run.fail(f"pages at offset {page * self.page_size:#x} were removed "
                             "(MADV_REMOVE or a hole punch) during the snapshot: not trackable")
                    return

    def _serve_before_t(self, run: Run, peer: Peer) -> None:
        """Test hook serve_before_t, wrong on purpose: serve this process's faults now that its
        own agent has protected, without waiting for the others (no instant T exists then)."""
        run.core.go()
        for held in [h for h in run.held if h[0] is peer]:
            run.held.remove(held)
            self._save_page(run, held[1] // self.page_size)
            self._unprotect_one(peer, held[1])

    def _check_all_protected(self, run: Run) -> None:
        if run.phase == "protecting" and all(p.protected for p in run.peers):
            run.all_protected.set()

    # ---- faults and un-protects -------------------------------------------------------------

    def _on_fault(self, peer: Peer, msg: Fault) -> None:
        run = self.run
        if run is None or run.phase in ("joining", "releasing"):
            # stale: read before an earlier release (nothing is protected while joining);
            # answered, never saved (its content is not the next snapshot's T)
            self._unprotect_one(peer, msg.offset)
            return
        run.faults += 1
        if run.phase == "protecting" and not (self._hooks.get("serve_before_t")
                                              and peer.protected):
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
        try:
            if run.core.save_page(page):
                self._queue_unprotect(page * self.page_size, self.page_size)
        except KernelError as e:
            run.fail(f"saving a faulting page: {e}")

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

    # ---- fault channels (agents mode) ---------------------------------------------------------

    def _take_channel(self, peer: Peer, msg: FaultChannel, sock: int) -> None:
        """The agent's core forwards its faults over `sock`; ours serves them."""
        if not is_unix_stream(sock):
            os.close(sock)
            raise RemoteProtocolError("faults: the fd passed is not a Unix stream socket")
        run = self.run
        if run is None or run.id != msg.snapshot or run.phase == "releasing":
            os.close(sock)
            return
        self._close_channel(peer)
        key = self._core_key()
        peer.fault_channel = sock
        run.channels[key] = peer
        run.fault_channels += 1
        try:
            run.core.add_channel(key, sock)
        except KernelError as e:
            run.fail(f"serving faults of pid {peer.pid}: {e}")

    def _core_key(self) -> int:
        """A name for a uffd or channel in the core, unique for this coordinator."""
        self._next_core_ident += 1
        return self._next_core_ident

    def _close_channel(self, peer: Peer) -> None:
        if peer.fault_channel < 0:
            return
        run = self.run
        if run is not None:
            for key, p in list(run.channels.items()):
                if p is peer:
                    run.core.remove(key)
                    del run.channels[key]
        os.close(peer.fault_channel)
        peer.fault_channel = -1

    def _channel_lost(self, run: Run, peer: Peer) -> None:
        """A fault channel ended: fine if the agent's processes are gone, otherwise its
        writers would wait for un-protects that cannot come."""
        self._close_channel(peer)
        if peer in run.peers and not peer.released.is_set() and peer.any_alive():
            run.fail(f"agent for pid {peer.pid} ({peer.comm}) lost: its fault channel closed")

    # ---- delegated mode ----------------------------------------------------------------------

    def _take_delegate(self, peer: Peer, msg: Delegate, uffd: int) -> None:
        """Keep a copy of one of the agent's uffds; the native core serves its faults."""
        if not K.is_userfaultfd(uffd):
            os.close(uffd)
            raise RemoteProtocolError("delegate: the fd passed is not a userfaultfd")
        maps = [Mapping(a, a + n, "rw-s", off, self.obj.object_id, "")
                for a, n, off in msg.mappings]
        tracker = Tracker(uffd, msg.pid or None, self.obj.object_id, self.page_size, maps,
                          [(m.start, m.end) for m in maps], True, ident=msg.tracker)
        self._adopt_delegated(peer, tracker)

    def _adopt_delegated(self, peer: Peer, tracker: Tracker) -> None:
        peer.delegated.append(tracker)
        run = self.run
        if run is None or run.phase == "releasing":
            self._drop_delegated(peer, tracker)  # nothing to serve: the agent keeps its own
            return
        key = self._core_key()
        run.delegated[key] = (peer, tracker)
        try:
            tracker.lend(run.core, key)
        except KernelError as e:
            run.fail(f"serving faults of pid {tracker.pid}: {e}")

    def _drop_delegated(self, peer: Peer, tracker: Tracker) -> None:
        """Stop serving one delegated uffd and close our copy (if the agent is gone too, that
        releases its process)."""
        run = self.run
        if run is not None:
            for key, (_, t) in list(run.delegated.items()):
                if t is tracker:
                    run.core.remove(key)
                    del run.delegated[key]
        if tracker in peer.delegated:
            peer.delegated.remove(tracker)
        tracker.close()

    def _close_delegated(self, peer: Peer) -> None:
        for tracker in list(peer.delegated):
            self._drop_delegated(peer, tracker)

    async def _core_events(self, run: Run) -> None:
        """Handle what the native core cannot: fork/mremap/munmap/MADV_REMOVE events (each
        pauses its uffd until handled here), processes gone, failures."""
        while True:
            await trio.lowlevel.wait_readable(run.core.notify_fd)
            for ev in run.core.take_events():
                entry = run.delegated.get(ev.ident)
                peer = entry[0] if entry else run.channels.get(ev.ident)
                if ev.kind == SC_FAILED:
                    who = f" of pid {peer.pid}" if peer else ""
                    run.fail(f"serving faults{who}: {describe_error(ev.err)}")
                elif ev.kind == SC_GONE and ev.ident in run.channels:
                    self._channel_lost(run, run.channels[ev.ident])
                elif entry is None:
                    if ev.kind == SC_EVENT:  # its uffd was dropped meanwhile
                        K.close_fork_uffd(ev.msg)
                elif ev.kind == SC_GONE:  # exited or exec'd: nothing left to protect there
                    self._drop_delegated(*entry)
                else:
                    self._core_event(run, ev.ident, *entry, K.decode_message(ev.msg))

    def _leftover_core_events(self, run: Run) -> None:
        """After the core stopped: what it read and we did not handle. Agents must still learn
        of remaps and unmaps (to release the right ranges) and get forked children's uffds;
        faults need nothing (release wakes them)."""
        leftovers = [(ev.ident, ev.msg) for ev in run.core.take_events() if ev.kind == SC_EVENT]
        leftovers += [(key, msg) for key in list(run.delegated)
                      for msg in run.core.take_pending(key)]
        for key, msg in leftovers:
            event = K.decode_message(msg)
            entry = run.delegated.get(key)
            if entry is None or not isinstance(event, K.Fork | K.Remap | K.Unmap):
                K.close_fork_uffd(msg)
                continue
            peer, tracker = entry
            if isinstance(event, K.Fork):
                self._forward(peer, Event(tracker.ident, "fork", child=self._next_child_ident),
                              [event.uffd])
                self._next_child_ident += 1
                os.close(event.uffd)  # the agent has its own copy now (or will never need one)
            else:
                self._delegated_event(peer, tracker, event)

    def _core_event(self, run: Run, key: int, peer: Peer, tracker: Tracker,
                    event: K.UffdEvent) -> None:
        try:
            self._delegated_event(peer, tracker, event)
            run.core.set_maps(key, tracker.spans_with_offsets())
        except KernelError as e:
            if e.errno in GONE:
                self._drop_delegated(peer, tracker)
                return
            run.fail(f"following pid {tracker.pid}: {e}")
        run.core.resume(key)

    def _delegated_event(self, peer: Peer, tracker: Tracker, event: K.UffdEvent) -> None:
        if isinstance(event, K.Fork):
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
        """Queue an event for the agent. Passed fds are duplicated: the queue owns its copies
        (closed once sent or dropped), whatever happens to ours meanwhile."""
        owned = [os.dup(fd) for fd in fds or []]
        try:
            peer.outbox.send_nowait((msg, owned))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            _close_all(owned)
            if self.run is not None:
                self.run.fail(f"agent for pid {peer.pid} fell behind on events")

    async def _broadcast_unprotects(self) -> None:
        """Tell the agents about queued saved ranges, coalesced, in as few messages as possible
        (not those the core reaches itself: delegated uffds and fault channels)."""
        while True:
            await self._unprotect_ready.wait()
            self._unprotect_ready = trio.Event()
            ranges, self._pending_unprotect = coalesce(self._pending_unprotect), []
            for start in range(0, len(ranges), MAX_RANGES):
                msg = Unprotect(tuple(ranges[start:start + MAX_RANGES]))
                for peer in list(self.peers):
                    if _unprotectable(peer) and not peer.delegated and peer.fault_channel < 0:
                        await self._post(peer, msg)

    # ---- the snapshot ----------------------------------------------------------------------

    async def snapshot(self, output: str, *, overwrite: bool = False) -> dict[str, Any]:
        """Take one snapshot into `output`; return its summary or raise SnapshotFailed."""
        async with self._snapshot_lock:
            writer = ImageWriter(output, self.obj.size, self.page_size, overwrite=overwrite)
            try:
                core = SnapCore(self.obj.fd, writer.fd, self.obj.size, self.page_size)
            except BaseException:
                writer.abort()
                raise
            if self._hooks.get("unprotect_before_save"):  # wrong on purpose
                core.set_test_flags(snapcore_module.TEST_UNPROTECT_BEFORE_SAVE)
            run = Run(self._next_id, writer, core)
            self._next_id += 1
            self.run = run
            self._paused.clear()
            try:
                with unwrap_group():
                    summary = await self._take(run)
                writer.publish(self._manifest(run, summary))
                return summary
            except BaseException:
                writer.abort()
                raise
            finally:
                self.run = None
                core.close()

    async def _take(self, run: Run) -> dict[str, Any]:
        t_start = monotonic_ns()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on, run.failed, scope)
                    nursery.start_soon(self._core_events, run)
                    if self.attacher is not None:
                        await self._attach(self._untracked_writers(self.peers))
                    await self._test_pause("joining")
                    await self._protect_all(run)
                    t_mono, t_wall = monotonic_ns(), time.time_ns()
                    run.phase = "copying"
                    run.core.go()  # the delegated faults held until T, then all as they come
                    await self._test_pause("copying")
                    await self._copy(run)
                    await self._test_pause("finishing")
                    scope.cancel()
            if run.failure:
                raise SnapshotFailed(run.failure)
            t_copied = monotonic_ns()
        finally:
            with trio.CancelScope(shield=True):
                await self._release_all(run)
                await self._dismiss_attached()
        # Both checks after every agent has released: by then each has reported what it saw
        # during the copy (exits, execs, escapes), so nothing it knows can still be in flight.
        self._check_release_audits(run)
        self._check_no_untracked_writers(run, "during the snapshot")
        if run.failure:
            raise SnapshotFailed(run.failure)
        return self._summary(run, t_start, t_mono, t_wall, t_copied)

    def _check_release_audits(self, run: Run) -> None:
        """Each agent's `released` says whether writes may have escaped tracking in its
        processes (a mapping found unprotected: grown in place, mapped anew, exec); without
        that word from an agent whose process lives, the snapshot is not proven either."""
        if self._hooks.get("no_protect"):
            return
        escapes = [e for p in run.peers if p.release_stats for e in p.release_stats.escapes]
        silent = [p.pid for p in run.peers if p.release_stats is None and p.any_alive()]
        if escapes:
            more = f" (and {len(escapes) - 1} more)" if len(escapes) > 1 else ""
            raise SnapshotFailed(f"writes may have escaped tracking: {escapes[0]}{more}")
        if silent:
            raise SnapshotFailed(f"agents for pids {silent} did not confirm their release: "
                                 "whether every mapping stayed protected is unknown")

    async def _test_pause(self, phase: str) -> None:
        """With the hook pause_in=PHASE, say so on stderr and stay in that phase (still serving
        faults) until SIGUSR1, an agent joins or leaves, the snapshot fails, or we are killed."""
        at_phase = self._hooks.get("at_phase", {}).get(phase)
        if at_phase is not None and phase not in self._paused:
            self._paused.add(phase)
            await at_phase()  # in-process tests: their own code, at this point of the snapshot
            return
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
                if self._hooks.get("ignore_late_mappers"):  # wrong on purpose
                    return
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
        if self._hooks.get("no_protect") or self._hooks.get("ignore_late_mappers"):
            return
        untracked = self._untracked_writers(run.peers)
        if untracked:
            names = ", ".join(f"{pid} ({process_comm(pid)})" for pid in untracked)
            run.fail(f"untracked process(es) map the object writable {when}: {names}")

    async def _copy(self, run: Run) -> None:
        """Held faults first, then every remaining page in large windows."""
        now = monotonic_ns()
        for _peer, offset, seen_ns in run.held:
            run.held_wait_max_ns = max(run.held_wait_max_ns, now - seen_ns)
            self._save_page(run, offset // self.page_size)
        run.held.clear()
        # COPY_WORKERS threads take windows from one scan and copy each through the core (the
        # GIL released), with no event-loop hop per window; they stop at the next window when
        # the snapshot fails or is cancelled.
        scan = CopyScan(copy_windows(self.obj.fd, self.obj.size, self.page_size,
                                     self.chunk_bytes), self.obj.size)
        tell_agents = any(not p.delegated and p.fault_channel < 0 for p in run.peers)
        async with trio.open_nursery() as watch:
            watch.start_soon(_set_when_cancelled, scan.stop)
            watch.start_soon(_set_on, run.failed, scan.stop)
            async with trio.open_nursery() as workers:
                for _ in range(COPY_WORKERS):
                    workers.start_soon(self._copy_worker, run, scan, tell_agents)
            watch.cancel_scope.cancel()
        run.bytes_scanned = scan.scanned

    async def _copy_worker(self, run: Run, scan: CopyScan, tell_agents: bool) -> None:
        token = trio.lowlevel.current_trio_token()

        def claimed(runs: list[tuple[int, int]]) -> None:  # in the worker thread
            if tell_agents and runs:
                trio.from_thread.run_sync(self._queue_runs, runs, trio_token=token)

        def progress(done: int) -> None:  # in the worker thread
            if self.on_progress is not None:
                trio.from_thread.run_sync(self.on_progress, done, self.obj.size,
                                          trio_token=token)

        buf = bytearray(self.chunk_bytes)  # reused: a fresh one per window page-faults
        error = await trio.to_thread.run_sync(
            _copy_loop, run, scan, buf, claimed, progress, self._hooks.get("scan_delay_s", 0))
        if error:
            run.fail(error)

    def _queue_runs(self, runs: list[tuple[int, int]]) -> None:
        for a, b in runs:
            self._queue_unprotect(a, b - a)

    async def _release_all(self, run: Run) -> None:
        run.phase = "releasing"
        run.core.stop()
        self._leftover_core_events(run)
        for peer in self.peers:
            self._close_delegated(peer)  # before the agents read their uffds again
            self._close_channel(peer)
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
        core = run.core.stats()
        hist = LatencyHistogram()
        hist.merge(core.service_buckets, core.service_max_ns)
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
            "start_pause_max_ns": max(run.held_wait_max_ns, core.held_wait_max_ns),
            "faults": run.faults + core.faults,
            "fault_channels": run.fault_channels,
            "duplicate_faults": run.duplicate_faults + core.duplicates,
            "pages_saved_by_faults": core.fault_pages_saved,
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


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _set_on(event: trio.Event, flag: threading.Event) -> None:
    await event.wait()
    flag.set()


async def _set_when_cancelled(flag: threading.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        flag.set()


FORK_REPORT_GRACE_S = 2.0
HOLE_CLAIM_BYTES = 64 << 20  # holes are claimed in pieces: the core returns runs per piece
PROGRESS_BYTES = 64 << 20  # how often copy workers report progress


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


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


@dataclass(eq=False)
class CopyScan:
    """The copy's windows, shared by the copy worker threads."""

    windows: Iterator[tuple[int, int, bool]]
    size: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    scanned: int = 0
    reported: int = 0

    def next(self) -> tuple[int, int, bool] | None:
        with self.lock:
            return None if self.stop.is_set() else next(self.windows, None)

    def done(self, end: int, length: int) -> int | None:
        """Count a copied window; returns the position to report as progress, if due."""
        with self.lock:
            self.scanned += length
            if end >= self.size or end - self.reported >= PROGRESS_BYTES:
                self.reported = max(self.reported, end)
                return self.reported
            return None


def _copy_loop(run: Run, scan: CopyScan, buf: bytearray,
               claimed: Callable[[list[tuple[int, int]]], None],
               progress: Callable[[int], None], delay_s: float) -> str:
    """A copy worker thread: copy windows until the scan ends or stops. Data windows go
    through the core, which reads them, claims their unsaved pages, takes pages saved earlier
    (by faults) from the image and stores the claimed ones; their content at T is checksummed
    here. Hole windows were holes at T (a page filled since then faulted and was saved): only
    their unsaved pages are claimed. Returns an error, or "" when done."""
    try:
        while (window := scan.next()) is not None:
            start, length, is_data = window
            if is_data:
                if delay_s:  # test hook: a deliberately slow scan
                    time.sleep(delay_s)
                view = memoryview(buf)[:length]
                claimed(run.core.copy_window(start, length, view))
                run.writer.record_extent(start, length, extent_checksum(view))
            else:
                for piece in range(start, start + length, HOLE_CLAIM_BYTES):
                    claimed(run.core.claim(piece, min(HOLE_CLAIM_BYTES, start + length - piece)))
            report = scan.done(start + length, length if is_data else 0)
            if report is not None:
                progress(report)
    except KernelError as e:
        scan.stop.set()
        return f"copying: {e}"
    return ""
