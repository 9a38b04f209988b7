"""Seccomp: decide before an injected call runs whether the target's filters allow it.

A call the filters would kill the target for (or send to a supervisor) must never run, so we
read the filters (PTRACE_SECCOMP_GET_FILTER) and evaluate them here with the kernel's rules.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
RET_ACTION_FULL = 0xFFFF0000
SYS_SECCOMP = 1  # si_code of a SIGSYS sent by a seccomp RET_TRAP
_AUDIT_ARCH_X86_64 = 0xC000003E
_SECCOMP_DATA_LEN = 64

ENLIST = "attach cannot use this target: have the workload enlist (send its own userfaultfd)"


def _action_rank(ret: int) -> int:
    """The kernel's precedence: the lowest signed action wins (KILL_PROCESS is most negative)."""
    action = ret & RET_ACTION_FULL
    return action - (1 << 32) if action >= 1 << 31 else action


def seccomp_verdict(filters: list[bytes], nr: int, args: tuple[int, ...], ip: int) -> int:
    """The action the kernel would take for syscall `nr`(`args`) at `ip`, given the classic-BPF
    `filters` (struct sock_filter arrays) attached to a thread. Unknown instructions count as
    KILL_PROCESS: we only inject calls we can prove safe."""
    data = struct.pack("<iIQ6Q", nr, _AUDIT_ARCH_X86_64, ip,
                       *(a & 0xFFFFFFFFFFFFFFFF for a in (args + (0,) * 6)[:6]))
    verdict = SECCOMP_RET_ALLOW
    for prog in filters:
        ret = _run_bpf(prog, data)
        if _action_rank(ret) < _action_rank(verdict):
            verdict = ret
    return verdict


def _run_bpf(prog: bytes, data: bytes) -> int:
    """Interpret one seccomp cBPF program on `data` (struct seccomp_data)."""
    insns = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    mask = 0xFFFFFFFF
    alu: dict[int, Callable[[int, int], int]] = {
        0x00: lambda p, q: p + q, 0x10: lambda p, q: p - q, 0x20: lambda p, q: p * q,
        0x30: lambda p, q: p // q, 0x40: lambda p, q: p | q, 0x50: lambda p, q: p & q,
        0x60: lambda p, q: p << q if q < 32 else 0, 0x70: lambda p, q: p >> q,
        0x90: lambda p, q: p % q, 0xA0: lambda p, q: p ^ q,
    }
    while 0 <= pc < len(insns):
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if code == 0x20:  # ld [k]
            if k % 4 or k + 4 > _SECCOMP_DATA_LEN:
                return SECCOMP_RET_KILL_PROCESS
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x80:  # ld #len
            a = _SECCOMP_DATA_LEN
        elif code == 0x81:  # ldx #len
            x = _SECCOMP_DATA_LEN
        elif code == 0x00:  # ld #k
            a = k
        elif code == 0x01:  # ldx #k
            x = k
        elif code in (0x60, 0x61) and k < 16:  # ld/ldx M[k]
            if code == 0x60:
                a = mem[k]
            else:
                x = mem[k]
        elif code in (0x02, 0x03) and k < 16:  # st/stx M[k]
            mem[k] = a if code == 0x02 else x
        elif cls == 0x04:  # alu
            op = code & 0xF0
            if op == 0x80:
                a = -a & mask
                continue
            operand = x if code & 0x08 else k
            if op not in alu or (op in (0x30, 0x90) and operand == 0):
                return SECCOMP_RET_KILL_PROCESS  # division by zero kills the filter's caller
            a = alu[op](a, operand) & mask
        elif cls == 0x05:  # jmp
            op = code & 0xF0
            operand = x if code & 0x08 else k
            if op == 0x00:
                pc += k
                continue
            tests = {0x10: a == operand, 0x20: a > operand, 0x30: a >= operand,
                     0x40: bool(a & operand)}
            if op not in tests:
                return SECCOMP_RET_KILL_PROCESS
            pc += jt if tests[op] else jf
        elif code == 0x06:  # ret #k
            return k
        elif code == 0x16:  # ret a
            return a
        elif code == 0x07:  # tax
            x = a
        elif code == 0x87:  # txa
            a = x
        else:
            return SECCOMP_RET_KILL_PROCESS
    return SECCOMP_RET_KILL_PROCESS


def describe_action(ret: int) -> str:
    """What seccomp action `ret` does to a call, as the end of "the filter would ..."."""
    action = ret & RET_ACTION_FULL
    if action == SECCOMP_RET_ERRNO:
        return f"fail it with errno {ret & 0xFFFF}"
    return {
        SECCOMP_RET_KILL_PROCESS: "kill the process", SECCOMP_RET_KILL_THREAD: "kill the thread",
        SECCOMP_RET_TRAP: "send it SIGSYS", SECCOMP_RET_USER_NOTIF: "hand the call to a supervisor",
        SECCOMP_RET_TRACE: "fail it with ENOSYS",
    }.get(action, "kill the process")
