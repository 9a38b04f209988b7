"""`uffdsnap snapshot`: one consistent snapshot of live shared memory into an image, or
streamed to a receiver (`--to`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import trio

from uffdsnap import testhooks
from uffdsnap.bench.config import parse_size
from uffdsnap.channel import PeerClosed, connect
from uffdsnap.cli import DEFAULT_NICE, apply_nice
from uffdsnap.cli.commands.agent import user_id
from uffdsnap.cli.output import emit
from uffdsnap.cli.summary import human_summary
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.image import check_replaceable, manifest_path, open_unnamed, publish_unnamed
from uffdsnap.native.core import FAULT_DEADLINE_MS
from uffdsnap.priority import URGENT_NICE
from uffdsnap.procfs import ObjectError, open_object, own_age_ns
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

FAULT_DEADLINE_S = FAULT_DEADLINE_MS / 1000  # (the coordinator's default)
FAULT_DEADLINE_MIN_S = 0.1
FAULT_DEADLINE_MAX_S = 3600.0  # (the native core's limit)


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shm", metavar="OBJECT",
                     help="a /dev/shm or hugetlbfs path, /proc/PID/fd/N or "
                          "/proc/PID/map_files/START-END: attach to every process that maps it")
    src.add_argument("--coordinator", metavar="SOCK",
                     help="ask the running coordinator at SOCK for a snapshot")
    parser.add_argument("--coordinator-user", metavar="USER",
                        help="with --coordinator: the user who runs it, if not root or this "
                             "user (whoever else listens at SOCK is refused before anything "
                             "is sent)")
    dest = parser.add_mutually_exclusive_group(required=True)
    dest.add_argument("-o", "--output", metavar="OUT.img", help="the image to publish")
    dest.add_argument("--to", metavar="ADDR",
                      help="stream the snapshot to a receiver (`uffdsnap receive`) at "
                           "tcp://HOST:PORT, HOST:PORT, unix:PATH, or - (standard output); "
                           "exit 0 once it has published the image (docs/stream-format.md)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT.img")
    parser.add_argument("--strict", action="store_true",
                        help="refuse (nothing published, writers released) when the "
                             "escape audit finds a process that could write to the object "
                             "untracked: one holding it open for writing without mapping it, "
                             "or one we cannot see that maps it (docs/tracking.md)")
    parser.add_argument("--incremental", action="store_true",
                        help="with --coordinator: a delta image of the pages any process wrote "
                             "since the previous image that coordinator published (its "
                             "manifest names that parent; restore/verify/info follow the "
                             "chain). The first request starts write tracking and is full; "
                             "whenever the coordinator cannot prove it saw every write, the "
                             "image is full and the summary says why")
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
    add_fault_deadline_argument(parser)
    add_mode_argument(parser)
    add_nice_argument(parser)
    add_test_hooks_argument(parser)


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise UserError("--timeout must be positive")
    check_fault_deadline(args)
    apply_nice(args)
    if args.coordinator_user is not None and args.shm:
        raise UserError("--coordinator-user applies to --coordinator")
    if args.incremental and args.shm:
        raise UserError("--incremental needs a long-running coordinator (`snapshot "
                        "--coordinator SOCK --incremental`): only it can track writes between "
                        "snapshots")
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
    elif args.strict:
        raise UserError("--strict is the coordinator's setting: pass it to `uffdsnap "
                        "coordinator`")
    elif args.fault_deadline is not None:
        raise UserError("--fault-deadline is the coordinator's setting: pass it to `uffdsnap "
                        "coordinator`")
    else:
        summary = trio.run(_remote, args.coordinator, output, args.force, stream,
                           args.incremental, user_id(args.coordinator_user))
    if progress:
        progress.done()
    summary["command_wall_ns"] = own_age_ns()  # (what the user waited, start-up included)
    if stream is None:
        summary["image"] = output
        emit(args.json, summary, _summary_text(summary))
        return 0
    text = _summary_text({**summary, "image": f"streamed to {stream.to}"}) + "\n" + \
        _stream_line(summary)
    if stream.to == "-":  # standard output was the stream
        sys.stderr.write((json.dumps(summary, sort_keys=True) if args.json else text) + "\n")
    else:
        emit(args.json, summary, text)
    return 0


def _summary_text(s: dict[str, Any]) -> str:
    """The human summary, then one line per escape the audit found and per thing it could
    not check (docs/tracking.md)."""
    return "\n".join([human_summary(s), *escape_lines(s)])


def escape_lines(s: dict[str, Any]) -> list[str]:
    """The escape audit's findings (`warning`) and notes, from a summary that is nested (ours)
    or flattened (a coordinator's answer)."""
    esc = s.get("escapes")
    if isinstance(esc, dict):
        findings, notes = esc.get("findings", []), esc.get("notes", [])
    else:
        findings = [x for x in str(s.get("escapes_findings_text", "")).split("\n") if x]
        notes = [x for x in str(s.get("escapes_notes_text", "")).split("\n") if x]
    return ([f"  warning      {line}" for line in findings]
            + [f"  audit        {line}" for line in notes])


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
                fault_deadline=fault_deadline(args), strict=args.strict,
                delegate=args.mode == "delegated", on_progress=progress, test_hooks=hooks,
                socket_path=socket_path, agent_host=agent_host))
    finally:
        obj.close()


async def _remote(path: str, output: str, overwrite: bool, stream: StreamOptions | None,
                  incremental: bool = False, trusted_uid: int | None = None) -> dict[str, Any]:
    """Ask the coordinator at `path`. An image goes into two unnamed files we create (with our
    rights) and pass along; once the coordinator says the snapshot is good, we name them."""
    files = open_unnamed(output) if stream is None else None
    try:
        summary = await _ask(path, output, overwrite, stream, incremental, trusted_uid, files)
        if files is not None:
            publish_unnamed(*files, output, overwrite)
        return summary
    finally:
        for fd in files or ():
            os.close(fd)


async def _ask(path: str, output: str, overwrite: bool, stream: StreamOptions | None,
               incremental: bool, trusted_uid: int | None,
               files: tuple[int, int] | None) -> dict[str, Any]:
    try:
        chan = await connect(path, Role.CLIENT, trusted_uid)
    except OSError as e:
        raise UserError(f"cannot reach coordinator at {path}: {e.strerror}") from None
    try:
        await chan.send(Hello(PROTOCOL_VERSION, Role.CLIENT.value, os.getpid()))
        welcome, _ = await chan.receive()
        if isinstance(welcome, Abort):
            raise SnapshotFailed(f"coordinator at {path}: {welcome.reason}")
        if not isinstance(welcome, Welcome):
            raise SnapshotFailed(f"coordinator at {path} answered {welcome.TYPE}")
        if files is not None:
            await chan.send(Snap(output, overwrite, incremental=incremental, files=True),
                            fds=list(files))
        else:  # the coordinator streams; the destination travels like -o does
            await chan.send(Snap("", False, stream.to, stream.compress, stream.max_rate,
                                 stream.staging, max(1, round(stream.stream_timeout * 1000)),
                                 incremental))
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


def add_fault_deadline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fault-deadline", type=float, metavar="S",
        help=f"the longest any writer may wait on the snapshot (default {FAULT_DEADLINE_S:g} "
             "s): a write fault unanswered, or held before T, this long, or an agent stopped "
             "this long, fails the snapshot and releases every writer (docs/overview.md)")


def check_fault_deadline(args: argparse.Namespace) -> None:
    if args.fault_deadline is not None and not (
            FAULT_DEADLINE_MIN_S <= args.fault_deadline <= FAULT_DEADLINE_MAX_S):
        raise UserError(f"--fault-deadline {args.fault_deadline:g}: between "
                        f"{FAULT_DEADLINE_MIN_S:g} and {FAULT_DEADLINE_MAX_S:g} seconds")


def fault_deadline(args: argparse.Namespace) -> float:
    return FAULT_DEADLINE_S if args.fault_deadline is None else float(args.fault_deadline)


def add_test_hooks_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(testhooks.HOOKS_OPTION, metavar="JSON", help=argparse.SUPPRESS)


def add_nice_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nice", type=int, default=DEFAULT_NICE, metavar="N",
        help=f"scheduling priority of this command and its agents while they run (default "
             f"{DEFAULT_NICE}, as root: the way to T and the copy compete with busy writers "
             "for the CPUs; 0 leaves it as inherited). The native core's fault thread runs at "
             f"-10 in any case, and from the request to T, while writers are held, the "
             f"coordinator and its agent host run at {URGENT_NICE}")


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
