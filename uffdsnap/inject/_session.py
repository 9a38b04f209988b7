"""What the tracer process holds for one injection: the stopped thread (a Tracee), and everything
we made in the target through it, removed again by `Session.release` on every way out.

A process whose main thread has exited (a zombie group leader, other threads running): we drive a
live thread, and reach its memory, maps and fds through /proc/PID/task/TID and a thread pidfd
(the leader's /proc/PID/mem says ESRCH, and pidfd_getfd through it finds no files).
"""

from __future__ import annotations

import errno
import os
import platform
from collections.abc import Callable

from uffdsnap.inject._others import OtherThreads
from uffdsnap.inject._tracee import Tracee
from uffdsnap.inject._x86_64 import SYS_CLOSE, SYS_MMAP, SYS_MUNMAP, StopPoint
from uffdsnap.native.libc import KernelError
from uffdsnap.native.pidfd import pidfd_getfd, pidfd_open

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PIDFD_THREAD = os.O_EXCL  # pidfd_open() flag (Linux 6.9): a pidfd for one thread, not its group
_PROT_RW = 0x3
_MAP_PRIVATE_ANONYMOUS = 0x22


class Session:
    """One thread of the target, stopped, and the fds and scratch pages we created in it."""

    def __init__(self, pid: int, tid: int):
        self.pid = pid
        self.tid = tid
        self.tracee = Tracee(pid, tid)
        self.detail = self.tracee.detail
        self.pidfd = -1
        self.fds: list[int] = []  # target fds we created, closed on release
        self.scratch: dict[int, int] = {}  # target scratch mappings we made: addr -> length
        self.others = OtherThreads(pid, tid, self.detail)  # held stopped while we lend fds

    @property
    def gone(self) -> bool:
        """The target exited under us: nothing is left to restore."""
        return self.tracee.gone

    def attach(self) -> StopPoint:
        if platform.machine() != "x86_64":
            raise KernelError("ptrace injection", errno.ENOSYS, self.detail,
                              "only x86_64 targets are supported")
        if not os.path.exists(self.tracee.proc):
            raise KernelError("ptrace(PTRACE_SEIZE)", errno.ESRCH, self.detail,
                              "no such process or thread")
        self.pidfd = self._open_pidfd()
        return self.tracee.attach()

    def _open_pidfd(self) -> int:
        """A pidfd to take fds through: pidfd_getfd() reads the files of the task behind it,
        and a zombie group leader has none, so name the thread we drive where we can."""
        if self.tid != self.pid:
            try:
                return os.pidfd_open(self.tid, PIDFD_THREAD)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: a kernel before 6.9
                    raise KernelError("pidfd_open", e.errno or errno.EIO, self.detail) from None
        return pidfd_open(self.pid)

    # -- calls and memory --

    def run(self, nr: int, args: tuple[int, ...]) -> int:
        return self.tracee.run(nr, args)

    def read(self, addr: int, length: int) -> bytes:
        return self.tracee.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.tracee.write(addr, data)

    # -- resources we create in the target, removed on release --

    def syscall_fd(self, nr: int, args: tuple[int, ...]) -> int:
        fd = self.run(nr, args)
        self.fds.append(fd)
        return fd

    def close_fd(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.remove(fd)
        self.run(SYS_CLOSE, (fd,))

    def map_scratch(self, length: int) -> int:
        length = -(-length // PAGE_SIZE) * PAGE_SIZE
        addr = self.run(SYS_MMAP, (0, length, _PROT_RW, _MAP_PRIVATE_ANONYMOUS, -1, 0))
        self.scratch[addr] = length
        return addr

    def unmap_scratch(self, addr: int) -> None:
        length = self.scratch.pop(addr)
        self.run(SYS_MUNMAP, (addr, length))

    def take_fd(self, fd: int) -> int:
        try:
            return pidfd_getfd(self.pidfd, fd, self.pid)
        except KernelError as e:
            if e.errno != errno.ESRCH or self.tid == self.pid:
                raise
            raise KernelError(e.call, errno.ESRCH, e.detail,
                              "its main thread has exited, and this kernel has no PIDFD_THREAD "
                              "(Linux 6.9) to take fds through another thread") from None

    # -- the target's other threads --

    def stop_others(self, timeout: float) -> int:
        """Stop every other thread of the target within `timeout` s (see _others); how many
        were stopped."""
        return self.others.stop(timeout)

    def resume_others(self) -> None:
        """Let the other threads run again; only once no fd of ours is left in the target."""
        if self.fds:
            raise KernelError("ptrace(PTRACE_DETACH)", errno.EBUSY, self.detail,
                              f"target fds {self.fds} we made are still open: other threads "
                              "stay stopped until they are closed")
        self.others.resume()

    # -- release --

    def release(self) -> None:
        """Close what we opened, unmap what we mapped, restore registers, detach; only then
        let the other threads run again (none of them may see an fd we made)."""
        errors: list[KernelError] = []
        try:
            if self.tracee.attached and not self.gone:
                for fd in reversed(self.fds[:]):
                    self._best_effort(errors, self.close_fd, fd)
                for addr in list(self.scratch):
                    self._best_effort(errors, self.unmap_scratch, addr)
                if not self.gone:
                    self.tracee.restore_and_detach()
        except KernelError as e:
            if not self.gone:
                errors.insert(0, e)
        finally:
            self.tracee.restore_slice()  # (if not done yet: our detach failed)
            try:
                self.others.resume()
            except KernelError as e:
                errors.append(e)
            self.tracee.close()
            if self.pidfd >= 0:
                os.close(self.pidfd)
            self.pidfd = -1
        if errors:
            raise errors[0]

    def _best_effort(self, errors: list[KernelError], fn: Callable[[int], None], arg: int) -> None:
        if self.gone:
            return
        try:
            fn(arg)
        except KernelError as e:
            if not self.gone:
                errors.append(e)
