"""`uffdsnap snapshot`: one consistent snapshot of live shared memory into an image, or
streamed to a receiver (`--to`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any

import trio

from uffdsnap import testhooks
from uffdsnap.bench.config import parse_size
from uffdsnap.channel import PeerClosed, connect
from uffdsnap.cli import DEFAULT_NICE
from uffdsnap.cli.output import emit
from uffdsnap.cli.summary import human_summary
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.image import check_replaceable, manifest_path
from uffdsnap.procfs import ObjectError, open_object
from uffdsnap.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Hello,
    ProtocolError,
    Result,
    Role,
    Snap,
    Welcome,
)
from uffdsnap.stats import size_text
from uffdsnap.stream import STREAM_TIMEOUT_S, StreamOptions, take_stdout


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shm", metavar="OBJECT",
                     help="a /dev/shm or hugetlbfs path, /proc/PID/fd/N or "
                          "/proc/PID/map_files/START-END: attach to every process that maps it")
    src.add_argument("--coordinator", metavar="SOCK",
                     help="ask the running coordinator at SOCK for a snapshot")
    dest = parser.add_mutually_exclusive_group(required=True)
    dest.add_argument("-o", "--output", metavar="OUT.img", help="the image to publish")
    dest.add_argument("--to", metavar="ADDR",
                      help="stream the snapshot to a receiver (`uffdsnap receive`) at "
                           "tcp://HOST:PORT, HOST:PORT, unix:PATH, or - (standard output); "
                           "exit 0 once it has published the image (docs/stream-format.md)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT.img")
    stream = parser.add_argument_group("streaming (with --to)")
    stream.add_argument("--compress", action="store_true",
                        help="compress pages with zstd (each record sent raw if that is smaller)")
    stream.add_argument("--max-rate", metavar="RATE",
                        help="at most RATE bytes per second on the wire (K, M, G: KiB, MiB, "
                             "GiB), e.g. 10M")
    stream.add_argument("--staging", metavar="SIZE",
                        help="how many bytes of pages writers faulted on may wait to be sent "
                             "(a local unnamed file in TMPDIR); past it the snapshot fails. "
                             "Default: min(object size, max(64M, 1/8 of the object))")
    stream.add_argument("--stream-timeout", type=float, metavar="S",
                        help=f"fail when the link stalls for S seconds (default "
                             f"{STREAM_TIMEOUT_S:g})")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="limit for joining and protecting, in seconds (default 30)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mode_argument(parser)
    add_nice_argument(parser)
    add_test_hooks_argument(parser)


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise UserError("--timeout must be positive")
    apply_nice(args)
    stream = _stream_options(args)
    output = ""
    if stream is None:
        output = os.path.abspath(args.output)
        if os.path.lexists(output) and not args.force:
            raise UserError(f"{args.output} exists (use --force to replace it)")
        for path in (output, manifest_path(output)):  # (before a snapshot, not after it)
            check_replaceable(path)
        if not os.path.isdir(os.path.dirname(output)):
            raise UserError(f"{os.path.dirname(output)}: no such directory")
    progress = _Progress() if sys.stderr.isatty() and not args.json and not args.no_progress \
        else None
    if args.shm:
        summary = _local(args.shm, output, args, progress, stream)
    elif args.mode != "agents":
        raise UserError("--mode is the coordinator's setting: pass it to `uffdsnap coordinator`")
    else:
        summary = trio.run(_remote, args.coordinator, output, args.force, stream)
    if progress:
        progress.done()
    if stream is None:
        summary["image"] = output
        emit(args.json, summary, human_summary(summary))
        return 0
    text = human_summary({**summary, "image": f"streamed to {stream.to}"}) + "\n" + \
        _stream_line(summary)
    if stream.to == "-":  # standard output was the stream
        sys.stderr.write((json.dumps(summary, sort_keys=True) if args.json else text) + "\n")
    else:
        emit(args.json, summary, text)
    return 0


def _stream_options(args: argparse.Namespace) -> StreamOptions | None:
    """--to and the options that go with it (one line and exit 2 for anything wrong)."""
    given = [name for name, value in (("--compress", args.compress),
                                      ("--max-rate", args.max_rate),
                                      ("--staging", args.staging),
                                      ("--stream-timeout", args.stream_timeout))
             if value not in (None, False)]
    if args.to is None:
        if given:
            raise UserError(f"{given[0]} applies to a stream: use it with --to")
        return None
    if args.force:
        raise UserError("--force applies to -o (a receiver never replaces an image)")
    to = args.to
    if to.startswith("unix:") and len(to) > 5:  # the coordinator may run elsewhere
        to = "unix:" + os.path.abspath(to[5:])
    timeout = STREAM_TIMEOUT_S if args.stream_timeout is None else args.stream_timeout
    options = StreamOptions(to, bool(args.compress), _size(args.max_rate, "--max-rate"),
                            _size(args.staging, "--staging"), timeout)
    if options.check(remote=args.coordinator is not None).kind == "stdio":
        if os.isatty(1):
            raise UserError("--to -: standard output is a terminal; pipe it into `uffdsnap "
                            "receive -i -` (e.g. through ssh)")
        # now, before any helper process is forked: the stream is ours alone
        options = dataclasses.replace(options, fd=take_stdout())
    return options


def _size(text: str | None, option: str) -> int:
    if text is None:
        return 0
    try:
        return parse_size(text)
    except ValueError as e:
        raise UserError(f"{option}: {e}") from None


def _stream_line(s: dict[str, Any]) -> str:
    """The stream's part of the summary, nested (local) or flattened (from a coordinator)."""
    st = s.get("stream") or {k.removeprefix("stream_"): v for k, v in s.items()
                             if k.startswith("stream_")}
    seconds = max(float(st.get("seconds", 0)), 1e-9)
    sha = st.get("manifest_sha256", "")
    end = f"published, manifest sha256 {sha[:16]}..." if sha else "written to the pipe"
    return (f"  stream       {size_text(st.get('data_bytes', 0))} of pages as "
            f"{size_text(st.get('wire_bytes', 0))} on the wire in {seconds:.2f} s "
            f"({size_text(st.get('wire_bytes', 0) / seconds)}/s); {end}")


def _local(spec: str, output: str, args: argparse.Namespace, progress: Any,
           stream: StreamOptions | None) -> dict[str, Any]:
    from uffdsnap.hosted import attach_and_snapshot, forked_agent_host

    try:
        obj = open_object(spec)
    except ObjectError as e:
        raise UserError(str(e)) from None
    hooks = testhooks.parse(args.test_hooks)
    try:
        # the agent host first: forked before trio starts, it is ready when the first process
        # is found (no interpreter to start on the way to T)
        with forked_agent_host(hooks) as (socket_path, agent_host):
            return trio.run(lambda: attach_and_snapshot(
                obj, output, overwrite=args.force, stream=stream, protect_timeout=args.timeout,
                delegate=args.mode == "delegated", on_progress=progress, test_hooks=hooks,
                socket_path=socket_path, agent_host=agent_host))
    finally:
        obj.close()


async def _remote(path: str, output: str, overwrite: bool,
                  stream: StreamOptions | None) -> dict[str, Any]:
    try:
        chan = await connect(path, Role.CLIENT)
    except OSError as e:
        raise UserError(f"cannot reach coordinator at {path}: {e.strerror}") from None
    try:
        await chan.send(Hello(PROTOCOL_VERSION, Role.CLIENT.value, os.getpid()))
        welcome, _ = await chan.receive()
        if isinstance(welcome, Abort):
            raise SnapshotFailed(f"coordinator at {path}: {welcome.reason}")
        if not isinstance(welcome, Welcome):
            raise SnapshotFailed(f"coordinator at {path} answered {welcome.TYPE}")
        if stream is None:
            await chan.send(Snap(output, overwrite))
        else:  # the coordinator streams; the destination travels like -o does
            await chan.send(Snap("", False, stream.to, stream.compress, stream.max_rate,
                                 stream.staging, max(1, round(stream.stream_timeout * 1000))))
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


def add_nice_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nice", type=int, default=DEFAULT_NICE, metavar="N",
        help=f"scheduling priority of this command and its agents while they run (default "
             f"{DEFAULT_NICE}, as root: the way to T and the copy compete with busy writers "
             "for the CPUs; 0 leaves it as inherited). The native core's fault thread runs at "
             "-10 in any case")


def apply_nice(args: argparse.Namespace) -> None:
    """Raise (or set) our priority, best effort: threads and processes we start inherit it.
    Only root may raise it; others keep theirs, silently."""
    if args.nice == 0:
        return
    if not -20 <= args.nice <= 19:
        raise UserError(f"--nice {args.nice}: between -20 and 19")
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)


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
