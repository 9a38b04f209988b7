"""`uffdsnap snapshot`: one consistent snapshot of live shared memory into an image."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import trio

from uffdsnap import testhooks
from uffdsnap.channel import PeerClosed, connect
from uffdsnap.cli.output import emit
from uffdsnap.cli.summary import human_summary
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.procfs import ObjectError, open_object
from uffdsnap.protocol import PROTOCOL_VERSION, Hello, ProtocolError, Result, Role, Snap, Welcome


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shm", metavar="OBJECT",
                     help="a /dev/shm or hugetlbfs path, /proc/PID/fd/N or "
                          "/proc/PID/map_files/START-END: attach to every process that maps it")
    src.add_argument("--coordinator", metavar="SOCK",
                     help="ask the running coordinator at SOCK for a snapshot")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.img")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT.img")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="limit for joining and protecting, in seconds (default 30)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mode_argument(parser)
    add_test_hooks_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not args.force:
        raise UserError(f"{args.output} exists (use --force to replace it)")
    if not os.path.isdir(os.path.dirname(output)):
        raise UserError(f"{os.path.dirname(output)}: no such directory")
    progress = _Progress() if sys.stderr.isatty() and not args.json and not args.no_progress \
        else None
    if args.shm:
        summary = _local(args.shm, output, args, progress)
    elif args.mode != "agents":
        raise UserError("--mode is the coordinator's setting: pass it to `uffdsnap coordinator`")
    else:
        summary = trio.run(_remote, args.coordinator, output, args.force)
    if progress:
        progress.done()
    summary["image"] = output
    emit(args.json, summary, human_summary(summary))
    return 0


def _local(spec: str, output: str, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from uffdsnap.hosted import attach_and_snapshot

    try:
        obj = open_object(spec)
    except ObjectError as e:
        raise UserError(str(e)) from None
    try:
        return trio.run(lambda: attach_and_snapshot(obj, output, overwrite=args.force,
                                                    protect_timeout=args.timeout,
                                                    delegate=args.mode == "delegated",
                                                    on_progress=progress,
                                                    test_hooks=testhooks.parse(args.test_hooks)))
    finally:
        obj.close()


async def _remote(path: str, output: str, overwrite: bool) -> dict[str, Any]:
    try:
        chan = await connect(path, Role.CLIENT)
    except OSError as e:
        raise UserError(f"cannot reach coordinator at {path}: {e.strerror}") from None
    try:
        await chan.send(Hello(PROTOCOL_VERSION, Role.CLIENT.value, os.getpid()))
        welcome, _ = await chan.receive()
        assert isinstance(welcome, Welcome)
        await chan.send(Snap(output, overwrite))
        result, _ = await chan.receive()
    except (PeerClosed, ProtocolError) as e:
        raise SnapshotFailed(f"coordinator at {path}: {e}") from None
    finally:
        chan.close()
    if not isinstance(result, Result):
        raise SnapshotFailed(f"coordinator answered {result.TYPE}")
    if not result.ok:
        raise SnapshotFailed(result.reason)
    return dict(result.summary)


def add_test_hooks_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(testhooks.HOOKS_OPTION, metavar="JSON", help=argparse.SUPPRESS)


def add_mode_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode", choices=("agents", "delegated"), default="agents",
        help="agents (default): agents read faults and un-protect on the coordinator's word; "
             "delegated: agents hand their uffds to the coordinator, which serves faults "
             "directly (faster; a uffd is a capability over its whole process, see "
             "docs/overview.md)")


class _Progress:
    """A one-line progress bar on stderr, redrawn at most every 1% of the object."""

    def __init__(self) -> None:
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = done * 100 // max(total, 1)
        if pct != self.last:
            self.last = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\rcopying [{bar:<25}] {pct:3d}%")
            sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\r" + " " * 40 + "\r")
        sys.stderr.flush()
