"""A thread's requested slice under EEVDF (Linux 6.12+ reads it from sched_attr.sched_runtime
of a fair thread). The shortest slice lets a thread that wakes preempt a busy CPU at once, yet
leaves its share of the CPU to its nice value: what a thread that we drive step by step needs
when every CPU is busy. Best effort throughout: an older kernel ignores the field."""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

from uffdsnap.native.libc import KernelError, syscall

SYS_SCHED_SETATTR = 314
SYS_SCHED_GETATTR = 315
SCHED_OTHER = 0
SCHED_FLAG_RESET_ON_FORK = 0x01
SHORTEST_SLICE_NS = 100_000  # the kernel's lower clamp
_ATTR_SIZE_VER0 = 48


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32),
                ("flags", ctypes.c_uint64), ("nice", ctypes.c_int32),
                ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]


@dataclass(frozen=True)
class Slice:
    """What a fair thread had before we asked for a short slice: put back as it was."""

    tid: int
    runtime_ns: int  # as the kernel reported it (its default, if the thread asked none)
    flags: int


def _get(tid: int) -> _SchedAttr | None:
    attr = _SchedAttr()
    try:
        syscall("sched_getattr", SYS_SCHED_GETATTR, tid, ctypes.addressof(attr),
                _ATTR_SIZE_VER0, 0)
    except KernelError:
        return None
    return attr


def _set(tid: int, nice: int, runtime_ns: int, flags: int) -> bool:
    attr = _SchedAttr(size=_ATTR_SIZE_VER0, policy=SCHED_OTHER,
                      flags=flags & SCHED_FLAG_RESET_ON_FORK, nice=nice, runtime=runtime_ns)
    try:
        syscall("sched_setattr", SYS_SCHED_SETATTR, tid, ctypes.addressof(attr), 0)
    except KernelError as e:
        if e.errno in (errno.ESRCH, errno.EPERM, errno.EINVAL, errno.E2BIG, errno.ENOSYS):
            return False
        raise
    return True


def short_slice(tid: int = 0) -> Slice | None:
    """Ask the shortest slice for thread `tid` (0: the calling thread)."""
    return ask_slice(tid, SHORTEST_SLICE_NS)


def ask_slice(tid: int, runtime_ns: int) -> Slice | None:
    """Ask a slice of `runtime_ns` for thread `tid`, keeping its nice value: what it had
    before (for `restore`), or None when it is not an ordinary (SCHED_OTHER) thread, already
    asks that one, or the kernel refused. (The kernel reports its default slice as a
    thread's own: a thread that had it gets that length back, asked for explicitly.)"""
    attr = _get(tid)
    if attr is None or attr.policy != SCHED_OTHER or attr.runtime == runtime_ns:
        return None
    before = Slice(tid, attr.runtime, attr.flags)
    return before if _set(tid, attr.nice, runtime_ns, attr.flags) else None


def restore(before: Slice | None) -> None:
    """Put back the slice `ask_slice` changed (the nice value stays as it is now)."""
    if before is None:
        return
    attr = _get(before.tid)
    if attr is not None and attr.policy == SCHED_OTHER:
        _set(before.tid, attr.nice, before.runtime_ns, before.flags)
