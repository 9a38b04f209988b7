"""`uffdsnap agent`: track processes for a coordinator: many, as the host a coordinator starts
for attaching (`--host`), one attached by injection (`--attach`), or one that enlists."""

from __future__ import annotations

import argparse
import os
import pwd
import socket
import sys

import trio

from uffdsnap import testhooks
from uffdsnap.agent import run_agent
from uffdsnap.cli import apply_nice
from uffdsnap.errors import UserError
from uffdsnap.native import scm


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", required=True, metavar="SOCK",
                        help="the coordinator's Unix socket")
    parser.add_argument("--coordinator-user", metavar="USER",
                        help="the user who runs the coordinator, if not root or this user: "
                             "whoever else listens at SOCK is refused before anything is sent")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--attach", type=int, metavar="PID",
                     help="inject userfaultfd() into unmodified process PID (ptrace)")
    how.add_argument("--host", action="store_true",
                     help="attach the processes named on stdin (`attach PID` lines), answering "
                          "on stdout; what a coordinator runs to attach")
    how.add_argument("--listen", metavar="PATH",
                     help="wait on Unix socket PATH for one workload to enlist (send its uffd)")
    how.add_argument("--enlist-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, default=0, metavar="N",
                        help="scheduling priority to run at (best effort: only root may raise "
                             "it; 0, the default, keeps the inherited one); a coordinator passes "
                             "its own to the host it starts")
    parser.add_argument(testhooks.HOOKS_OPTION, metavar="JSON", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    apply_nice(args)
    hooks = testhooks.parse(args.test_hooks)
    if args.host:
        from uffdsnap.agent._host import run_host

        trio.run(run_host, args.coordinator, hooks, _say)
        return 0
    if args.enlist_fd is not None:  # (first: the workload waits for our answer)
        sock = socket.socket(fileno=args.enlist_fd)
        with sock:
            try:
                trusted = user_id(args.coordinator_user)
            except UserError as e:
                _answer(sock, f"error: {e}")
                raise
            return _enlisted(args.coordinator, sock, hooks, trusted)
    trusted = user_id(args.coordinator_user)
    if args.attach is not None:
        return _attach(args.coordinator, args.attach, hooks, trusted)
    with _accept_one(args.listen) as sock:
        return _enlisted(args.coordinator, sock, hooks, trusted)


def user_id(name: str | None) -> int | None:
    """A user name or number, as a uid (one line if there is no such user)."""
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise UserError(f"--coordinator-user: no such user: {name}") from None


def _attach(coordinator: str, pid: int, hooks: testhooks.Hooks, trusted: int | None) -> int:
    from uffdsnap.inject import create_uffd_in

    if pid <= 0:
        raise UserError(f"--attach: {pid} is not a process id")
    uffd, _route = create_uffd_in(pid)
    reason = trio.run(lambda: run_agent(coordinator, pid, uffd, "attach", test_hooks=hooks,
                                        coordinator_uid=trusted))
    return _ended(reason)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _accept_one(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
    except OSError as e:
        raise UserError(f"--listen {path}: {e.strerror}") from None
    with listener:
        listener.listen(1)
        print(f"listening on {path}", flush=True)
        conn, _ = listener.accept()
    os.unlink(path)
    return conn


def _enlisted(coordinator: str, sock: socket.socket, hooks: testhooks.Hooks,
              trusted: int | None) -> int:
    """Receive the workload's uffd (one byte + SCM_RIGHTS), join, answer "ok" or "error: ..."."""
    try:
        _data, fds = scm.recv_fds(sock, 16)
        pid = scm.peer_pid(sock)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise UserError(f"expected exactly one userfaultfd from the workload, got {len(fds)}")
    except (OSError, ValueError) as e:
        _answer(sock, f"error: {e}")
        raise UserError(f"enlist handshake failed: {e}") from None
    except UserError as e:
        _answer(sock, f"error: {e}")
        raise
    try:
        reason = trio.run(lambda: run_agent(coordinator, pid, fds[0], "enlist",
                                            lambda: _answer(sock, "ok"), test_hooks=hooks,
                                            coordinator_uid=trusted))
    except BaseException as e:
        _answer(sock, f"error: {e}")
        raise
    return _ended(reason)


def _answer(sock: socket.socket, line: str) -> None:
    try:
        sock.sendall(line.encode() + b"\n")
    except OSError:
        pass  # the workload went away; the agent notices through its pidfd


def _ended(reason: str) -> int:
    if reason in ("process exited", "coordinator closed the connection", "done") or \
            reason.startswith(("signal", "coordinator aborted")):
        return 0
    sys.stderr.write(f"uffdsnap: error: {reason}\n")
    return 1
