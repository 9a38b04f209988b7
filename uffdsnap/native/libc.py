"""The one ctypes handle on libc, and the error type every kernel wrapper raises.

Errors are raised once, here at the edge, carrying what was called, with which arguments, the errno
name, and a hint a user can act on; nothing above this layer repeats or re-wraps that context.
"""

from __future__ import annotations

import ctypes
import errno
import os

libc = ctypes.CDLL(None, use_errno=True)

_syscall = libc.syscall
_syscall.restype = ctypes.c_long

_ioctl = libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

# Hints for errnos a user of this tool meets, by call family.
_HINTS: dict[int, str] = {
    errno.EPERM: "needs root or CAP_SYS_PTRACE (or vm.unprivileged_userfaultfd=1, "
    "or access to /dev/userfaultfd); run `uffdsnap doctor`",
    errno.EACCES: "permission denied; run `uffdsnap doctor`",
    errno.ESRCH: "the process that created this userfaultfd has exited",
    errno.EAGAIN: "a fork/remap/remove event is pending on the userfaultfd: "
    "read events, then retry",
    errno.ENOSYS: "this kernel lacks the call; run `uffdsnap doctor`",
    errno.EINVAL: "the kernel rejected the arguments "
    "(unsupported feature, mode, or unaligned range)",
    errno.ENOENT: "no such file or process",
}


class KernelError(OSError):
    """A failed system call or ioctl, with the context a user needs to act on it."""

    def __init__(self, call: str, err: int, detail: str = "", hint: str | None = None):
        self.call = call
        self.detail = detail
        self.hint = _HINTS.get(err, "") if hint is None else hint
        name = errno.errorcode.get(err, str(err))
        text = f"{call}({detail}) failed: {name} ({os.strerror(err)})" if detail else (
            f"{call} failed: {name} ({os.strerror(err)})"
        )
        if self.hint:
            text += f" — {self.hint}"
        super().__init__(err, text)

    def __str__(self) -> str:  # OSError's default adds "[Errno N]" in front; we already say it
        return self.args[1]


def syscall(call: str, nr: int, *args: int, detail: str = "") -> int:
    """Run raw syscall `nr` with integer arguments; raise KernelError naming `call` on failure."""
    ret = _syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    if ret < 0:
        raise KernelError(call, ctypes.get_errno(), detail)
    return ret


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.c_void_p | int | None,
          call: str, detail: str = "", hints: dict[int, str] | None = None) -> int:
    """ioctl(fd, request, &arg); raise KernelError naming `call` (e.g. "UFFDIO_REGISTER").

    `hints` overrides the generic hint for errnos whose meaning is specific to this call.
    """
    if isinstance(arg, ctypes.Structure):
        ptr: object = ctypes.byref(arg)
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = arg
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise KernelError(call, err, detail, hints.get(err) if hints else None)
    return ret


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long)] + [
        ("rest", ctypes.c_byte * 104)
    ]


def filesystem_type(fd: int) -> int:
    """statfs f_type of the filesystem holding open file `fd`."""
    buf = _Statfs()
    if libc.fstatfs(fd, ctypes.byref(buf)) < 0:
        raise KernelError("fstatfs", ctypes.get_errno(), f"fd={fd}")
    return buf.f_type & 0xFFFFFFFF


PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Name the calling thread (the process, from its main thread) as ps, top and
    /proc/PID/comm show it: at most 15 bytes. Best effort: a name is a courtesy."""
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


CLONE_NEWNET = 0x40000000


def setns(path: str, nstype: int) -> None:
    """Move the calling thread into the namespace at `path` (e.g. /var/run/netns/NAME) of type
    `nstype` (CLONE_NEWNET, ...)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, nstype) != 0:
            raise KernelError("setns", ctypes.get_errno(), path)
    finally:
        os.close(fd)
