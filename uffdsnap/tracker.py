"""One process's userfaultfd and its mappings of the object: register, protect, translate
offsets ⇄ addresses, follow mremap/munmap, un-protect, release.

Used by the agent for the processes it tracks, and by the coordinator in delegated mode, where it
holds a copy of each uffd and un-protects directly.
"""

from __future__ import annotations

import bisect
import errno
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from uffdsnap.native import uffd as K
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import Mapping, ObjectId, mappings_of

if TYPE_CHECKING:
    from uffdsnap.native.core import SnapCore


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat start times use."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))



# errnos with which a uffd ioctl says its creator's address space is gone (exit or exec):
# REGISTER/UNREGISTER report ENOMEM, the others ESRCH.
GONE = (errno.ESRCH, errno.ENOMEM)
EAGAIN_RETRIES = 2000
# Delegated mode: how long an ioctl that meets EAGAIN waits for the coordinator's core to read
# the pending event before reading it here (past that, it has stopped reading)
COORDINATOR_READ_WAIT_S = 0.25


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
    ident: int = 0  # the agent's name for it on the wire (delegated mode)
    never_writable: set[tuple[int, int]] = field(default_factory=set)
    # Who reads this uffd's messages when an ioctl meets EAGAIN: by default we do (into
    # `backlog`); a coordinator's native core, the only reader of a delegated uffd, sets its own.
    drain: Callable[[], int] | None = None
    # Delegated mode: the coordinator's core reads this uffd, so an ioctl of ours that meets
    # EAGAIN waits (bounded) for it to read the pending event. Read here, a fork's child uffd
    # would be installed in the agent, where nobody serves that child's faults.
    coordinator_reads: bool = False
    # Mappings found unprotected while protected (grown by mremap, or new): writes may have
    # reached them before we protected them, so they fail the snapshot (the agent reports them).
    escapes: list[str] = field(default_factory=list)
    # forked while its parent was protected: a child of this snapshot (reported, named or not)
    born_in_snapshot: bool = False
    # Write tracking: left registered and protected at the last release (`release` with keep),
    # so every write since then faulted, except through a mapping our registration does not
    # cover; `gap` says why, if one was found at the next protect.
    kept: bool = False
    gap: str = ""

    def _call(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run one uffd ioctl; while a fork/remap/remove event is pending the kernel answers
        EAGAIN: read the pending events (kept in `backlog` for the reader) and retry."""
        waited_until = 0.0
        for _ in range(EAGAIN_RETRIES):
            try:
                fn(*args, **kwargs)
                return
            except KernelError as e:
                if e.errno != errno.EAGAIN:
                    raise
            if self.coordinator_reads:
                waited_until = waited_until or time.monotonic() + COORDINATOR_READ_WAIT_S
                if time.monotonic() < waited_until:
                    time.sleep(0.0005)  # for the coordinator's core to read it
                    continue
            if self.drain is not None:
                got = self.drain()
            else:
                events = K.read_events(self.uffd)
                self.backlog.extend(events)
                got = len(events)
            if not got:
                time.sleep(0.0001)
        raise KernelError("uffd ioctl", errno.EAGAIN, f"uffd={self.uffd}",
                          "an event stayed pending; the process is changing its mappings")

    def refresh(self) -> None:
        """Re-read this process's mappings of the object (once we know its pid), leaving out
        read-only mappings that can never become writable (see _register)."""
        if self.pid is not None:
            self.mappings = [m for m in mappings_of(self.pid, self.object_id)
                             if (m.start, m.end) not in self.never_writable]

    def protect(self, leave_unprotected: str | None = None,
                mapped: Callable[[], None] | None = None) -> list[Mapping]:
        """Register and write-protect every shared mapping of the object in the process.
        `mapped` is called once the mappings are known and before any is protected (whoever
        serves this uffd's faults must be able to place the first one).
        (`leave_unprotected`, "last" or "all", is a test hook, wrong on purpose: register but
        do not write-protect the last mapping, or any.)"""
        self.refresh()
        if self.kept:
            self._find_gap()
        if mapped is not None:
            mapped()
        self.protected = True
        if not self.registered:
            self.registered_since = boot_ticks()
        last = self.mappings[-1] if self.mappings else None
        for m in list(self.mappings):
            if self._register(m):
                # as we go: a fork in the middle of this loop hands its child exactly what is
                # registered so far (adopt_child copies it)
                if (m.start, m.end) not in self.registered:
                    self.registered.append((m.start, m.end))
                if not (leave_unprotected == "all" or
                        (leave_unprotected == "last" and m is last)):
                    self._call(K.writeprotect, self.uffd, m.start, m.length, protect=True)
        self.registered = [(m.start, m.end) for m in self.mappings]
        return self.mappings

    def _find_gap(self) -> None:
        """Kept since the last snapshot: a writable mapping our registration does not cover
        (mapped anew, or grown by mremap) took writes no fault told us of."""
        registered = Union(self.registered)
        fresh = [m for m in self.mappings
                 if m.writable and not registered.covers(m.start, m.end)]
        if fresh and not self.gap:
            self.gap = (f"pid {self.pid} mapped the object at {fresh[0].start:#x}-"
                        f"{fresh[0].end:#x} anew since the previous snapshot: writes there "
                        "were not tracked")

    def register_all(self) -> None:
        """Register (not protect) every shared mapping of the object in the process: from now
        on its forks come to us as events, so a child forked before we protect is tracked from
        birth (a process that forks its successor and exits is followed, not chased)."""
        self.refresh()
        if not self.registered:
            self.registered_since = boot_ticks()
        for m in list(self.mappings):
            if self._register(m) and (m.start, m.end) not in self.registered:
                self.registered.append((m.start, m.end))

    def protect_registered(self) -> None:
        """Write-protect every registered range (a child born in the middle of its parent's
        protect may have inherited registered but not yet protected pages; protecting a page
        that was saved already costs one more fault, answered at once)."""
        for start, end in list(self.registered):
            self._call(K.writeprotect, self.uffd, start, end - start, protect=True)

    def _register(self, m: Mapping) -> bool:
        """Register one mapping. A read-only mapping of a file opened O_RDONLY lacks
        VM_MAYWRITE: the kernel refuses it (EPERM), and no write can ever come through it, so it
        is left out. Returns whether it is registered."""
        try:
            self._call(K.register, self.uffd, m.start, m.length, K.REGISTER_MODE_WP)
            return True
        except KernelError as e:
            if e.errno != errno.EPERM or m.writable:
                raise
        self.never_writable.add((m.start, m.end))
        self.mappings.remove(m)
        return False

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
        """After the layout changed: re-read it if we can. During a snapshot, a writable part
        not covered by what we registered (an mremap that grew the mapping, or a new mapping
        found meanwhile) may have been written before anyone could protect it: an escape,
        which fails the snapshot (the agent reports it at release). It is not registered now:
        protecting it late would prove nothing, and the uffd's reader (our core, or the
        coordinator's in delegated mode) could not place its faults."""
        self.refresh()
        if not self.protected:
            return
        registered = Union(self.registered)
        self.escapes += [f"pid {self.pid} mapped the object at {m.start:#x}-{m.end:#x} anew "
                         "during the snapshot (an mremap that grew it, or a new mapping): "
                         "writes there were not tracked"
                         for m in self.mappings
                         if m.writable and not registered.covers(m.start, m.end)]

    def address_space_alive(self) -> bool:
        """Whether the process this uffd serves still has its address space while registered
        (it may not have been named yet); False when nothing is registered (then there is no
        protection to lose). Asked by registering again what is registered: a no-op."""
        if not self.registered:
            return False
        start, end = self.registered[0]
        try:
            K.register(self.uffd, start, end - start, K.REGISTER_MODE_WP)
        except KernelError as e:
            return e.errno not in GONE
        return True

    def offset_of(self, address: int) -> int | None:
        """Page-aligned object offset of a faulting address, None if outside every mapping."""
        for m in self.mappings:
            off = m.offset_of(address)
            if off is not None:
                return off - off % self.page_size
        return None

    def spans_of(self, start: int, end: int) -> list[tuple[int, int]]:
        """(address, length) pieces of addresses [start, end) that map the object, widened to
        whole pages."""
        out = []
        for m in self.mappings:
            lo, hi = max(start, m.start), min(end, m.end)
            if lo < hi:
                lo -= (lo - m.start) % self.page_size
                out.append((lo, hi - lo + (-(hi - lo)) % self.page_size))
        return out

    def spans(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(address, length) of object range [offset, offset+length) in every mapping."""
        end = offset + length
        out = []
        for m in self.mappings:
            lo, hi = max(offset, m.offset), min(end, m.offset + m.length)
            if lo < hi:
                out.append((m.start + lo - m.offset, hi - lo))
        return out

    def lend(self, core: SnapCore, key: int) -> None:
        """Let a native core read and serve this uffd under the name `key`; it becomes the
        only reader, so our ioctls that meet EAGAIN hand it the messages (`drain`)."""
        self.drain = lambda: core.drain(key)
        core.add(key, self.uffd, self.spans_with_offsets())

    def spans_with_offsets(self) -> list[tuple[int, int, int]]:
        """Every mapping as (address, length, object offset): what the wire and the native
        core take."""
        return [(m.start, m.length, m.offset) for m in self.mappings]

    def unprotect(self, offset: int, length: int) -> None:
        """Un-protect object range [offset, offset+length) in every mapping, waking waiters.

        ENOENT means the range is not mapped there any more: the process moved or unmapped it
        and the event saying so is not read yet. Skipping is safe: moved pages keep their
        protection, and a write to one faults again and is answered at its new address."""
        for address, span in self.spans(offset, length):
            try:
                self._call(K.writeprotect, self.uffd, address, span, protect=False)
            except KernelError as e:
                if e.errno != errno.ENOENT:
                    raise

    def unprotect_all(self) -> None:
        """Un-protect everything registered (it stays registered); tolerate a process that is
        gone."""
        self.protected = False
        for start, end in self.registered:
            try:
                self._call(K.writeprotect, self.uffd, start, end - start, protect=False)
            except KernelError as e:
                if e.errno not in (*GONE, errno.EINVAL, errno.ENOENT):
                    raise

    def wake_all(self) -> None:
        """Wake every writer waiting on a fault, protection left as it is: one still blocked on
        a protected page faults again, to whoever reads the uffd now (a fault read by a reader
        that stopped would otherwise never be answered). Tolerates a process that is gone."""
        for start, end in self.registered:
            try:
                self._call(K.wake, self.uffd, start, end - start)
            except KernelError as e:
                if e.errno not in (*GONE, errno.EINVAL, errno.ENOENT):
                    raise

    def release(self) -> None:
        """Un-protect and unregister everything registered; tolerate a process that is gone."""
        self.unprotect_all()
        for start, end in self.registered:
            try:
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


class Union:
    """The union of address ranges, merged once, for many questions: O(log n) each (a process
    may have tens of thousands of mappings)."""

    def __init__(self, ranges: list[tuple[int, int]]):
        merged: list[list[int]] = []
        for a, b in sorted(ranges):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]

    def covers(self, start: int, end: int) -> bool:
        """True if [start, end) lies inside the union."""
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end


def covered(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    """True if [start, end) lies inside the union of `ranges` (for one question; many: Union)."""
    return Union(ranges).covers(start, end)
