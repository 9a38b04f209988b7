"""`uffdsnap coordinator`: a long-lived coordinator for one object; enlisting workloads join it
and `uffdsnap snapshot --coordinator SOCK` asks it for snapshots, as many as wanted."""

from __future__ import annotations

import argparse
import os
import signal

import trio

from uffdsnap import testhooks
from uffdsnap.cli.commands.snapshot import (
    add_mode_argument,
    add_nice_argument,
    add_test_hooks_argument,
    apply_nice,
)
from uffdsnap.cli.output import say
from uffdsnap.errors import UserError
from uffdsnap.hosted import ForkedHostFds, fork_agent_host, hosted
from uffdsnap.procfs import ObjectError, SharedObject, open_object


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shm", required=True, metavar="OBJECT",
                        help="the shared-memory object (see `uffdsnap snapshot --help`)")
    parser.add_argument("--listen", required=True, metavar="SOCK",
                        help="Unix socket path for agents and clients")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="limit for the protect phase of each snapshot (default 30)")
    add_mode_argument(parser)
    add_nice_argument(parser)
    parser.add_argument("--attach", action="store_true",
                        help="at each snapshot, attach an agent (ptrace) to every process that "
                             "maps the object writable and has not enlisted")
    add_test_hooks_argument(parser)


def run(args: argparse.Namespace) -> int:
    apply_nice(args)
    try:
        obj = open_object(args.shm)
    except ObjectError as e:
        raise UserError(str(e)) from None
    path = os.path.abspath(args.listen)
    if os.path.exists(path):
        raise UserError(f"{args.listen} exists (another coordinator, or a stale socket?)")
    hooks = testhooks.parse(args.test_hooks)
    try:
        # attaching: the agent host is forked now, so the first request does not wait for an
        # interpreter to start
        host = fork_agent_host(path, hooks) if args.attach else None
        trio.run(lambda: _serve(obj, path, args, hooks, host))
    finally:
        obj.close()
        if os.path.exists(path):
            os.unlink(path)
    return 0


async def _serve(obj: SharedObject, path: str, args: argparse.Namespace,
                 hooks: testhooks.Hooks, host: ForkedHostFds | None) -> None:
    """Serve until SIGTERM or SIGINT; leaving closes every connection, which releases every
    agent."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with hosted(obj, socket_path=path, attach=args.attach,
                          protect_timeout=args.timeout, delegate=args.mode == "delegated",
                          test_hooks=hooks, agent_host=host):
            say(f"coordinator listening on {path}")
            async for _ in signals:
                break
