"""One snapshot's link to the native core (uffdsnap/native/src/snapcore.c): the agents' fault
channels (agents mode) and the uffds they delegate (delegated mode) that the core serves, and
the core's events that need policy: fork/mremap/munmap/MADV_REMOVE on a delegated uffd (each
pauses its uffd until handled here), processes gone, failures, and the ranges to un-protect in
agents that have neither (relayed from the core's one batcher)."""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from uffdsnap.coordinator._peers import Peer
from uffdsnap.native import uffd as K
from uffdsnap.native.core import (
    SC_EVENT,
    SC_FAILED,
    SC_GONE,
    SC_SAVED,
    SC_UNPROTECT,
    CoreEvent,
    SnapCore,
    describe_error,
)
from uffdsnap.native.libc import KernelError
from uffdsnap.native.scm import is_unix_stream
from uffdsnap.procfs import Mapping, ObjectId
from uffdsnap.protocol import Delegate, Event, FaultChannel, RemoteProtocolError
from uffdsnap.tracker import GONE, Tracker

log = logging.getLogger(__name__)

# Why the core closed an agent's fault channel (SC_FAILED), in words.
_WHY = {
    errno.ETIMEDOUT: "its agent took no un-protect within the fault deadline (it stopped "
                     "reading its fault channel)",
    errno.ENOBUFS: "its agent reads its fault channel slower than un-protects are made",
    errno.EOVERFLOW: "its agent sent more faults than any workload blocks on (flooding)",
    errno.EPROTO: "its agent sent a malformed frame on its fault channel",
}


def check_lent_fd(msg: Delegate | FaultChannel, fd: int) -> None:
    """A `delegate` must carry a userfaultfd, a `faults` message a Unix stream socket: anything
    else is closed and ends the connection (RemoteProtocolError)."""
    if isinstance(msg, Delegate) and not K.is_userfaultfd(fd):
        os.close(fd)
        raise RemoteProtocolError("delegate: the fd passed is not a userfaultfd")
    if isinstance(msg, FaultChannel) and not is_unix_stream(fd):
        os.close(fd)
        raise RemoteProtocolError("faults: the fd passed is not a Unix stream socket")


@dataclass
class Idents:
    """Names that must stay unique for the coordinator's life: keys of uffds and channels in a
    core, and the idents of children forked under a delegated uffd (agents learn them)."""

    core_keys: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    children: itertools.count[int] = field(default_factory=lambda: itertools.count(1 << 32))


@dataclass(eq=False)
class CoreLink:
    """What one snapshot's core serves, by the core's keys, and what it tells us back."""

    core: SnapCore
    object_id: ObjectId
    page_size: int
    idents: Idents
    fail: Callable[[str], None]  # the snapshot cannot be proven
    removed: Callable[[list[tuple[int, int]]], None]  # MADV_REMOVE hit these object ranges
    unprotect: Callable[[list[tuple[int, int]]], None]  # for agents on the main connection
    channels: dict[int, Peer] = field(default_factory=dict)
    delegated: dict[int, tuple[Peer, Tracker]] = field(default_factory=dict)
    fault_channels: int = 0  # agents that served their faults through one this snapshot
    relaying: bool = False
    closed: bool = False

    # ---- fault channels (agents mode) ------------------------------------------------------

    def take_channel(self, peer: Peer, sock: int) -> None:
        """The agent's core forwards its faults over `sock` (checked by check_lent_fd); ours
        serves them (and owns it)."""
        if self.closed:
            os.close(sock)
            return
        self.close_channel(peer)
        key = next(self.idents.core_keys)
        peer.fault_channel = sock
        self.channels[key] = peer
        self.fault_channels += 1
        try:
            self.core.add_channel(key, sock)
        except KernelError as e:
            self.fail(f"serving faults of pid {peer.pid}: {e}")

    def close_channel(self, peer: Peer) -> None:
        if peer.fault_channel < 0:
            return
        for key, p in list(self.channels.items()):
            if p is peer:
                self.core.remove(key)
                del self.channels[key]
        os.close(peer.fault_channel)
        peer.fault_channel = -1

    def relay_for(self, peer: Peer) -> None:
        """`peer` takes its un-protects on the main connection: have the core relay them."""
        if not self.relaying and not peer.delegated and peer.fault_channel < 0:
            self.relaying = True
            try:
                self.core.relay_unprotects()
            except KernelError as e:
                self.fail(f"relaying un-protects: {e}")

    # ---- delegated mode ---------------------------------------------------------------------

    def take_delegate(self, peer: Peer, msg: Delegate, uffd: int) -> None:
        """Keep a copy of one of the agent's uffds (checked by check_lent_fd); the core serves
        its faults."""
        maps = [Mapping(a, a + n, "rw-s", off, self.object_id, "")
                for a, n, off in msg.mappings]
        tracker = Tracker(uffd, msg.pid or None, self.object_id, self.page_size, maps,
                          [(m.start, m.end) for m in maps], True, ident=msg.tracker)
        self._adopt(peer, tracker)

    def _adopt(self, peer: Peer, tracker: Tracker) -> None:
        peer.delegated.append(tracker)
        if self.closed:
            self.drop(peer, tracker)  # nothing to serve: the agent keeps its own
            return
        key = next(self.idents.core_keys)
        self.delegated[key] = (peer, tracker)
        try:
            tracker.lend(self.core, key)
        except KernelError as e:
            self.fail(f"serving faults of pid {tracker.pid}: {e}")

    def drop(self, peer: Peer, tracker: Tracker) -> None:
        """Stop serving one delegated uffd and close our copy (if the agent is gone too, that
        releases its process)."""
        for key, (_, t) in list(self.delegated.items()):
            if t is tracker:
                self.core.remove(key)
                del self.delegated[key]
        if tracker in peer.delegated:
            peer.delegated.remove(tracker)
        tracker.close()

    def close_peer(self, peer: Peer) -> None:
        """The peer is done with this snapshot (released, or its connection ended)."""
        for tracker in list(peer.delegated):
            self.drop(peer, tracker)
        self.close_channel(peer)

    # ---- the core's events ------------------------------------------------------------------

    def _failed(self, ev: CoreEvent) -> None:
        """SC_FAILED: the snapshot cannot be proven (the core has closed a channel past its
        limits already; a failure of the run as a whole has ident -1)."""
        entry = self.delegated.get(ev.ident)
        peer = entry[0] if entry else self.channels.get(ev.ident)
        who = f" of pid {peer.pid}" if peer else ""
        why = _WHY.get(ev.err) if ev.ident in self.channels else None
        self.fail(f"serving faults{who}: {why or describe_error(ev.err)}")

    async def serve_events(self, lost_channel: Callable[[Peer], None]) -> None:
        """Until cancelled: handle what the core cannot."""
        while True:
            await trio.lowlevel.wait_readable(self.core.notify_fd)
            ranges = []
            for ev in self.core.take_events():
                if ev.kind not in (SC_UNPROTECT, SC_SAVED):
                    log.debug("core event: ident %d kind %d err %d", ev.ident, ev.kind, ev.err)
                if ev.kind == SC_UNPROTECT:
                    ranges.append(ev.unprotected)
                    continue
                if ev.kind == SC_SAVED:  # pages for take_fault_saved (when recording is on)
                    continue
                entry = self.delegated.get(ev.ident)
                if ev.kind == SC_FAILED:
                    self._failed(ev)
                elif ev.kind == SC_GONE and ev.ident in self.channels:
                    channel_peer = self.channels[ev.ident]
                    self.close_channel(channel_peer)
                    lost_channel(channel_peer)
                elif entry is None:
                    if ev.kind == SC_EVENT:  # its uffd was dropped meanwhile
                        log.debug("event of dropped uffd %d: %s", ev.ident,
                                  K.decode_message(ev.msg))
                        K.close_fork_uffd(ev.msg)
                elif ev.kind == SC_GONE:
                    self._gone(ev.ident, *entry)
                else:
                    self._event(ev.ident, *entry, K.decode_message(ev.msg))
            if ranges:
                self.unprotect(ranges)

    def _gone(self, key: int, peer: Peer, tracker: Tracker) -> None:
        """Its process exited or exec'd: nothing left to protect there. But a fork the core read
        just before (an un-protect met EAGAIN and drained it) and had not handled yet has a
        child that lives on, registered and protected: it is followed, never closed (closing its
        uffd would let it write untracked)."""
        for msg in self.core.take_pending(key):
            event = K.decode_message(msg)
            if isinstance(event, K.Fork):
                log.debug("pid %s (tracker %d) forked, then exited", tracker.pid, tracker.ident)
                self._follow(peer, tracker, event)
            else:
                K.close_fork_uffd(msg)
        self.drop(peer, tracker)

    def _event(self, key: int, peer: Peer, tracker: Tracker, event: K.UffdEvent) -> None:
        try:
            self._follow(peer, tracker, event)
            self.core.set_maps(key, tracker.spans_with_offsets())
        except KernelError as e:
            if e.errno in GONE:
                self.drop(peer, tracker)
                return
            self.fail(f"following pid {tracker.pid}: {e}")
        self.core.resume(key)

    def _follow(self, peer: Peer, tracker: Tracker, event: K.UffdEvent) -> None:
        """Apply an event of a delegated uffd here, and tell its agent (it applies it too)."""
        if isinstance(event, K.Fork):
            child = Tracker(event.uffd, None, tracker.object_id, tracker.page_size,
                            list(tracker.mappings), list(tracker.registered), tracker.protected,
                            ident=next(self.idents.children))
            self._adopt(peer, child)
            log.debug("pid %s (tracker %d) forked: told its agent", tracker.pid, tracker.ident)
            self._forward(peer, Event(tracker.ident, "fork", child=child.ident), [child.uffd])
        elif isinstance(event, K.Remap):
            tracker.remapped(event)
            self._forward(peer, Event(tracker.ident, "remap", event.old_address,
                                      event.new_address, event.length))
        elif isinstance(event, K.Unmap):
            tracker.unmapped(event.start, event.end)
            self._forward(peer, Event(tracker.ident, "unmap", event.start, event.end))
        elif isinstance(event, K.Remove):
            spans = [(tracker.offset_of(a), n) for a, n in tracker.spans_of(event.start,
                                                                            event.end)]
            self.removed([(o, n) for o, n in spans if o is not None])

    def _forward(self, peer: Peer, msg: Event, fds: list[int] | None = None) -> None:
        """Queue an event for the agent. Passed fds are duplicated: the queue owns its copies
        (closed once sent or dropped), whatever happens to ours meanwhile."""
        if not peer.post_nowait(msg, [os.dup(fd) for fd in fds or []]):
            self.fail(f"agent for pid {peer.pid} fell behind on events")

    def stop(self) -> None:
        """Stop the core's thread and hand on what it read and we did not handle: agents must
        still learn of remaps and unmaps (to release the right ranges) and get forked
        children's uffds; faults need nothing (release wakes them)."""
        self.closed = True
        self.core.stop()
        events = self.core.take_all_events()  # all of them: none may be left behind
        for ev in events:
            if ev.kind == SC_FAILED:  # too late for serve_events, not for the verdict
                self._failed(ev)
        leftovers = [(ev.ident, ev.msg) for ev in events if ev.kind == SC_EVENT]
        leftovers += [(key, msg) for key in list(self.delegated)
                      for msg in self.core.take_pending(key)]
        for key, msg in leftovers:
            event = K.decode_message(msg)
            entry = self.delegated.get(key)
            if entry is None or not isinstance(event, K.Fork | K.Remap | K.Unmap):
                K.close_fork_uffd(msg)
                continue
            peer, tracker = entry
            if isinstance(event, K.Fork):
                self._forward(peer, Event(tracker.ident, "fork",
                                          child=next(self.idents.children)), [event.uffd])
                os.close(event.uffd)  # the agent has its own copy now (or will never need one)
            else:
                self._follow(peer, tracker, event)
