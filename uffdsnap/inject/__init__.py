"""Run system calls inside another process with ptrace (the shape of CRIU's compel).

`attach` needs a userfaultfd that acts on an unmodified process's address space, and a uffd binds
to the mm of whoever creates it, so the target itself must make the call. We stop one of its
threads, point it at a `syscall` instruction it already has (in its vdso), let it run exactly that
one call, and put everything back. Nothing above this module sees registers:

    with injected(pid) as target:
        fd = target.syscall_fd(SYS_USERFAULTFD, flags)
        ours = target.take_fd(fd)
        target.close_fd(fd)

How the target is left untouched (x86_64 only):
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
- Seccomp: an injected call the target's filter would kill it for (or send to a supervisor) is
  refused before it runs. We read the filters (PTRACE_SECCOMP_GET_FILTER, needs CAP_SYS_ADMIN) and
  evaluate them; a target whose filters we cannot read is refused.
- Every resource injected through this API (fds, scratch pages) is closed/unmapped when the
  `with` block is left, on every path; then registers are restored and we detach. A target that
  exits mid-way ends the session with a KernelError (ESRCH), never a hang.
- Every ptrace request runs in one private tracer process per session, forked from ours (ptrace
  binds a tracee to the attaching *thread*), and callers wait on it with a timeout. If the target
  cannot be stopped in time (e.g. uninterruptible sleep) the caller gets ETIMEDOUT at once, and
  the tracer finishes the restore and detach whenever the target does stop.
- Our death does not strand the target: a tracer thread would die with us and the kernel would
  detach the target with injected registers in place (it then crashes in the borrowed vdso code).
  The tracer process outlives us, and when its socket reads EOF it removes what was injected,
  restores the registers and detaches. Between calls it rests with the saved registers in place.
- A process whose main thread has exited (a zombie group leader, other threads running): we drive
  a live thread, and reach its memory, maps and fds through /proc/PID/task/TID and a thread pidfd
  (the leader's /proc/PID/mem says ESRCH, and pidfd_getfd through it finds no files).
Known limits: if the tracer process itself is SIGKILLed during a call, the kernel detaches with
that call's registers in place; another thread of the target that forks while it briefly holds an
injected fd passes the copy on. Yama ptrace_scope=1 needs CAP_SYS_PTRACE even for our own
children (the tracer is never the target's ancestor).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import pickle
import platform
import select
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from uffdsnap.native import scm
from uffdsnap.native import uffd as _uffd
from uffdsnap.native.libc import KernelError, syscall
from uffdsnap.native.pidfd import pidfd_getfd, pidfd_open
from uffdsnap.procfs import parse_maps

# x86_64 system call numbers used here.
SYS_READ = 0
SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MUNMAP = 11
SYS_IOCTL = 16
SYS_NANOSLEEP = 35
SYS_GETPID = 39
SYS_RECVMSG = 47
SYS_SOCKETPAIR = 53
SYS_PTRACE = 101
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
_WALL = 0x40000000

# Kernel-internal "restart me" codes a tracer can see in rax (include/linux/errno.h).
_RESTART_CODES = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND",
                  516: "ERESTART_RESTARTBLOCK"}
_MAX_ERRNO = 4095
_RETRIES = 8
_X86_64_USER_CS = 0x33
_SYS_SECCOMP = 1  # si_code of a SIGSYS sent by a seccomp RET_TRAP

DEFAULT_TIMEOUT = 5.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PIDFD_THREAD = os.O_EXCL  # pidfd_open() flag (Linux 6.9): a pidfd for one thread, not its group


class _Regs(ctypes.Structure):
    """struct user_regs_struct (x86_64)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
        "es", "fs", "gs")]

    def copy(self) -> _Regs:
        return _Regs.from_buffer_copy(self)


def _call_name(nr: int) -> str:
    return f"injected {_SYSCALL_NAMES.get(nr, f'syscall {nr}')}"


def _signed(value: int) -> int:
    return ctypes.c_long(value).value


@dataclass(frozen=True)
class StopPoint:
    """Where the thread was when we stopped it (for logs and tests; registers stay private)."""

    syscall_nr: int | None  # the system call it was in (or returning from); None in user code
    restart: str | None  # e.g. "ERESTART_RESTARTBLOCK": the kernel restarts that call on resume


# ---- seccomp: decide before running a call whether the target's filters allow it ----------

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
_RET_ACTION_FULL = 0xFFFF0000
_AUDIT_ARCH_X86_64 = 0xC000003E
_SECCOMP_DATA_LEN = 64


def _action_rank(ret: int) -> int:
    """The kernel's precedence: the lowest signed action wins (KILL_PROCESS is most negative)."""
    return ctypes.c_int32(ret & _RET_ACTION_FULL).value


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


def _describe_action(ret: int) -> str:
    action = ret & _RET_ACTION_FULL
    if action == SECCOMP_RET_ERRNO:
        return f"fail it with errno {ret & 0xFFFF}"
    return {
        SECCOMP_RET_KILL_PROCESS: "kill the process", SECCOMP_RET_KILL_THREAD: "kill the thread",
        SECCOMP_RET_TRAP: "send it SIGSYS", SECCOMP_RET_USER_NOTIF: "hand the call to a supervisor",
        SECCOMP_RET_TRACE: "fail it with ENOSYS",
    }.get(action, "kill the process")


_ENLIST = "attach cannot use this target: have the workload enlist (send its own userfaultfd)"


# ---- the tracer process ---------------------------------------------------------------------

_MAX_MESSAGE = 1 << 16  # a pickled request or reply (a seqpacket message fits one buffer)
_TRACER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# The _Session methods a caller may request, and which of them return an fd of the tracer's
# (handed over with SCM_RIGHTS, then closed there).
_REQUESTS = frozenset({"attach", "run", "syscall_fd", "close_fd", "take_fd", "give_fd",
                       "map_scratch", "unmap_scratch", "read", "write", "release"})
_FD_RESULTS = frozenset({"take_fd"})


class _TracerProcess:
    """Runs every ptrace request of one session in a process of its own, forked from ours.

    ptrace ties a tracee to the thread that attached, so all requests come from one place. That
    place is not a thread of ours because it would die with us: if we were SIGKILLed
    mid-injection the kernel would detach the target with our registers in place (it runs on from
    the vdso `syscall` we borrowed and crashes) and keep any fd we made in it. The tracer outlives
    us: when its socket reads EOF (we are done, gave up waiting, or died) it releases the target
    as `_Session.release` does, and exits. It runs in a session of its own, deaf to terminal and
    termination signals, so what kills us (^C to our process group, SIGTERM, SIGKILL) does not
    kill it mid-call. It also lets a caller stop waiting (timeout) while the tracer finishes the
    restore and detach once the target stops.
    """

    def __init__(self, pid: int, tid: int, detail: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            child = os.fork()
        except OSError as e:
            ours.close()
            theirs.close()
            raise KernelError("fork", e.errno or errno.EAGAIN, detail,
                              "could not start a tracer process") from None
        if child == 0:
            _tracer_main(theirs, pid, tid)  # never returns
        theirs.close()
        self._child = child
        self._sock: socket.socket | None = ours
        self._busy = False  # a request is out and its reply has not come back
        self._hung_up = ""

    def call(self, request: str, args: tuple[object, ...], timeout: float, what: str,
             detail: str, fds: tuple[int, ...] = ()) -> object:
        """Have the tracer run _Session.`request`(*args, *copies of `fds`); its result, or its
        exception re-raised here; KernelError(ETIMEDOUT) if it takes longer than `timeout`.
        Any way out of a request but its reply hangs up, so a late reply is never taken for the
        next request's."""
        sock = self._sock
        if sock is None:
            raise KernelError(what, errno.ECANCELED, detail,
                              f"not sent: {self._hung_up}; the tracer process restores and "
                              "releases the target as soon as it stops")
        message = pickle.dumps((request, args))
        if len(message) > _MAX_MESSAGE:
            raise ValueError(f"request too large ({len(message)} bytes)")
        ready = False
        data, got = b"", []
        self._busy = True
        try:
            scm.send_fds(sock, message, list(fds))
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            ready = bool(poller.poll(max(0, int(timeout * 1000))))
            if ready:
                data, got = scm.recv_fds(sock, _MAX_MESSAGE, 1)
        except (OSError, ValueError) as e:
            self.finish("lost the tracer process")
            raise KernelError(what, errno.EPIPE, detail, f"lost the tracer process: {e}") from None
        except BaseException:
            self.finish(f"{what} was interrupted")
            raise
        if not ready:
            self.finish(f"{what} timed out")
            raise KernelError(what, errno.ETIMEDOUT, detail,
                              f"the target did not stop within {timeout:g}s (uninterruptible "
                              "sleep? see its /proc/PID/stack); it is restored and released "
                              "when it does")
        self._busy = False
        if not data:
            self.finish("the tracer process died")
            raise KernelError(what, errno.EPIPE, detail, "the tracer process died")
        kind, value = pickle.loads(data)
        if kind == "fd" and len(got) == 1:
            return got[0]
        for fd in got:
            os.close(fd)
        if kind == "ok":
            return value
        if kind == "kernel":
            call, err, err_detail, hint, notes = value
            error = KernelError(call, err, err_detail, hint)
            for note in notes:
                error.add_note(note)
            raise error
        if kind == "error" and isinstance(value, Exception):
            raise value
        raise KernelError(what, errno.EPROTO, detail, f"unexpected reply {kind!r} from the tracer")

    def finish(self, why: str = "the session ended") -> None:
        """Hang up: the tracer releases the target if it still holds it, and exits. It is reaped
        here, at once, unless it is still busy with a request (a target that will not stop):
        then a daemon thread reaps it whenever it is done."""
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        self._hung_up = why
        if self._busy:
            threading.Thread(target=_reap, args=(self._child,), name="uffdsnap-tracer-reaper",
                             daemon=True).start()
        else:
            _reap(self._child)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # someone else reaped it (e.g. SIGCHLD ignored)


def _tracer_main(sock: socket.socket, pid: int, tid: int) -> NoReturn:
    """The tracer process: serve requests until EOF, then release the target and exit."""
    code = 1
    try:
        gc.disable()  # a fork-time garbage socket, collected here, would close a reused fd number
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in _TRACER_IGNORES:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in range(3):
            if fd != null:
                os.dup2(null, fd)
        # Keep no copy of the caller's fds (a uffd, a pipe someone waits on for EOF) alive here.
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2 and int(name) != sock.fileno():
                try:
                    os.close(int(name))
                except OSError:
                    pass  # the listing's own fd
        session = _Session(pid, tid)
        try:
            _serve(sock, session)
        finally:
            session.release()
        code = 0
    finally:
        os._exit(code)


def _serve(sock: socket.socket, session: _Session) -> None:
    """One reply per request, in order; an error is a reply too, so the caller never waits in
    vain. Returns at EOF."""
    while True:
        try:
            data, fds = scm.recv_fds(sock, _MAX_MESSAGE, 1)
        except (OSError, ValueError):
            return
        if not data:
            return  # the caller is done, gave up, or died
        out: list[int] = []
        try:
            request, args = pickle.loads(data)
            if request not in _REQUESTS:
                raise ValueError(f"unknown tracer request {request!r}")
            value = getattr(session, request)(*args, *fds)
            if request in _FD_RESULTS:
                out, reply = [value], ("fd", None)
            else:
                reply = ("ok", value)
        except KernelError as e:
            reply = ("kernel", (e.call, e.errno, e.detail, e.hint, getattr(e, "__notes__", [])))
        except Exception as e:
            reply = ("error", e)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            try:
                message = pickle.dumps(reply)
            except Exception:
                message = pickle.dumps(("error", RuntimeError(repr(reply[1]))))
            if len(message) > _MAX_MESSAGE:
                message = pickle.dumps(("error", ValueError("reply too large")))
            scm.send_fds(sock, message, out)
        except OSError:
            pass  # the caller is gone: the next receive says so
        finally:
            for fd in out:
                os.close(fd)


# ---- one injection session (runs in the tracer process) -------------------------------------


@dataclass(frozen=True)
class _Stop:
    sig: int  # WSTOPSIG
    event: int  # PTRACE_EVENT_*, 0 for a signal-delivery or syscall stop
    syscall_stop: bool  # SIGTRAP|0x80 (PTRACE_O_TRACESYSGOOD)


class _Session:
    """One thread of the target, stopped. Between requests it always rests at a
    PTRACE_EVENT_STOP, inside get_signal() (or it is gone)."""

    def __init__(self, pid: int, tid: int):
        self.pid = pid
        self.tid = tid
        self.detail = _detail(pid, tid)
        # Every /proc file goes through the thread we drive: those of a zombie group leader
        # (main thread exited, others running) say ESRCH or read empty.
        self.proc = f"/proc/{pid}/task/{tid}"
        self.attached = False
        self.gone = False
        self.saved: _Regs | None = None
        self.dirty = False  # registers differ from `saved`
        self.stop: _Stop | None = None  # the stop the tracee is in
        self.stop_point = StopPoint(None, None)
        self.syscall_at = 0
        self.mem_fd = -1
        self.pidfd = -1
        self.filters: list[bytes] | None = None  # seccomp filters, [] when none
        self.seccomp_trapped = False  # an injected call got SIGSYS from seccomp
        self.fds: list[int] = []  # target fds we created, closed on release
        self.scratch: dict[int, int] = {}  # target scratch mappings we made: addr -> length

    # -- low level --

    def _ptrace(self, request: int, name: str, addr: int = 0, data: int = 0) -> int:
        call = f"ptrace({name})"
        try:
            return syscall(call, SYS_PTRACE, request, self.tid, addr, data, detail=self.detail)
        except KernelError as e:
            # A seized tracee leaves its stop without us only when it is killed, so ESRCH
            # means it is dying: wait for its exit and say so.
            if e.errno == errno.ESRCH and self.attached:
                self._wait(call)
            raise KernelError(call, e.errno or errno.EIO, self.detail, "") from None

    def _gone_error(self, call: str) -> KernelError:
        self.gone = True
        return KernelError(call, errno.ESRCH, self.detail,
                           "the target exited while we were injecting into it")

    def _wait(self, call: str) -> _Stop:
        """Block until the tracee stops or exits. WNOWAIT: if it is our own child its exit status
        stays for its parent code (e.g. subprocess) to collect."""
        try:
            info = os.waitid(os.P_PID, self.tid,
                             os.WEXITED | os.WSTOPPED | os.WNOWAIT | _WALL)
        except ChildProcessError:
            raise self._gone_error(call) from None
        assert info is not None
        if info.si_code != os.CLD_TRAPPED:
            raise self._gone_error(call)
        status = info.si_status
        self.stop = _Stop(status & 0x7F, status >> 8, status & 0xFF == signal.SIGTRAP | 0x80)
        return self.stop

    def _request(self, request: int, name: str, sig: int = 0) -> None:
        self._ptrace(request, name, 0, sig)

    def _getregs(self) -> _Regs:
        regs = _Regs()
        self._ptrace(PTRACE_GETREGS, "PTRACE_GETREGS", 0, ctypes.addressof(regs))
        return regs

    def _setregs(self, regs: _Regs) -> None:
        self._ptrace(PTRACE_SETREGS, "PTRACE_SETREGS", 0, ctypes.addressof(regs))

    def _our_sigsys(self) -> bool:
        """Is the current signal-delivery stop a seccomp SIGSYS raised by our injected call?"""
        buf = ctypes.create_string_buffer(128)
        self._ptrace(PTRACE_GETSIGINFO, "PTRACE_GETSIGINFO", 0, ctypes.addressof(buf))
        signo, _errno, code, _pad, call_addr = struct.unpack_from("<iiiiQ", buf.raw, 0)
        return signo == signal.SIGSYS and code == _SYS_SECCOMP and call_addr == self.syscall_at + 2

    def _sigsys_pending(self) -> bool:
        """A deliverable SIGSYS is queued for this thread (seccomp's is forced unblocked)."""
        status = f"{self.proc}/status"
        pending = int(_status_field(status, "SigPnd") or "0", 16)
        blocked = int(_status_field(status, "SigBlk") or "0", 16)
        return bool(pending & ~blocked & 1 << (signal.SIGSYS - 1))

    def _drop_our_sigsys(self, call: str) -> None:
        """At an injected call's exit stop with a seccomp SIGSYS queued for it (RET_TRAP: the call
        was skipped): run the tracee to that signal's delivery stop and discard it there, so the
        target never sees it. Our pre-check makes this rare (a filter added meanwhile by another
        thread with TSYNC)."""
        self._request(PTRACE_CONT, "PTRACE_CONT")
        while True:
            stop = self._wait(call)
            if not stop.event and not stop.syscall_stop and self._our_sigsys():
                break
            if not stop.event:
                raise KernelError(call, errno.EPROTO, self.detail, "expected our SIGSYS")
            self._request(PTRACE_CONT, "PTRACE_CONT")  # a group-stop came first
        self.seccomp_trapped = True
        self._request(PTRACE_INTERRUPT, "PTRACE_INTERRUPT")
        self._run_to_event_stop(call, 0)  # resumed without the signal: discarded

    def _syscall_op(self) -> tuple[int, int]:
        """(op, nr-or-return-value) of the current syscall stop (PTRACE_GET_SYSCALL_INFO)."""
        buf = ctypes.create_string_buffer(88)
        self._ptrace(PTRACE_GET_SYSCALL_INFO, "PTRACE_GET_SYSCALL_INFO", 88, ctypes.addressof(buf))
        return buf.raw[0], struct.unpack_from("<q", buf.raw, 24)[0]

    # -- attach --

    def attach(self) -> StopPoint:
        if platform.machine() != "x86_64":
            raise KernelError("ptrace injection", errno.ENOSYS, self.detail,
                              "only x86_64 targets are supported")
        if not os.path.exists(self.proc):
            raise KernelError("ptrace(PTRACE_SEIZE)", errno.ESRCH, self.detail,
                              "no such process or thread")
        self.pidfd = self._open_pidfd()
        try:
            self._ptrace(PTRACE_SEIZE, "PTRACE_SEIZE", 0, PTRACE_O_TRACESYSGOOD)
        except KernelError as e:
            state = _status_field(f"{self.proc}/status", "State") or "X"
            if state.startswith(("Z", "X")):  # the kernel says EPERM for a zombie
                raise KernelError(e.call, errno.ESRCH, e.detail, "the target has exited") from None
            raise KernelError(e.call, e.errno or errno.EPERM, e.detail,
                              _seize_hint(self.proc, e.errno or 0)) from None
        self.attached = True
        self._request(PTRACE_INTERRUPT, "PTRACE_INTERRUPT")
        self._run_to_event_stop("ptrace(PTRACE_INTERRUPT)", None)
        self.saved = self._getregs()
        if self.saved.cs != _X86_64_USER_CS:
            raise KernelError("ptrace injection", errno.ENOEXEC, self.detail,
                              "the target is not a 64-bit x86_64 process")
        self.stop_point = _stop_point(self.saved)
        try:
            self.mem_fd = os.open(f"{self.proc}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError("open", e.errno or errno.EIO, f"{self.proc}/mem", "") from None
        self.syscall_at = self._find_syscall_instruction()
        self.filters = self._seccomp_filters()
        return self.stop_point

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
                self._request(PTRACE_CONT, "PTRACE_CONT", sig)
            stop = self._wait(call)
            if stop.event == PTRACE_EVENT_STOP:
                break
            if stop.syscall_stop:
                raise KernelError(call, errno.EPROTO, self.detail, "unexpected syscall stop")
            sig = stop.sig
        if rebased and self.saved is not None:
            self.saved = self._getregs()

    def _settle(self, call: str) -> None:
        """Back to resting at an event stop from wherever an injected call left the tracee:
        a syscall stop (any pending call skipped) or a signal stop (that signal delivered)."""
        stop = self.stop
        if stop is None or stop.event:
            return
        sig = 0
        if stop.syscall_stop:
            regs = self._getregs()
            regs.orig_rax = 0xFFFFFFFFFFFFFFFF  # at an entry stop: skip the call
            self._setregs(regs)
            self.dirty = True
        else:
            sig = stop.sig
        self._request(PTRACE_INTERRUPT, "PTRACE_INTERRUPT")
        self._run_to_event_stop(call, sig)

    def _find_syscall_instruction(self) -> int:
        """Address of a `syscall` (0f 05) the target already has: in its vdso, else in any
        executable mapping. We never write code into the target."""
        try:
            with open(f"{self.proc}/maps") as f:
                maps = parse_maps(f.read())
        except OSError as e:
            raise KernelError("read", e.errno or errno.EIO, f"{self.proc}/maps") from None
        ordered = [m for m in maps if m.path == "[vdso]"] + [
            m for m in maps if m.perms[2] == "x" and m.path not in ("[vdso]", "[vsyscall]")]
        for mapping in ordered:
            start = mapping.start
            while start < mapping.end - 1:
                try:
                    code = os.pread(self.mem_fd, min(mapping.end - start, 1 << 20), start)
                except OSError:
                    break
                at = code.find(b"\x0f\x05")
                if at >= 0:
                    return start + at
                if len(code) < 2:
                    break
                start += len(code) - 1  # overlap one byte: an instruction may straddle chunks
        raise KernelError("ptrace injection", errno.ENOEXEC, self.detail,
                          "found no syscall instruction in the target to borrow")

    def _seccomp_filters(self) -> list[bytes]:
        mode = _status_field(f"{self.proc}/status", "Seccomp")
        if mode in (None, "0"):
            return []
        if mode == "1":
            raise KernelError("ptrace injection", errno.EPERM, self.detail,
                              "the target runs in seccomp strict mode: any injected call would "
                              "kill it")
        filters: list[bytes] = []
        for index in range(1 << 16):
            try:
                count = self._ptrace(PTRACE_SECCOMP_GET_FILTER, "PTRACE_SECCOMP_GET_FILTER",
                                     index, 0)
            except KernelError as e:
                if e.errno == errno.ENOENT:
                    return filters
                raise KernelError(e.call, e.errno or errno.EPERM, e.detail,
                                  "the target runs under a seccomp filter and we cannot read it "
                                  "(needs CAP_SYS_ADMIN); injecting a call could kill it") from None
            buf = ctypes.create_string_buffer(8 * count)
            self._ptrace(PTRACE_SECCOMP_GET_FILTER, "PTRACE_SECCOMP_GET_FILTER", index,
                         ctypes.addressof(buf))
            filters.append(buf.raw)
        return filters

    # -- running one call --

    def run(self, nr: int, args: tuple[int, ...]) -> int:
        """Run syscall `nr` in the tracee; return its result or raise KernelError for -errno."""
        name = _call_name(nr)
        detail = f"{self.detail}, args=({', '.join(hex(a) for a in args)})"
        if self.gone:
            raise self._gone_error(name)
        self.seccomp_trapped = False
        if len(args) > 6:
            raise ValueError("a system call takes at most 6 arguments")
        if self.filters:
            verdict = seccomp_verdict(self.filters, nr, args, self.syscall_at + 2)
            action = verdict & _RET_ACTION_FULL
            if action not in (SECCOMP_RET_ALLOW, SECCOMP_RET_LOG):
                err = min(verdict & 0xFFFF, _MAX_ERRNO) if action == SECCOMP_RET_ERRNO else 0
                raise KernelError(name, err or errno.EPERM, detail,
                                  f"not run: the target's seccomp filter would "
                                  f"{_describe_action(verdict)}; {_ENLIST}")
        for _ in range(_RETRIES):
            result = self._run_once(nr, args, name)
            self._settle(name)
            if -result not in _RESTART_CODES:
                break
        else:
            result = -errno.EINTR
        self._put_back()
        if -_MAX_ERRNO <= result < 0:
            raise KernelError(name, -result, detail,
                              f"the target's seccomp filter trapped it; {_ENLIST}"
                              if self.seccomp_trapped else None)
        return result

    def _inject_regs(self, nr: int, args: tuple[int, ...]) -> None:
        assert self.saved is not None
        regs = self.saved.copy()
        regs.rip = self.syscall_at
        regs.rax = nr
        regs.orig_rax = 0xFFFFFFFFFFFFFFFF  # -1: not in a syscall, so nothing gets "restarted"
        for reg, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
            setattr(regs, reg, value & 0xFFFFFFFFFFFFFFFF)
        self._setregs(regs)
        self.dirty = True

    def _run_once(self, nr: int, args: tuple[int, ...], name: str) -> int:
        self._inject_regs(nr, args)
        self._request(PTRACE_SYSCALL, "PTRACE_SYSCALL")
        entered = False
        while True:
            stop = self._wait(name)
            if stop.syscall_stop:
                op, value = self._syscall_op()
                if op == PTRACE_SYSCALL_INFO_ENTRY and not entered:
                    if value != nr:
                        raise KernelError(name, errno.EPROTO, self.detail,
                                          f"entered syscall {value}, not {nr}")
                    entered = True
                elif op == PTRACE_SYSCALL_INFO_EXIT and entered:
                    if self.filters and self._sigsys_pending():
                        self._drop_our_sigsys(name)
                        return -errno.ENOSYS
                    return value
            elif not stop.event:
                if self._our_sigsys():
                    self.seccomp_trapped = True  # our call's SIGSYS: swallow it
                elif entered:  # no signal is dequeued between entry and exit
                    raise KernelError(name, errno.EPROTO, self.detail,
                                      f"signal {stop.sig} stop inside the injected call")
                else:  # a real signal, before our call ran: deliver it, then start again
                    self._request(PTRACE_INTERRUPT, "PTRACE_INTERRUPT")
                    self._run_to_event_stop(name, stop.sig)
                    self._inject_regs(nr, args)
            # else an interrupt or group-stop trap: keep going
            self._request(PTRACE_SYSCALL, "PTRACE_SYSCALL")

    # -- memory --

    def read(self, addr: int, length: int) -> bytes:
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
        try:
            done = os.pwrite(self.mem_fd, data, addr)
        except OSError as e:
            raise KernelError("write target memory", e.errno or errno.EIO,
                              f"{self.detail}, addr={addr:#x}, len={len(data)}") from None
        if done != len(data):
            raise KernelError("write target memory", errno.EFAULT,
                              f"{self.detail}, addr={addr:#x}, len={len(data)}")

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
        addr = self.run(SYS_MMAP, (0, length, 0x3, 0x22, -1, 0))  # RW, MAP_PRIVATE|ANONYMOUS
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

    def give_fd(self, ours: int) -> int:
        """Install a copy of our fd `ours` in the target: it recvmsg()s it, SCM_RIGHTS, from one
        end of a socketpair made in the target whose other end we borrow with pidfd_getfd. No
        listening socket, so nobody else can connect and receive the fd, and no netns issue."""
        page = self.map_scratch(PAGE_SIZE)
        try:
            self.run(SYS_SOCKETPAIR, (socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC,
                                      0, page))
            a, b = struct.unpack("<ii", self.read(page, 8))
            self.fds += [a, b]
            try:
                with socket.socket(fileno=self.take_fd(a)) as sender:
                    sender.settimeout(0)  # an empty socket's buffer takes one byte at once
                    sender.sendmsg([b"F"], scm.fds_ancillary([ours]))
                received = self._recv_fd(page, b)
            finally:  # both ends stay open until here: `received` cannot reuse their numbers
                for fd in (a, b):
                    if not self.gone:
                        self.close_fd(fd)
        finally:
            self.unmap_scratch(page)
        return received

    def _recv_fd(self, page: int, sock: int) -> int:
        """recvmsg() one byte and one SCM_RIGHTS fd on target socket `sock`, via scratch `page`."""
        data, iov, msg, cmsg = page + 64, page + 128, page + 192, page + 256
        cmsg_len = socket.CMSG_SPACE(4)  # the page is fresh, so already zeroed
        self.write(iov, struct.pack("<QQ", data, 1))
        self.write(msg, struct.pack("<QI4xQQQQi4x", 0, 0, iov, 1, cmsg, cmsg_len, 0))
        self.run(SYS_RECVMSG, (sock, msg, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT))
        controllen, flags = struct.unpack("<Qi", self.read(msg + 40, 12))
        length, level, kind, fd = struct.unpack("<Qiii", self.read(cmsg, 20))
        if controllen >= 20 and level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            self.fds.append(fd)
        else:
            fd = -1
        if fd < 0 or flags & socket.MSG_CTRUNC or length != socket.CMSG_LEN(4):
            raise KernelError("injected recvmsg", errno.EPROTO, self.detail,
                              "the target did not receive the file descriptor intact")
        return fd

    # -- release --

    def release(self) -> None:
        """Close what we opened, unmap what we mapped, restore registers, detach."""
        errors: list[KernelError] = []
        try:
            if self.attached and not self.gone:
                for fd in reversed(self.fds[:]):
                    self._best_effort(errors, self.close_fd, fd)
                for addr in list(self.scratch):
                    self._best_effort(errors, self.unmap_scratch, addr)
                if not self.gone:
                    self._restore_and_detach()
        except KernelError as e:
            if not self.gone:
                errors.insert(0, e)
        finally:
            if self.mem_fd >= 0:
                os.close(self.mem_fd)
            if self.pidfd >= 0:
                os.close(self.pidfd)
            self.mem_fd = self.pidfd = -1
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

    def _put_back(self) -> None:
        """The saved registers back in while we rest between calls: if we (the tracer) die
        there, the kernel's detach lets the thread carry on as if never stopped."""
        if self.saved is not None and self.dirty:
            self._setregs(self.saved)
            self.dirty = False

    def _restore_and_detach(self) -> None:
        # Back inside get_signal(), where we found it: the saved registers then meet the
        # syscall-restart logic exactly as they would have without us.
        self._settle("ptrace(PTRACE_INTERRUPT)")
        self._put_back()
        self._ptrace(PTRACE_DETACH, "PTRACE_DETACH")
        self.attached = False


def _stop_point(regs: _Regs) -> StopPoint:
    nr = _signed(regs.orig_rax)
    if nr < 0:
        return StopPoint(None, None)
    return StopPoint(nr, _RESTART_CODES.get(-_signed(regs.rax)))


def _status_field(path: str, field: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == field:
                    return value.strip()
    except OSError:
        pass
    return None


def _detail(pid: int, tid: int) -> str:
    return f"pid={pid}" if pid == tid else f"pid={pid}, tid={tid}"


def _seize_hint(task: str, err: int) -> str:
    """Why PTRACE_SEIZE of /proc/PID/task/TID `task` was refused, in terms a user can act on."""
    if err == errno.ESRCH:
        return "no such process"
    if err != errno.EPERM:
        return ""
    tracer = _status_field(f"{task}/status", "TracerPid")
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


def _pick_thread(pid: int) -> int:
    """The thread to stop: the leader, unless it has exited while other threads run on."""
    state = _status_field(f"/proc/{pid}/status", "State")
    if state is None or not state.startswith(("Z", "X")):
        return pid
    try:
        tasks = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return pid
    for tid in tasks:
        state = _status_field(f"/proc/{pid}/task/{tid}/status", "State")
        if state is not None and not state.startswith(("Z", "X")):
            return tid
    return pid


# ---- the public face -----------------------------------------------------------------------


class Injected:
    """A stopped thread of another process that runs system calls for us (see `injected`).

    Target fds and scratch pages made through it are removed when the `with` block is left.
    """

    def __init__(self, tracer: _TracerProcess, pid: int, tid: int, stop_point: StopPoint,
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
                                 _detail(self._pid, self._tid), fds)

    def syscall(self, nr: int, *args: int) -> int:
        """Run system call `nr` in the target; its result (>= 0) or KernelError for -errno."""
        return self._call(_call_name(nr), "run", nr, args)

    def syscall_fd(self, nr: int, *args: int) -> int:
        """Run a call that returns a new fd in the target; that fd is closed on leaving unless
        `close_fd` closed it first."""
        return self._call(_call_name(nr), "syscall_fd", nr, args)

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
    (exceptions, the target exiting, our own death: see _TracerProcess) removes what was
    injected, restores the registers and detaches: the target is never left stopped or altered.
    Each step waits at most `timeout` seconds. Raises KernelError naming the call that failed
    and why (permissions, Yama, seccomp, the target exiting).
    """
    if pid == os.getpid():
        raise KernelError("ptrace(PTRACE_SEIZE)", errno.EINVAL, f"pid={pid}",
                          "cannot inject into our own process")
    tid = _pick_thread(pid) if tid is None else tid
    detail = _detail(pid, tid)
    tracer = _TracerProcess(pid, tid, detail)

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
                   timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
    """Create a userfaultfd that acts on process `pid`'s address space and return it as
    (fd in our process, route), route "syscall" or "device".

    The target makes the uffd itself (a uffd binds to its creator's mm): by an injected
    userfaultfd() if it may, else, for unprivileged targets, by ioctl(USERFAULTFD_IOC_NEW) on a
    /dev/userfaultfd fd we hand it. Its own copies are closed before we return, so our fd is the
    only reference: closing it releases every write-protect in the target.
    """
    if flags & _uffd.UFFD_USER_MODE_ONLY:
        raise ValueError("UFFD_USER_MODE_ONLY breaks kernel-mode writes into protected memory")
    if pid == os.getpid():
        return _uffd.create_uffd(flags)
    ours = -1
    try:
        with injected(pid, timeout=timeout) as target:
            try:
                theirs = target.syscall_fd(SYS_USERFAULTFD, flags)
                route = "syscall"
            except KernelError as first:
                if first.errno not in (errno.EPERM, errno.EACCES, errno.ENOSYS):
                    raise
                try:
                    theirs, route = _create_by_device(target, flags, first), "device"
                except KernelError as second:
                    second.add_note(f"the userfaultfd() route failed first: {first}")
                    raise
            ours = target.take_fd(theirs)
            target.close_fd(theirs)
        return ours, route
    except BaseException:
        if ours >= 0:
            os.close(ours)
        raise


def _create_by_device(target: Injected, flags: int, first: KernelError) -> int:
    """The /dev/userfaultfd route: any process holding a device fd may create a full uffd."""
    try:
        device = os.open(_uffd.USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(first.call, first.errno or errno.EPERM, first.detail,
                          f"{first.hint}; and we cannot open {_uffd.USERFAULTFD_DEVICE} to hand "
                          f"it one: {os.strerror(e.errno or 0)}") from None
    try:
        theirs = target.give_fd(device)
    finally:
        os.close(device)
    uffd = target.syscall_fd(SYS_IOCTL, theirs, _uffd.USERFAULTFD_IOC_NEW, flags)
    target.close_fd(theirs)
    return uffd
