"""The caller's side: a stopped target as an object that runs system calls (`injected`), and
the one thing attach needs from it, a userfaultfd for its address space (`create_uffd_in`)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from uffdsnap import testhooks
from uffdsnap.inject._lend import create_by_device
from uffdsnap.inject._session import PAGE_SIZE
from uffdsnap.inject._tracee import describe, pick_thread
from uffdsnap.inject._tracer import TracerProcess
from uffdsnap.inject._x86_64 import SYS_USERFAULTFD, StopPoint, call_name
from uffdsnap.native import uffd as _uffd
from uffdsnap.native.libc import KernelError

DEFAULT_TIMEOUT = 5.0


class Injected:
    """A stopped thread of another process that runs system calls for us (see `injected`).

    Target fds and scratch pages made through it are removed when the `with` block is left.
    """

    def __init__(self, tracer: TracerProcess, pid: int, tid: int, stop_point: StopPoint,
                 timeout: float):
        self._tracer = tracer
        self._pid = pid
        self._tid = tid
        self._stop_point = stop_point
        self._timeout = timeout

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def tid(self) -> int:
        return self._tid

    @property
    def stop_point(self) -> StopPoint:
        """What the thread was doing when we stopped it (it resumes that on release)."""
        return self._stop_point

    def _call(self, what: str, request: str, *args: object, fds: tuple[int, ...] = ()) -> Any:
        return self._tracer.call(request, args, self._timeout, what,
                                 describe(self._pid, self._tid), fds)

    def syscall(self, nr: int, *args: int) -> int:
        """Run system call `nr` in the target; its result (>= 0) or KernelError for -errno."""
        return self._call(call_name(nr), "run", nr, args)

    def syscall_fd(self, nr: int, *args: int) -> int:
        """Run a call that returns a new fd in the target; that fd is closed on leaving unless
        `close_fd` closed it first."""
        return self._call(call_name(nr), "syscall_fd", nr, args)

    def close_fd(self, fd: int) -> None:
        """close(fd) in the target now."""
        self._call("injected close", "close_fd", fd)

    def take_fd(self, fd: int) -> int:
        """A copy of the target's fd `fd` in our process (pidfd_getfd; CLOEXEC)."""
        return self._call("pidfd_getfd", "take_fd", fd)

    def give_fd(self, fd: int) -> int:
        """A copy of our fd `fd` in the target (CLOEXEC there); closed on leaving unless
        `close_fd` closed it first."""
        return self._call("give fd to target", "give_fd", fds=(fd,))

    def stop_other_threads(self) -> int:
        """Stop every other thread of the target (threads created meanwhile too) until
        `resume_other_threads`, or until we leave, after what we injected is removed: nothing
        but the thread we drive can see an fd we put in it. Returns how many were stopped."""
        # (the tracer gives up first, so the caller hears why, and nothing stays stopped)
        return self._call("stop the target's other threads", "stop_others", self._timeout / 2)

    def resume_other_threads(self) -> None:
        """Let the other threads run again (refused while a target fd we made is open)."""
        self._call("resume the target's other threads", "resume_others")

    def map_scratch(self, length: int = PAGE_SIZE) -> int:
        """Map private anonymous read-write memory in the target; unmapped on leaving."""
        return self._call("injected mmap", "map_scratch", length)

    def unmap_scratch(self, addr: int) -> None:
        self._call("injected munmap", "unmap_scratch", addr)

    def read(self, addr: int, length: int) -> bytes:
        """Read target memory (through /proc/PID/task/TID/mem)."""
        return self._call("read target memory", "read", addr, length)

    def write(self, addr: int, data: bytes) -> None:
        """Write target memory (through /proc/PID/task/TID/mem)."""
        self._call("write target memory", "write", addr, bytes(data))


@contextmanager
def injected(pid: int, tid: int | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> Iterator[Injected]:
    """Stop thread `tid` of process `pid` (default: its leader, or a live thread if the leader
    has exited) to run system calls in it.

    PTRACE_SEIZE + PTRACE_INTERRUPT, then registers are saved. Leaving the block on any path
    (exceptions, the target exiting, our own death: see TracerProcess) removes what was
    injected, restores the registers and detaches: the target is never left stopped or altered.
    Each step waits at most `timeout` seconds. Raises KernelError naming the call that failed
    and why (permissions, Yama, seccomp, the target exiting).
    """
    if pid == os.getpid():
        raise KernelError("ptrace(PTRACE_SEIZE)", errno.EINVAL, f"pid={pid}",
                          "cannot inject into our own process")
    tid = pick_thread(pid) if tid is None else tid
    detail = describe(pid, tid)
    tracer = TracerProcess(pid, tid, detail)

    def release() -> None:
        tracer.call("release", (), timeout, "ptrace(PTRACE_DETACH)", detail)

    try:
        try:
            stop_point = tracer.call("attach", (), timeout, "ptrace(PTRACE_SEIZE)", detail)
        except BaseException as e:
            try:
                release()
            except KernelError as cleanup:
                e.add_note(f"while releasing the target: {cleanup}")
            raise
        assert isinstance(stop_point, StopPoint)
        try:
            yield Injected(tracer, pid, tid, stop_point, timeout)
        except BaseException as e:
            try:
                release()
            except KernelError as cleanup:
                e.add_note(f"while releasing the target: {cleanup}")
            raise
        release()
    finally:
        tracer.finish()


def create_uffd_in(pid: int, flags: int = os.O_NONBLOCK | os.O_CLOEXEC,
                   timeout: float = DEFAULT_TIMEOUT,
                   test_hooks: testhooks.Hooks | None = None,
                   while_stopped: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Create a userfaultfd that acts on process `pid`'s address space and return it as
    (fd in our process, route), route "syscall" or "device".

    The target makes the uffd itself (a uffd binds to its creator's mm): by an injected
    userfaultfd() if it may, else, for unprivileged targets, by ioctl(USERFAULTFD_IOC_NEW) on a
    /dev/userfaultfd fd we hand it. Its own copies are closed before we return, so our fd is the
    only reference: closing it releases every write-protect in the target. Every other thread
    of the target stays stopped from before the first of those fds exists in it until the last
    is closed, so no thread of it can keep the device fd or a copy of the uffd. (Test hook
    `lend_unfrozen` leaves them running, to show that they could.)

    `while_stopped(our fd)` runs before any thread of the target runs again: what it registers
    is in place before the target can fork or exit (an attach converges on a fork chain instead
    of chasing it). Its exceptions end the injection like any other.
    """
    if flags & _uffd.UFFD_USER_MODE_ONLY:
        raise ValueError("UFFD_USER_MODE_ONLY breaks kernel-mode writes into protected memory")
    if pid == os.getpid():
        return _uffd.create_uffd(flags)
    ours = -1
    try:
        with injected(pid, timeout=timeout) as target:
            held = 0 if (test_hooks or {}).get("lend_unfrozen") else target.stop_other_threads()
            theirs, route = _make_uffd(target, flags)
            ours = target.take_fd(theirs)
            target.close_fd(theirs)
            if while_stopped is not None:
                while_stopped(ours)
            if held:
                target.resume_other_threads()
        return ours, route
    except BaseException:
        if ours >= 0:
            os.close(ours)
        raise


def _make_uffd(target: Injected, flags: int) -> tuple[int, str]:
    """The target's fd of a new uffd of its own, and the route that made it."""
    try:
        return target.syscall_fd(SYS_USERFAULTFD, flags), "syscall"
    except KernelError as first:
        if first.errno not in (errno.EPERM, errno.EACCES, errno.ENOSYS):
            raise
        try:
            return create_by_device(target, flags, first), "device"
        except KernelError as second:
            second.add_note(f"the userfaultfd() route failed first: {first}")
            raise
