"""One seized thread of the target: stop it, run one system call in it at a time, put it back.

How the thread is left as we found it (x86_64 only):
- The stop we take is PTRACE_INTERRUPT's trap, which the kernel reports from inside get_signal(),
  *before* it decides whether an interrupted system call restarts (ERESTARTSYS,
  ERESTART_RESTARTBLOCK, ...). We run each injected call with orig_rax=-1 (so no restart logic
  fires on our registers), follow it with PTRACE_SYSCALL to its entry and exit stops, and at the
  end interrupt again, so the thread is back at that same pre-restart point when the saved
  registers go back in. A thread that was in sleep/read/poll resumes the call as if never
  stopped. Exception, as with any debugger attach: epoll_wait() and a few others return EINTR on
  any stop (signal(7)); programs already retry those.
- A signal that arrives mid-injection is not held back or faked: at its delivery stop the saved
  registers go back in and the signal is delivered as it would have been, then we interrupt again
  and carry on from the new point (e.g. the start of the target's handler). A stop signal makes a
  group-stop, which the kernel re-establishes when we detach (so no PTRACE_LISTEN is needed): a
  target that was stopped, or was being stopped, stays stopped.
- Seccomp: a call the target's filters would kill it for (or send to a supervisor) is refused
  before it runs (see _seccomp); a target whose filters we cannot read is refused. A RET_TRAP
  that outruns that check (a filter added meanwhile) is swallowed, never delivered.
- Between calls the saved registers are in place, so if the tracer dies there, the kernel's
  detach lets the thread carry on as if never stopped.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from typing import TypeVar

from uffdsnap.inject import _seccomp
from uffdsnap.inject._x86_64 import (
    MAX_ERRNO,
    NO_SYSCALL,
    RESTART_CODES,
    SYSCALL_INSN,
    USER_CS,
    StopPoint,
    call_name,
    call_registers,
    find_syscall_instruction,
    stop_point,
)
from uffdsnap.native import ptrace, sched
from uffdsnap.native.libc import KernelError

_T = TypeVar("_T")
_RETRIES = 8  # runs of a call the kernel keeps asking to restart, before we say EINTR


def status_field(path: str, field: str) -> str | None:
    """`field` of a /proc status file, or None if it (or the process) is not there."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == field:
                    return value.strip()
    except OSError:
        pass
    return None


def describe(pid: int, tid: int) -> str:
    """How errors name the target: "pid=12", or "pid=12, tid=13" for another thread."""
    return f"pid={pid}" if pid == tid else f"pid={pid}, tid={tid}"


def pick_thread(pid: int) -> int:
    """The thread to stop: the leader, unless it has exited while other threads run on."""
    state = status_field(f"/proc/{pid}/status", "State")
    if state is None or not state.startswith(("Z", "X")):
        return pid
    try:
        tasks = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return pid
    for tid in tasks:
        state = status_field(f"/proc/{pid}/task/{tid}/status", "State")
        if state is not None and not state.startswith(("Z", "X")):
            return tid
    return pid


def _seize_hint(task: str, err: int) -> str:
    """Why PTRACE_SEIZE of /proc/PID/task/TID `task` was refused, in terms a user can act on."""
    if err == errno.ESRCH:
        return "no such process"
    if err != errno.EPERM:
        return ""
    tracer = status_field(f"{task}/status", "TracerPid")
    if tracer not in (None, "0"):
        return f"the target is already traced by pid {tracer} (a debugger or strace?)"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = "0"
    if scope == "3":
        return "kernel.yama.ptrace_scope=3 forbids ptrace on this machine until reboot"
    if scope in ("1", "2") and os.geteuid() != 0:
        return (f"kernel.yama.ptrace_scope={scope} only lets CAP_SYS_PTRACE holders trace "
                f"{'a process that is not their descendant ' if scope == '1' else ''}(our tracer "
                "never is the target's ancestor): run as root or give uffdsnap CAP_SYS_PTRACE")
    return ("needs CAP_SYS_PTRACE, or the target's uid and a dumpable target (not setuid, not a "
            "kernel thread); run `uffdsnap doctor`")


def _verdict(filters: list[bytes], nr: int, args: tuple[int, ...], ip: int) -> int:
    """seccomp_verdict as uffdsnap.inject exports it, looked up there when a call is made: that
    name is the policy, and replacing it (as a test does, to outrun our check on purpose) must
    reach the tracer process, which is forked afterwards."""
    from uffdsnap import inject

    return inject.seccomp_verdict(filters, nr, args, ip)


class Tracee:
    """One thread of the target, seized. Between calls it always rests at a PTRACE_EVENT_STOP,
    inside get_signal() (or it is gone)."""

    def __init__(self, pid: int, tid: int):
        self.tid = tid
        self.detail = describe(pid, tid)
        # Every /proc file goes through the thread we drive: those of a zombie group leader
        # (main thread exited, others running) say ESRCH or read empty.
        self.proc = f"/proc/{pid}/task/{tid}"
        self.attached = False
        self.gone = False
        self.saved: ptrace.Regs | None = None
        self.dirty = False  # registers differ from `saved`
        self.stop: ptrace.Stop | None = None  # the stop the tracee is in
        self.stop_point = StopPoint(None, None)
        self.syscall_at = 0
        self.mem_fd = -1
        self.filters: list[bytes] | None = None  # seccomp filters, [] when none
        self.seccomp_trapped = False  # an injected call got SIGSYS from seccomp
        self.slice: sched.Slice | None = None  # its own, while we drive it (see attach)

    # -- ptrace --

    def _ptrace(self, request: Callable[..., _T], *args: object) -> _T:
        """ptrace `request` (a uffdsnap.native.ptrace function) on our thread."""
        try:
            return request(self.tid, *args, detail=self.detail)
        except KernelError as e:
            # A seized tracee leaves its stop without us only when it is killed, so ESRCH
            # means it is dying: wait for its exit and say so.
            if e.errno == errno.ESRCH and self.attached:
                self._wait(e.call)
            raise

    def gone_error(self, call: str) -> KernelError:
        self.gone = True
        return KernelError(call, errno.ESRCH, self.detail,
                           "the target exited while we were injecting into it")

    def _wait(self, call: str) -> ptrace.Stop:
        """Block until the tracee stops (the stop, also kept in self.stop) or exits (raised)."""
        stop = ptrace.wait_stop(self.tid)
        if stop is None:
            raise self.gone_error(call)
        self.stop = stop
        return stop

    def _setregs(self, regs: ptrace.Regs) -> None:
        self._ptrace(ptrace.setregs, regs)

    # -- attach --

    def attach(self) -> StopPoint:
        """Seize and stop the thread, save its registers, and find what calls need: a `syscall`
        instruction to borrow and the seccomp filters to check them against."""
        try:
            self._ptrace(ptrace.seize, ptrace.PTRACE_O_TRACESYSGOOD)
        except KernelError as e:
            state = status_field(f"{self.proc}/status", "State") or "X"
            if state.startswith(("Z", "X")):  # the kernel says EPERM for a zombie
                raise KernelError(e.call, errno.ESRCH, e.detail, "the target has exited") from None
            raise KernelError(e.call, e.errno or errno.EPERM, e.detail,
                              _seize_hint(self.proc, e.errno or 0)) from None
        self.attached = True
        self._ptrace(ptrace.interrupt)
        self._run_to_event_stop("ptrace(PTRACE_INTERRUPT)", None)
        # each call we inject makes it run a few times: with every CPU busy, a short slice
        # (its CPU share unchanged) spares it a wait for a turn each time; put back at detach
        self.slice = sched.short_slice(self.tid)
        self.saved = self._ptrace(ptrace.getregs)
        if self.saved.cs != USER_CS:
            raise KernelError("ptrace injection", errno.ENOEXEC, self.detail,
                              "the target is not a 64-bit x86_64 process")
        self.stop_point = stop_point(self.saved)
        try:
            self.mem_fd = os.open(f"{self.proc}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError("open", e.errno or errno.EIO, f"{self.proc}/mem", "") from None
        self.syscall_at = find_syscall_instruction(self.proc, self.mem_fd, self.detail)
        self.filters = self._seccomp_filters()
        return self.stop_point

    def _seccomp_filters(self) -> list[bytes]:
        mode = status_field(f"{self.proc}/status", "Seccomp")
        if mode in (None, "0"):
            return []
        if mode == "1":
            raise KernelError("ptrace injection", errno.EPERM, self.detail,
                              "the target runs in seccomp strict mode: any injected call would "
                              "kill it")
        filters: list[bytes] = []
        for index in range(1 << 16):
            try:
                length = self._ptrace(ptrace.seccomp_filter_length, index)
            except KernelError as e:
                if e.errno == errno.ENOENT:
                    return filters
                raise KernelError(e.call, e.errno or errno.EPERM, e.detail,
                                  "the target runs under a seccomp filter and we cannot read it "
                                  "(needs CAP_SYS_ADMIN); injecting a call could kill it") from None
            filters.append(self._ptrace(ptrace.seccomp_get_filter, index, length))
        return filters

    # -- resting at an event stop --

    def _run_to_event_stop(self, call: str, resume_sig: int | None) -> None:
        """Run the tracee (resumed with `resume_sig`; None if it is already running) into a
        PTRACE_EVENT_STOP, i.e. our PTRACE_INTERRUPT or a group-stop: a point inside get_signal()
        before any syscall-restart decision. A signal met on the way is delivered exactly as
        without us: our registers go out first, and the stop we reach (e.g. the start of the
        target's handler) becomes the new resting point."""
        sig = resume_sig
        rebased = False
        while True:
            if sig is not None:
                if sig:
                    if self.dirty and self.saved is not None:
                        self._setregs(self.saved)
                        self.dirty = False
                    rebased = True
                self._ptrace(ptrace.cont, sig)
            stop = self._wait(call)
            if stop.event == ptrace.PTRACE_EVENT_STOP:
                break
            if stop.syscall_stop:
                raise KernelError(call, errno.EPROTO, self.detail, "unexpected syscall stop")
            sig = stop.sig
        if rebased and self.saved is not None:
            self.saved = self._ptrace(ptrace.getregs)

    def _settle(self, call: str) -> None:
        """Back to resting at an event stop from wherever an injected call left the tracee:
        a syscall stop (any pending call skipped) or a signal stop (that signal delivered)."""
        stop = self.stop
        if stop is None or stop.event:
            return
        sig = 0
        if stop.syscall_stop:
            regs = self._ptrace(ptrace.getregs)
            regs.orig_rax = NO_SYSCALL  # at an entry stop: skip the call
            self._setregs(regs)
            self.dirty = True
        else:
            sig = stop.sig
        self._ptrace(ptrace.interrupt)
        self._run_to_event_stop(call, sig)

    def _put_back(self) -> None:
        """The saved registers back in while we rest between calls: if we (the tracer) die
        there, the kernel's detach lets the thread carry on as if never stopped."""
        if self.saved is not None and self.dirty:
            self._setregs(self.saved)
            self.dirty = False

    def restore_and_detach(self) -> None:
        # Back inside get_signal(), where we found it: the saved registers then meet the
        # syscall-restart logic exactly as they would have without us.
        self._settle("ptrace(PTRACE_INTERRUPT)")
        self._put_back()
        self.restore_slice()
        self._ptrace(ptrace.detach)
        self.attached = False

    # -- running one call --

    def run(self, nr: int, args: tuple[int, ...]) -> int:
        """Run syscall `nr` in the tracee; return its result or raise KernelError for -errno."""
        name = call_name(nr)
        detail = f"{self.detail}, args=({', '.join(hex(a) for a in args)})"
        if self.gone:
            raise self.gone_error(name)
        self.seccomp_trapped = False
        if len(args) > 6:
            raise ValueError("a system call takes at most 6 arguments")
        if self.filters:
            verdict = _verdict(self.filters, nr, args, self.syscall_at + len(SYSCALL_INSN))
            action = verdict & _seccomp.RET_ACTION_FULL
            if action not in (_seccomp.SECCOMP_RET_ALLOW, _seccomp.SECCOMP_RET_LOG):
                err = (min(verdict & 0xFFFF, MAX_ERRNO)
                       if action == _seccomp.SECCOMP_RET_ERRNO else 0)
                raise KernelError(name, err or errno.EPERM, detail,
                                  f"not run: the target's seccomp filter would "
                                  f"{_seccomp.describe_action(verdict)}; {_seccomp.ENLIST}")
        for _ in range(_RETRIES):
            result = self._run_once(nr, args, name)
            self._settle(name)
            if -result not in RESTART_CODES:
                break
        else:
            result = -errno.EINTR
        self._put_back()
        if -MAX_ERRNO <= result < 0:
            raise KernelError(name, -result, detail,
                              f"the target's seccomp filter trapped it; {_seccomp.ENLIST}"
                              if self.seccomp_trapped else None)
        return result

    def _inject_regs(self, nr: int, args: tuple[int, ...]) -> None:
        assert self.saved is not None
        self._setregs(call_registers(self.saved, self.syscall_at, nr, args))
        self.dirty = True

    def _run_once(self, nr: int, args: tuple[int, ...], name: str) -> int:
        self._inject_regs(nr, args)
        self._ptrace(ptrace.cont_to_syscall)
        entered = False
        while True:
            stop = self._wait(name)
            if stop.syscall_stop:
                info = self._ptrace(ptrace.get_syscall_info)
                if info.op == ptrace.PTRACE_SYSCALL_INFO_ENTRY and not entered:
                    if info.value != nr:
                        raise KernelError(name, errno.EPROTO, self.detail,
                                          f"entered syscall {info.value}, not {nr}")
                    entered = True
                elif info.op == ptrace.PTRACE_SYSCALL_INFO_EXIT and entered:
                    if self.filters and self._sigsys_pending():
                        self._drop_our_sigsys(name)
                        return -errno.ENOSYS
                    return info.value
            elif not stop.event:
                if self._our_sigsys():
                    self.seccomp_trapped = True  # our call's SIGSYS: swallow it
                elif entered:  # no signal is dequeued between entry and exit
                    raise KernelError(name, errno.EPROTO, self.detail,
                                      f"signal {stop.sig} stop inside the injected call")
                else:  # a real signal, before our call ran: deliver it, then start again
                    self._ptrace(ptrace.interrupt)
                    self._run_to_event_stop(name, stop.sig)
                    self._inject_regs(nr, args)
            # else an interrupt or group-stop trap: keep going
            self._ptrace(ptrace.cont_to_syscall)

    # -- seccomp's SIGSYS for a call of ours --

    def _our_sigsys(self) -> bool:
        """Is the current signal-delivery stop a seccomp SIGSYS raised by our injected call?"""
        info = self._ptrace(ptrace.getsiginfo)
        return (info.signo == signal.SIGSYS and info.code == _seccomp.SYS_SECCOMP
                and info.call_addr == self.syscall_at + len(SYSCALL_INSN))

    def _sigsys_pending(self) -> bool:
        """A deliverable SIGSYS is queued for this thread (seccomp's is forced unblocked)."""
        status = f"{self.proc}/status"
        pending = int(status_field(status, "SigPnd") or "0", 16)
        blocked = int(status_field(status, "SigBlk") or "0", 16)
        return bool(pending & ~blocked & 1 << (signal.SIGSYS - 1))

    def _drop_our_sigsys(self, call: str) -> None:
        """At an injected call's exit stop with a seccomp SIGSYS queued for it (RET_TRAP: the call
        was skipped): run the tracee to that signal's delivery stop and discard it there, so the
        target never sees it. Our pre-check makes this rare (a filter added meanwhile by another
        thread with TSYNC)."""
        self._ptrace(ptrace.cont)
        while True:
            stop = self._wait(call)
            if not stop.event and not stop.syscall_stop and self._our_sigsys():
                break
            if not stop.event:
                raise KernelError(call, errno.EPROTO, self.detail, "expected our SIGSYS")
            self._ptrace(ptrace.cont)  # a group-stop came first
        self.seccomp_trapped = True
        self._ptrace(ptrace.interrupt)
        self._run_to_event_stop(call, 0)  # resumed without the signal: discarded

    # -- memory --

    def read(self, addr: int, length: int) -> bytes:
        """Read target memory (through /proc/PID/task/TID/mem)."""
        try:
            data = os.pread(self.mem_fd, length, addr)
        except OSError as e:
            raise KernelError("read target memory", e.errno or errno.EIO,
                              f"{self.detail}, addr={addr:#x}, len={length}") from None
        if len(data) != length:
            raise KernelError("read target memory", errno.EFAULT,
                              f"{self.detail}, addr={addr:#x}, len={length}")
        return data

    def write(self, addr: int, data: bytes) -> None:
        """Write target memory (through /proc/PID/task/TID/mem)."""
        try:
            done = os.pwrite(self.mem_fd, data, addr)
        except OSError as e:
            raise KernelError("write target memory", e.errno or errno.EIO,
                              f"{self.detail}, addr={addr:#x}, len={len(data)}") from None
        if done != len(data):
            raise KernelError("write target memory", errno.EFAULT,
                              f"{self.detail}, addr={addr:#x}, len={len(data)}")

    def restore_slice(self) -> None:
        sched.restore(self.slice)
        self.slice = None

    def close(self) -> None:
        """Close our handle on its memory (after detach, or when it is gone)."""
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
        self.mem_fd = -1
