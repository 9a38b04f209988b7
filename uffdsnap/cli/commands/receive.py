"""`uffdsnap receive`: take a snapshot streamed from another host (docs/stream-format.md) and
publish the same image and manifest a local snapshot would, only once the stream is complete and
verified."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from uffdsnap.cli.output import emit, say
from uffdsnap.errors import UserError
from uffdsnap.stats import ns_text, size_text
from uffdsnap.stream import (
    IDLE_TIMEOUT_S,
    Output,
    ReceiveResult,
    StreamError,
    StreamHeader,
    open_input,
    parse_address,
    receive_stream,
    serve,
)

log = logging.getLogger("uffdsnap.receive")


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--listen", metavar="ADDR",
                     help="accept a stream on tcp://HOST:PORT, HOST:PORT ([V6ADDR]:PORT) or "
                          "unix:PATH; the sender gets a one-line answer")
    src.add_argument("-i", "--input", metavar="FILE",
                     help="read one stream from FILE, or from standard input with `-` "
                          "(e.g. over ssh; no answer goes back)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.img",
                        help="the image to publish (its manifest goes beside it); with "
                             "--keep-listening, the directory to publish streams in")
    parser.add_argument("--keep-listening", action="store_true",
                        help="serve stream after stream (one at a time) into the directory -o, "
                             "each named snapshot-<T>.img; a failed stream is discarded and "
                             "the next one served; stop with SIGTERM or SIGINT")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S, metavar="S",
                        help="give a stream up when nothing arrives for S seconds (default "
                             f"{IDLE_TIMEOUT_S:g})")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT.img (not with --keep-listening)")


def run(args: argparse.Namespace) -> int:
    if not (args.idle_timeout > 0 and math.isfinite(args.idle_timeout)):
        raise UserError("--idle-timeout must be a positive number of seconds")
    output = _output(args)
    if args.input is not None:
        if args.keep_listening:
            raise UserError("--keep-listening needs --listen (a file or pipe holds one stream)")
        work = partial(_receive_input, args, output)
    else:
        address = parse_address(args.listen, listen=True)
        if address.kind == "stdio":
            raise UserError("--listen - is not an address: use -i - to read standard input")
        work = partial(serve, address, output, keep_listening=args.keep_listening,
                       idle_timeout=args.idle_timeout,
                       on_listening=lambda shown: emit(args.json, {"listening": shown},
                                                       f"listening on {shown}"),
                       on_header=_on_header(args), on_result=_on_result(args))
    result, signum = trio.run(_stoppable, work)
    if result is not None:
        if not result.ok:
            raise StreamError(f"stream from {result.peer}: {result.error}")
        emit(args.json, result.to_dict(), _human(result))
        return 0
    if args.keep_listening:
        return 0  # stopped, as asked: every stream so far has been reported
    raise StreamError(f"stopped by {signal.Signals(signum).name}; nothing published")


def _output(args: argparse.Namespace) -> Output:
    """Refuse a bad -o before anyone sends us gigabytes."""
    path = os.path.abspath(args.output)
    if args.keep_listening:
        if args.force:
            raise UserError("--force is not for --keep-listening: streams never replace images")
        if not os.path.isdir(path):
            raise UserError(f"{args.output}: with --keep-listening, -o must be an existing "
                            "directory")
        return Output(path, directory=True)
    if not os.path.isdir(os.path.dirname(path)):
        raise UserError(f"{os.path.dirname(path)}: no such directory")
    if os.path.isdir(path):
        raise UserError(f"{args.output} is a directory; give the image a file name (or use "
                        "--keep-listening)")
    if os.path.lexists(path) and not args.force:
        raise UserError(f"{args.output} exists (use --force to replace it)")
    return Output(path, overwrite=args.force)


async def _receive_input(args: argparse.Namespace, output: Output) -> ReceiveResult:
    source, name = open_input(args.input)
    async with source:
        return await receive_stream(source, output, peer=name, idle_timeout=args.idle_timeout,
                                    on_header=_on_header(args))


async def _stoppable(work: Callable[[], Awaitable[ReceiveResult]]
                     ) -> tuple[ReceiveResult | None, int]:
    """Run `work` until it returns, or until SIGTERM, SIGINT or SIGHUP cancels it (the stream
    in progress is then discarded, a Unix socket's path removed). Returns (what it returned,
    or None; the signal, or 0)."""
    got: list[ReceiveResult] = []
    signum = 0

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal signum
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            task_status.started()
            async for received in sigs:
                signum = received
                nursery.cancel_scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        got.append(await work())
        nursery.cancel_scope.cancel()
    return (got[0] if got else None), signum


def _on_header(args: argparse.Namespace) -> Callable[[StreamHeader, str, str], None]:
    def on_header(header: StreamHeader, image: str, peer: str) -> None:
        if not args.json:
            say(f"receiving from {peer}: {size_text(header.size)} object "
                f"{header.object['source']} into {image}")
    return on_header


def _on_result(args: argparse.Namespace) -> Callable[[ReceiveResult], None]:
    def on_result(result: ReceiveResult) -> None:
        if not args.keep_listening:
            return  # the command reports it as it ends
        if args.json:
            emit(True, result.to_dict(), "")
        elif result.ok:
            say(_human(result))
        else:
            log.warning("stream from %s discarded: %s", result.peer, result.error)
    return on_result


def _human(r: ReceiveResult) -> str:
    return (f"received {r.image}: {size_text(r.object_size or 0)} object at {r.snapshot_time}, "
            f"{r.pages} pages ({size_text(r.data_bytes)}) and {r.holes} holes, "
            f"{size_text(r.wire_bytes)} on the wire in {ns_text(r.duration_ns)}; "
            f"manifest sha256 {r.manifest_sha256}")
