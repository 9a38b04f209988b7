"""pidfds: a stable handle on a process (no pid-reuse races) and a way to copy its fds."""

from __future__ import annotations

import errno
import os

from uffdsnap.native.libc import KernelError, syscall

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438


def pidfd_open(pid: int) -> int:
    """Return a CLOEXEC pidfd for `pid`; it becomes readable when the process exits."""
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        raise KernelError("pidfd_open", e.errno or errno.EIO, f"pid={pid}") from None


def pidfd_getfd(pidfd: int, target_fd: int, pid: int | None = None) -> int:
    """Duplicate fd `target_fd` of the process behind `pidfd` into this process (CLOEXEC).

    Needs PTRACE_MODE_ATTACH over the target (root, or same user with Yama scope 0).
    """
    detail = f"pidfd={pidfd}, fd={target_fd}" + (f", pid={pid}" if pid is not None else "")
    hint = "needs ptrace permission over the target (root or CAP_SYS_PTRACE)"
    try:
        return syscall("pidfd_getfd", SYS_PIDFD_GETFD, pidfd, target_fd, 0, detail=detail)
    except KernelError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise KernelError("pidfd_getfd", e.errno, detail, hint) from None
        raise


def process_alive(pidfd: int) -> bool:
    """True while the process behind `pidfd` has not exited (a pidfd polls readable at exit)."""
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)
