"""`uffdsnap coordinator`: a long-lived coordinator for one object; enlisting workloads join it
and `uffdsnap snapshot --coordinator SOCK` asks it for snapshots, as many as wanted."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import signal
import socket
import stat

import trio

from uffdsnap import testhooks
from uffdsnap.cli import apply_nice
from uffdsnap.cli.commands.snapshot import (
    add_fault_deadline_argument,
    add_mode_argument,
    add_nice_argument,
    add_test_hooks_argument,
    check_fault_deadline,
    fault_deadline,
)
from uffdsnap.cli.output import say
from uffdsnap.coordinator._server import MAX_CONNECTIONS
from uffdsnap.errors import UserError
from uffdsnap.hosted import ForkedHostFds, fork_agent_host, hosted
from uffdsnap.procfs import ObjectError, SharedObject, open_object

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shm", required=True, metavar="OBJECT",
                        help="the shared-memory object (see `uffdsnap snapshot --help`)")
    parser.add_argument("--listen", required=True, metavar="SOCK",
                        help="Unix socket path for agents and clients")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="limit for the protect phase of each snapshot (default 30)")
    parser.add_argument("--socket-group", metavar="GROUP",
                        help="open the socket to GROUP too (mode 0660), so that its workloads "
                             "can enlist; each agent may speak only for processes of its own "
                             "user (docs/enlisting.md)")
    parser.add_argument("--clients-group", metavar="GROUP",
                        help="besides this user and root, members of GROUP may ask for "
                             "snapshots")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                        help="agents and clients served at once (default %(default)s); past "
                             "it, peers other than root and this user are refused with the "
                             "reason")
    add_fault_deadline_argument(parser)
    add_mode_argument(parser)
    add_nice_argument(parser)
    parser.add_argument("--strict", action="store_true",
                        help="refuse every snapshot whose escape audit (at T) finds a "
                             "process that could write to the object untracked "
                             "(docs/tracking.md)")
    parser.add_argument("--attach", action="store_true",
                        help="at each snapshot, attach an agent (ptrace) to every process that "
                             "maps the object writable and has not enlisted")
    add_test_hooks_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_connections < 1:
        raise UserError(f"--max-connections {args.max_connections}: at least 1")
    check_fault_deadline(args)
    apply_nice(args)
    try:
        obj = open_object(args.shm)
    except ObjectError as e:
        raise UserError(str(e)) from None
    path = os.path.abspath(args.listen)
    _clear_stale_socket(path, args.listen)
    hooks = testhooks.parse(args.test_hooks)
    socket_group, clients_gid = _group(args.socket_group), _group(args.clients_group)
    try:
        # attaching: the agent host is forked now, so the first request does not wait for an
        # interpreter to start
        host = fork_agent_host(path, hooks) if args.attach else None
        trio.run(lambda: _serve(obj, path, args, hooks, host, socket_group, clients_gid))
    finally:
        obj.close()
        if os.path.exists(path):
            os.unlink(path)
    return 0


def _group(name: str | None) -> int | None:
    """A group name or number, as a gid (one line if there is no such group)."""
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise UserError(f"no such group: {name}") from None


def _clear_stale_socket(path: str, name: str) -> None:
    """A socket left by a coordinator that died (nobody accepts on it) is removed; a live one,
    or anything that is not a socket, is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(f"{name} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a dead coordinator's
        os.unlink(path)
        log.warning("removed the stale socket %s (its coordinator is gone)", name)
        return
    except OSError as e:
        raise UserError(f"{name}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise UserError(f"{name}: another coordinator is listening there")


async def _serve(obj: SharedObject, path: str, args: argparse.Namespace,
                 hooks: testhooks.Hooks, host: ForkedHostFds | None, socket_group: int | None,
                 clients_gid: int | None) -> None:
    """Serve until SIGTERM or SIGINT; leaving closes every connection, which releases every
    agent."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with hosted(obj, socket_path=path, attach=args.attach,
                          protect_timeout=args.timeout, delegate=args.mode == "delegated",
                          test_hooks=hooks, agent_host=host, socket_group=socket_group,
                          clients_gid=clients_gid, max_connections=args.max_connections,
                          fault_deadline=fault_deadline(args), strict=args.strict):
            say(f"coordinator listening on {path}")
            async for _ in signals:
                break
