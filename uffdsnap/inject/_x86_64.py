"""x86_64 facts injection relies on: system call numbers, the syscall calling convention, what a
stopped thread's registers say, and where the target keeps a `syscall` instruction to borrow."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from uffdsnap.native import uffd as _uffd
from uffdsnap.native.libc import KernelError
from uffdsnap.native.ptrace import Regs
from uffdsnap.procfs import parse_maps

SYS_READ = 0
SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MUNMAP = 11
SYS_IOCTL = 16
SYS_NANOSLEEP = 35
SYS_GETPID = 39
SYS_RECVMSG = 47
SYS_SOCKETPAIR = 53
SYS_CLOCK_NANOSLEEP = 230
SYS_EXIT_GROUP = 231
SYS_EPOLL_WAIT = 232
SYS_USERFAULTFD = _uffd.SYS_USERFAULTFD

_SYSCALL_NAMES = {
    SYS_READ: "read", SYS_CLOSE: "close", SYS_MMAP: "mmap", SYS_MUNMAP: "munmap",
    SYS_IOCTL: "ioctl", SYS_NANOSLEEP: "nanosleep", SYS_GETPID: "getpid", SYS_RECVMSG: "recvmsg",
    SYS_SOCKETPAIR: "socketpair", SYS_CLOCK_NANOSLEEP: "clock_nanosleep",
    SYS_EXIT_GROUP: "exit_group", SYS_EPOLL_WAIT: "epoll_wait", SYS_USERFAULTFD: "userfaultfd",
}

# Kernel-internal "restart me" codes a tracer can see in rax (include/linux/errno.h).
RESTART_CODES = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND",
                 516: "ERESTART_RESTARTBLOCK"}
MAX_ERRNO = 4095  # a return value in [-MAX_ERRNO, -1] is -errno
USER_CS = 0x33  # the code segment of a 64-bit user thread (a 32-bit one has 0x23)
NO_SYSCALL = 0xFFFFFFFFFFFFFFFF  # orig_rax -1: not in a system call, so nothing gets restarted
SYSCALL_INSN = b"\x0f\x05"
_ARG_REGISTERS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_U64 = 0xFFFFFFFFFFFFFFFF


def call_name(nr: int) -> str:
    """How errors name injected call `nr`: "injected close"."""
    return f"injected {_SYSCALL_NAMES.get(nr, f'syscall {nr}')}"


def signed(value: int) -> int:
    """A 64-bit register read as a signed long."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


@dataclass(frozen=True)
class StopPoint:
    """Where the thread was when we stopped it (for logs and tests; registers stay private)."""

    syscall_nr: int | None  # the system call it was in (or returning from); None in user code
    restart: str | None  # e.g. "ERESTART_RESTARTBLOCK": the kernel restarts that call on resume


def stop_point(regs: Regs) -> StopPoint:
    """What `regs`, saved at our stop, say the thread was doing."""
    nr = signed(regs.orig_rax)
    if nr < 0:
        return StopPoint(None, None)
    return StopPoint(nr, RESTART_CODES.get(-signed(regs.rax)))


def call_registers(saved: Regs, syscall_at: int, nr: int, args: tuple[int, ...]) -> Regs:
    """`saved` changed to run syscall `nr`(`args`) from the `syscall` instruction at
    `syscall_at`, outside any system call (orig_rax -1), so no restart logic fires on them."""
    regs = saved.copy()
    regs.rip = syscall_at
    regs.rax = nr
    regs.orig_rax = NO_SYSCALL
    for reg, value in zip(_ARG_REGISTERS, args, strict=False):
        setattr(regs, reg, value & _U64)
    return regs


def find_syscall_instruction(proc: str, mem_fd: int, detail: str) -> int:
    """Address of a `syscall` (0f 05) the target already has: in its vdso, else in any
    executable mapping. We never write code into the target.

    `proc` is its /proc/PID/task/TID directory, `mem_fd` its open mem file."""
    try:
        with open(f"{proc}/maps") as f:
            maps = parse_maps(f.read())
    except OSError as e:
        raise KernelError("read", e.errno or errno.EIO, f"{proc}/maps") from None
    ordered = [m for m in maps if m.path == "[vdso]"] + [
        m for m in maps if m.perms[2] == "x" and m.path not in ("[vdso]", "[vsyscall]")]
    for mapping in ordered:
        start = mapping.start
        while start < mapping.end - 1:
            try:
                code = os.pread(mem_fd, min(mapping.end - start, 1 << 20), start)
            except OSError:
                break
            at = code.find(SYSCALL_INSN)
            if at >= 0:
                return start + at
            if len(code) < 2:
                break
            start += len(code) - 1  # overlap one byte: an instruction may straddle chunks
    raise KernelError("ptrace injection", errno.ENOEXEC, detail,
                      "found no syscall instruction in the target to borrow")
