"""The tracer process: every ptrace request of one session runs in a process of its own.

ptrace binds a tracee to the attaching *thread*, so one process, forked from ours per session,
makes every request, and callers wait on it with a timeout: if the target cannot be stopped in
time (e.g. uninterruptible sleep) the caller gets ETIMEDOUT at once, and the tracer finishes the
restore and detach whenever the target does stop. Why a process and not a thread, and how it
keeps the target safe when we die: see TracerProcess. Requests and replies are pickled, one
seqpacket message each, fds beside them with SCM_RIGHTS.

A tracer can be started before its session (`start_tracers`): it seizes and stops its target at
once, and the session's `attach` finds that done. An agent host asked to attach many targets
at once starts their tracers one after another from its event loop, before their injection
threads exist. Forked from each of those threads instead, on a busy machine, the forks (each
holding the interpreter lock for milliseconds while the kernel copies a process of many threads)
came one after another anyway, and each target was interrupted only once its thread and its
tracer had run: stopping a busy target means waiting for it to be scheduled, so the sooner each
is interrupted the sooner all have stopped (docs/benchmarks.md).
"""

from __future__ import annotations

import errno
import gc
import os
import pickle
import select
import signal
import socket
import threading
from collections.abc import Callable
from typing import NoReturn

from uffdsnap.inject._lend import give_fd
from uffdsnap.inject._session import Session
from uffdsnap.native import sched, scm
from uffdsnap.native.libc import KernelError

_MAX_MESSAGE = 1 << 16  # a pickled request or reply (a seqpacket message fits one buffer)
_TRACER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# What a caller may ask of the tracer's Session, by name, and which of those return an fd of the
# tracer's (handed over with SCM_RIGHTS, then closed there).
_REQUESTS: dict[str, Callable[..., object]] = {
    "attach": Session.attach, "run": Session.run, "syscall_fd": Session.syscall_fd,
    "close_fd": Session.close_fd, "take_fd": Session.take_fd, "give_fd": give_fd,
    "map_scratch": Session.map_scratch, "unmap_scratch": Session.unmap_scratch,
    "read": Session.read, "write": Session.write, "release": Session.release,
    "stop_others": Session.stop_others, "resume_others": Session.resume_others,
}
_FD_RESULTS = frozenset({"take_fd"})
# Tracers started before anyone asked (start_tracers), by target pid: (tid, tracer pid, our end).
_STARTED: dict[int, tuple[int, int, socket.socket]] = {}
# A started tracer that nobody claims within this time releases its target and exits.
UNCLAIMED_S = 10.0


def start_tracers(targets: list[tuple[int, int]]) -> None:
    """Fork a tracer for each (pid, tid) now, and have it seize and stop that thread at once;
    the next session on it (`injected`) takes it, its `attach` already done or under way. See
    the module's docstring. Best effort: a target left out gets a tracer when its session
    starts."""
    for pid, tid in targets:
        if pid in _STARTED:
            continue
        try:
            child, sock = _fork_tracer(pid, tid, early=True)
        except OSError:
            return  # (out of processes: sessions fork their own, and say why if they cannot)
        _STARTED[pid] = (tid, child, sock)


def _fork_tracer(pid: int, tid: int, early: bool) -> tuple[int, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        child = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if child == 0:
        _tracer_main(theirs, pid, tid, early)  # never returns
    theirs.close()
    return child, ours


def _tracer_for(pid: int, tid: int) -> tuple[int, socket.socket]:
    """The tracer started for this thread if there is one (and it still serves), else a new
    one."""
    started = _STARTED.pop(pid, None)  # (atomic: sessions run in many threads)
    if started is not None:
        started_tid, child, sock = started
        reaped = _reaped(child)
        if started_tid == tid and not reaped:
            return child, sock
        sock.close()  # (another thread now: it lets go of that one and exits)
        if not reaped:
            _reap_later(child)
    return _fork_tracer(pid, tid, early=False)


def _reaped(child: int) -> bool:
    """Whether the tracer has exited (it is reaped here if so)."""
    try:
        return os.waitpid(child, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


class TracerProcess:
    """Runs every ptrace request of one session in a process of its own, forked from ours.

    ptrace ties a tracee to the thread that attached, so all requests come from one place. That
    place is not a thread of ours because it would die with us: if we were SIGKILLed
    mid-injection the kernel would detach the target with our registers in place (it runs on from
    the vdso `syscall` we borrowed and crashes) and keep any fd we made in it. The tracer outlives
    us: when its socket reads EOF (we are done, gave up waiting, or died) it releases the target
    as `Session.release` does, and exits. It runs in a session of its own, deaf to terminal and
    termination signals, so what kills us (^C to our process group, SIGTERM, SIGKILL) does not
    kill it mid-call. It also lets a caller stop waiting (timeout) while the tracer finishes the
    restore and detach once the target stops.
    """

    def __init__(self, pid: int, tid: int, detail: str):
        try:
            child, ours = _tracer_for(pid, tid)
        except OSError as e:
            raise KernelError("fork", e.errno or errno.EAGAIN, detail,
                              "could not start a tracer process") from None
        self._child = child
        self._sock: socket.socket | None = ours
        self._busy = False  # a request is out and its reply has not come back
        self._hung_up = ""

    def call(self, request: str, args: tuple[object, ...], timeout: float, what: str,
             detail: str, fds: tuple[int, ...] = ()) -> object:
        """Have the tracer run Session.`request`(*args, *copies of `fds`); its result, or its
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
            _reap_later(self._child)
        else:
            _reap(self._child)


def _reap_later(pid: int) -> None:
    """Reap a tracer whenever it is done (a target that will not stop keeps it busy)."""
    threading.Thread(target=_reap, args=(pid,), name="uffdsnap-tracer-reaper",
                     daemon=True).start()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # someone else reaped it (e.g. SIGCHLD ignored)


def _tracer_main(sock: socket.socket, pid: int, tid: int, early: bool) -> NoReturn:
    """The tracer process: serve requests until EOF, then release the target and exit. Started
    `early`, it seizes and stops the target before the first request, which then finds that
    done: its answer, or the attach's failure; if none comes within UNCLAIMED_S, it lets go."""
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
        sched.short_slice()  # (we wait for the target, then run a moment: see Tracee.attach)
        session = Session(pid, tid)
        try:
            attached = _handle(session, _ATTACH, []) if early else None
            if attached is None or select.select([sock], [], [], UNCLAIMED_S)[0]:
                _serve(sock, session, attached)  # (else unclaimed: released, and we exit)
        finally:
            session.release()
        code = 0
    finally:
        os._exit(code)


_Reply = tuple[tuple[str, object], list[int]]  # (kind, value), and our fds to hand over
_ATTACH = pickle.dumps(("attach", ()))


def _serve(sock: socket.socket, session: Session, attached: _Reply | None) -> None:
    """One reply per request, in order; an error is a reply too, so the caller never waits in
    vain. Returns at EOF. `attached`: the reply of an attach made before it was asked for, the
    reply to the first request if that is `attach`."""
    while True:
        try:
            data, fds = scm.recv_fds(sock, _MAX_MESSAGE, 1)
        except (OSError, ValueError):
            return
        if not data:
            return  # the caller is done, gave up, or died
        reply, out = _handle(session, data, fds, attached)
        attached = None  # (the first request's alone)
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


def _handle(session: Session, data: bytes, fds: list[int],
            attached: _Reply | None = None) -> _Reply:
    """Run one request (closing the fds that came with it): its reply, or `attached` for an
    `attach`."""
    out: list[int] = []
    try:
        request, args = pickle.loads(data)
        if request == "attach" and attached is not None:
            return attached
        if request not in _REQUESTS:
            raise ValueError(f"unknown tracer request {request!r}")
        value = _REQUESTS[request](session, *args, *fds)
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
    return reply, out
