"""ptrace (x86_64): one small documented function per request injection makes, and the wait
that follows a resume.

A tracee is one thread, named by its tid (ptrace acts on threads, not processes). Every function
raises KernelError once, naming the request ("ptrace(PTRACE_GETREGS)") with `detail` (the
caller's words for the target, e.g. "pid=12, tid=13") and no generic hint: what an errno means
depends on the stop the tracee was in, which only the caller knows (ESRCH from a seized tracee,
for one, means it is being killed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
from dataclasses import dataclass

from uffdsnap.native.libc import KernelError, libc

SYS_PTRACE = 101

PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_O_TRACESYSGOOD = 1
PTRACE_EVENT_STOP = 128
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2
WALL = 0x40000000  # __WALL: wait for any thread, clone child or not

_SIGINFO_SIZE = 128
_SYSCALL_INFO_SIZE = 88  # struct ptrace_syscall_info, as of 6.18
_SOCK_FILTER_SIZE = 8  # struct sock_filter

# Our own pointer to libc's syscall(2) (a fresh one, so its setup is ours alone).
_syscall = libc["syscall"]
_syscall.restype = ctypes.c_long


class Regs(ctypes.Structure):
    """struct user_regs_struct (x86_64), as PTRACE_GETREGS/SETREGS move it."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
        "es", "fs", "gs")]

    def copy(self) -> Regs:
        return Regs.from_buffer_copy(self)


@dataclass(frozen=True)
class Stop:
    """A ptrace-stop as waitid() reports it."""

    sig: int  # WSTOPSIG
    event: int  # PTRACE_EVENT_*, 0 for a signal-delivery or syscall stop
    syscall_stop: bool  # SIGTRAP|0x80 (PTRACE_O_TRACESYSGOOD)


@dataclass(frozen=True)
class SigInfo:
    """The fields of the siginfo at a signal-delivery stop that injection looks at."""

    signo: int
    code: int  # si_code, e.g. SYS_SECCOMP for a seccomp RET_TRAP
    call_addr: int  # SIGSYS only: the address after the `syscall` instruction that raised it


@dataclass(frozen=True)
class SyscallInfo:
    """Where a syscall-stop is (PTRACE_GET_SYSCALL_INFO)."""

    op: int  # PTRACE_SYSCALL_INFO_ENTRY or _EXIT (or another stop kind)
    value: int  # the call number at an entry stop, its return value (or -errno) at an exit stop


def _ptrace(request: int, name: str, tid: int, addr: int, data: int, detail: str) -> int:
    ret = _syscall(ctypes.c_long(SYS_PTRACE), ctypes.c_long(request), ctypes.c_long(tid),
                   ctypes.c_long(addr), ctypes.c_long(data))
    if ret < 0:
        raise KernelError(f"ptrace({name})", ctypes.get_errno() or errno.EIO,
                          detail or f"tid={tid}", "")
    return ret


def seize(tid: int, options: int, *, detail: str = "") -> None:
    """Become `tid`'s tracer without stopping it (PTRACE_SEIZE), with PTRACE_O_* `options`.

    EPERM covers every refusal: no permission, Yama, another tracer, a zombie."""
    _ptrace(PTRACE_SEIZE, "PTRACE_SEIZE", tid, 0, options, detail)


def interrupt(tid: int, *, detail: str = "") -> None:
    """Ask seized `tid` to stop (PTRACE_INTERRUPT); wait_stop() then sees a PTRACE_EVENT_STOP,
    or whatever stop the tracee meets first."""
    _ptrace(PTRACE_INTERRUPT, "PTRACE_INTERRUPT", tid, 0, 0, detail)


def cont(tid: int, sig: int = 0, *, detail: str = "") -> None:
    """Resume stopped `tid` (PTRACE_CONT), delivering signal `sig` if it is in a signal-delivery
    stop (0: none, i.e. discard the one it stopped for)."""
    _ptrace(PTRACE_CONT, "PTRACE_CONT", tid, 0, sig, detail)


def cont_to_syscall(tid: int, *, detail: str = "") -> None:
    """Resume stopped `tid` until its next system call entry or exit (PTRACE_SYSCALL)."""
    _ptrace(PTRACE_SYSCALL, "PTRACE_SYSCALL", tid, 0, 0, detail)


def detach(tid: int, *, detail: str = "") -> None:
    """Stop tracing stopped `tid` and let it run (PTRACE_DETACH, no signal)."""
    _ptrace(PTRACE_DETACH, "PTRACE_DETACH", tid, 0, 0, detail)


def getregs(tid: int, *, detail: str = "") -> Regs:
    """The general registers of stopped `tid` (PTRACE_GETREGS)."""
    regs = Regs()
    _ptrace(PTRACE_GETREGS, "PTRACE_GETREGS", tid, 0, ctypes.addressof(regs), detail)
    return regs


def setregs(tid: int, regs: Regs, *, detail: str = "") -> None:
    """Load `regs` into stopped `tid` (PTRACE_SETREGS); they take effect when it resumes."""
    _ptrace(PTRACE_SETREGS, "PTRACE_SETREGS", tid, 0, ctypes.addressof(regs), detail)


def getsiginfo(tid: int, *, detail: str = "") -> SigInfo:
    """The signal `tid` is stopped for, at a signal-delivery stop (PTRACE_GETSIGINFO)."""
    buf = ctypes.create_string_buffer(_SIGINFO_SIZE)
    _ptrace(PTRACE_GETSIGINFO, "PTRACE_GETSIGINFO", tid, 0, ctypes.addressof(buf), detail)
    signo, _errno, code, _pad, call_addr = struct.unpack_from("<iiiiQ", buf.raw, 0)
    return SigInfo(signo, code, call_addr)


def get_syscall_info(tid: int, *, detail: str = "") -> SyscallInfo:
    """Which side of which system call `tid` is stopped at, at a syscall-stop
    (PTRACE_GET_SYSCALL_INFO)."""
    buf = ctypes.create_string_buffer(_SYSCALL_INFO_SIZE)
    _ptrace(PTRACE_GET_SYSCALL_INFO, "PTRACE_GET_SYSCALL_INFO", tid, _SYSCALL_INFO_SIZE,
            ctypes.addressof(buf), detail)
    return SyscallInfo(buf.raw[0], struct.unpack_from("<q", buf.raw, 24)[0])


def seccomp_filter_length(tid: int, index: int, *, detail: str = "") -> int:
    """How many instructions the seccomp filter `index` of stopped `tid` has (0 is the newest).

    ENOENT: there is no filter `index`; EACCES/EPERM: reading filters needs CAP_SYS_ADMIN."""
    return _ptrace(PTRACE_SECCOMP_GET_FILTER, "PTRACE_SECCOMP_GET_FILTER", tid, index, 0, detail)


def seccomp_get_filter(tid: int, index: int, length: int, *, detail: str = "") -> bytes:
    """Seccomp filter `index` of stopped `tid`, `length` instructions (seccomp_filter_length) as
    a struct sock_filter array."""
    buf = ctypes.create_string_buffer(_SOCK_FILTER_SIZE * length)
    _ptrace(PTRACE_SECCOMP_GET_FILTER, "PTRACE_SECCOMP_GET_FILTER", tid, index,
            ctypes.addressof(buf), detail)
    return buf.raw


def wait_stop(tid: int) -> Stop | None:
    """Block until tracee `tid` is in a ptrace-stop (returned) or has exited (None).

    WNOWAIT: if the tracee is also our child, its exit status stays for its parent code (e.g.
    subprocess) to collect."""
    try:
        info = os.waitid(os.P_PID, tid, os.WEXITED | os.WSTOPPED | os.WNOWAIT | WALL)
    except ChildProcessError:
        return None
    assert info is not None  # no WNOHANG
    if info.si_code != os.CLD_TRAPPED:
        return None
    status = info.si_status
    return Stop(status & 0x7F, status >> 8, status & 0xFF == signal.SIGTRAP | 0x80)
