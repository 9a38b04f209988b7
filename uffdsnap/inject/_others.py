"""The target's other threads, held stopped while it holds an fd we lent it or a uffd it made.

Whatever we put in the target's fd table (the /dev/userfaultfd fd of the device route, the new
uffd before we take and close it) is, for that moment, reachable by every thread of the target:
a hostile one could dup it, keep it, and create uffds that vm.unprivileged_userfaultfd=0 denies
it, or keep our uffd's context alive past our close. So from before the first such fd arrives
until after its last copy is closed, every thread but the one we drive is ptrace-stopped.

A thread is seized and interrupted (PTRACE_SEIZE, PTRACE_INTERRUPT), and held at the
PTRACE_EVENT_STOP inside get_signal(), before any syscall-restart decision: detaching from there
lets it carry on exactly as if never stopped, registers untouched (the kernel does the same if
the tracer dies). Threads created while we stop the others are caught by listing
/proc/PID/task again until a listing shows no thread we do not hold: a stopped thread cannot
clone, and a clone that was under way when its thread stopped has already put its child in the
list. A signal met on the way is delivered as without us. Threads that exit are forgotten. A
thread that does not stop in time (uninterruptible sleep, a vfork parent) fails the stop:
the others must not stay stopped behind it.

A held thread that is killed (SIGKILL of the whole target) stays a zombie until its tracer
reaps it, and until then the group leader's exit is not reported: a waiter on the thread we
drive would wait for ever. So once a thread is held, a thread of the tracer waits for it (its
stop report, then its exit), reaping it if it dies; it ends with the tracer process.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

from uffdsnap.inject._tracee import status_field
from uffdsnap.native import ptrace
from uffdsnap.native.libc import KernelError

MAX_ROUNDS = 64  # listings of /proc/PID/task that each found new threads, before we give up
_RUNNING = "running"  # (a _poll_stop result: no stop or exit to report yet)


class OtherThreads:
    """Every thread of process `pid` except `driven`, stopped by `stop` until `resume`."""

    def __init__(self, pid: int, driven: int, detail: str):
        self.pid = pid
        self.driven = driven
        self.detail = detail
        self.held: set[int] = set()  # seized by us, stopped (or exited since)
        self.dead: set[int] = set()  # exited (or zombies: a leader that exited) when we came

    def stop(self, timeout: float) -> int:
        """Stop every other thread, those created meanwhile included, within `timeout`
        seconds; how many are held. Raises KernelError (ETIMEDOUT, EAGAIN if threads keep
        appearing, EPERM if one is traced by someone else); the caller's release resumes
        whatever was stopped."""
        deadline = time.monotonic() + timeout
        # SIGCHLD (a tracee stopped) blocked, so that it waits for sigtimedwait, never lost
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            for _ in range(MAX_ROUNDS):
                new = [tid for tid in self._tids()
                       if tid not in self.held and tid not in self.dead and tid != self.driven]
                if not new:
                    return len(self.held)
                for tid in [tid for tid in new if self._seize(tid)]:
                    self._wait_stopped(tid, deadline, timeout)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise KernelError("ptrace(PTRACE_SEIZE)", errno.EAGAIN, self.detail,
                          f"the target kept creating threads through {MAX_ROUNDS} rounds of "
                          "stopping them")

    def resume(self) -> None:
        """Detach every held thread (each carries on from where it stopped). A thread that
        exited meanwhile is simply gone; one still on its way to the stop is let go when the
        tracer process exits. Every thread is tried; the first error is raised after."""
        held, self.held = self.held, set()
        errors: list[KernelError] = []
        for tid in sorted(held):
            try:
                ptrace.detach(tid, detail=self._describe(tid))
            except KernelError as e:
                if e.errno != errno.ESRCH:  # ESRCH: exited, being killed, or not stopped
                    errors.append(e)
        if errors:
            raise errors[0]

    def _tids(self) -> list[int]:
        try:
            return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        except FileNotFoundError:
            raise KernelError("ptrace(PTRACE_SEIZE)", errno.ESRCH, self.detail,
                              "the target exited while we were injecting into it") from None

    def _describe(self, tid: int) -> str:
        return f"pid={self.pid}, tid={tid}"

    def _seize(self, tid: int) -> bool:
        """Seize and interrupt `tid`; False if it has exited (or is a zombie) already."""
        detail = self._describe(tid)
        try:
            ptrace.seize(tid, 0, detail=detail)
        except KernelError as e:
            if self._exited(tid) or e.errno == errno.ESRCH:
                self.dead.add(tid)
                return False
            tracer = status_field(f"/proc/{self.pid}/task/{tid}/status", "TracerPid")
            raise KernelError(e.call, e.errno or errno.EPERM, detail,
                              f"cannot stop the target's thread {tid}"
                              + (f": it is traced by pid {tracer}" if tracer not in (None, "0")
                                 else "")) from None
        self.held.add(tid)
        try:
            ptrace.interrupt(tid, detail=detail)
        except KernelError as e:
            if e.errno != errno.ESRCH:
                raise
        return True

    def _exited(self, tid: int) -> bool:
        state = status_field(f"/proc/{self.pid}/task/{tid}/status", "State")
        return state is None or state.startswith(("Z", "X"))

    def _wait_stopped(self, tid: int, deadline: float, timeout: float) -> None:
        """Until `tid` rests at an event stop (our interrupt, or a group-stop), delivering any
        signal met first; forgotten if it exits; ETIMEDOUT past `deadline`."""
        while True:
            stop = _poll_stop(tid)
            if stop == _RUNNING:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KernelError("ptrace(PTRACE_INTERRUPT)", errno.ETIMEDOUT,
                                      self._describe(tid),
                                      f"the target's thread {tid} did not stop within "
                                      f"{timeout:g}s (uninterruptible sleep? a vfork parent?)")
                signal.sigtimedwait({signal.SIGCHLD}, left)
                continue
            if stop is None:
                self.held.discard(tid)
                self.dead.add(tid)
                return
            assert isinstance(stop, ptrace.Stop)
            if stop.event:
                threading.Thread(target=_reap, args=(tid,), name=f"uffdsnap-reap-{tid}",
                                 daemon=True).start()
                return
            try:  # a signal-delivery stop: deliver it as the kernel would have without us
                ptrace.cont(tid, stop.sig, detail=self._describe(tid))
            except KernelError as e:
                if e.errno != errno.ESRCH:
                    raise


def _poll_stop(tid: int) -> ptrace.Stop | str | None:
    """Tracee `tid`'s stop (left reportable), None if it exited, _RUNNING if neither yet."""
    try:
        info = os.waitid(os.P_PID, tid, os.WEXITED | os.WSTOPPED | os.WNOWAIT | os.WNOHANG
                         | ptrace.WALL)
    except ChildProcessError:
        return None
    if info is None:
        return _RUNNING
    if info.si_code != os.CLD_TRAPPED:
        return None
    status = info.si_status
    return ptrace.Stop(status & 0x7F, status >> 8, status & 0xFF == signal.SIGTRAP | 0x80)


def _reap(tid: int) -> None:
    """Wait for held thread `tid` (a tracee's stops are always reported to its tracer: its
    current one is taken first) until it exits, reaping it, or is no longer ours (ECHILD)."""
    while True:
        try:
            info = os.waitid(os.P_PID, tid, os.WEXITED | ptrace.WALL)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if info is None or info.si_code in (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED):
            return
