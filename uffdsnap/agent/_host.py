"""An agent host: one process that is the agent of many targets for one coordinator.

A coordinator that attaches starts one host and asks it, line by line on its stdin, to attach
targets (`attach PID MAJOR MINOR INODE`: the target and the object's identity); the host
injects into several at once (each injection in a thread of its own, its target stopped by a
tracer process started before the threads exist), registers the target's mappings of the
object before the target runs again, runs each target's agent in its own task, and answers on
stdout (`joined PID`, `failed PID REASON`, `ended PID REASON`). Starting an interpreter is paid
once per coordinator, not per target: attaching costs the injection and a handshake, a few
milliseconds.

Guarantees, as for one agent per process: each target's uffd is held by this process alone, so
the host's death (killed, crashed, or its coordinator gone: stdin at EOF) releases every target
it holds; one target's failure ends only that target's agent.
"""

from __future__ import annotations

import _thread
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import trio

from uffdsnap import testhooks
from uffdsnap.errors import UserError
from uffdsnap.native.libc import KernelError, set_process_name
from uffdsnap.procfs import ObjectId

log = logging.getLogger(__name__)

_T = TypeVar("_T")
HOST_NAME = "uffdsnap-agents"  # a forked host's process name (/proc/PID/comm)
# Injections at once. Each mostly waits for its target to be scheduled (a busy target on a
# crowded CPU waits its turn for each step it must run), so they overlap well beyond the CPU
# count; trio's default of 40 threads made 64 targets take two rounds of those waits.
INJECTIONS_AT_ONCE = 128


async def run_host(coordinator: str, test_hooks: testhooks.Hooks,
                   say: Callable[[str], None]) -> None:
    """Serve `attach PID` requests from stdin until it closes or a signal ends us; every
    target's agent then releases it."""
    # what attaching needs, imported (and the native core loaded) before the first request:
    # nothing heavy on the attach path
    from uffdsnap.inject import pick_thread, start_tracers
    from uffdsnap.native import core as snapcore

    snapcore.load()
    injections = trio.CapacityLimiter(INJECTIONS_AT_ONCE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_end_on_signal, nursery.cancel_scope)
        async for lines in _batches(trio.lowlevel.FdStream(sys.stdin.fileno())):
            requests = [_attach_request(line) for line in lines]
            # a tracer for each, started now, before their threads exist: it stops its target
            # at once (see inject._tracer); as many as can start injecting at once
            start_tracers([(r[0], pick_thread(r[0])) for r in requests if r is not None]
                          [:int(injections.available_tokens)])
            for line, request in zip(lines, requests, strict=True):
                if request is None:
                    say(f"error {line[:80]!r}: expected `attach PID [MAJOR MINOR INODE]`")
                    continue
                pid, obj = request
                nursery.start_soon(_serve_target, coordinator, pid, obj, test_hooks, say,
                                   injections)
        nursery.cancel_scope.cancel()  # the coordinator is done with us


def _attach_request(line: str) -> tuple[int, ObjectId | None] | None:
    """`attach PID [MAJOR MINOR INODE]` as (pid, the object's identity), or None."""
    words = line.split()
    if len(words) not in (2, 5) or words[0] != "attach" or not all(w.isdigit()
                                                                   for w in words[1:]):
        return None
    return int(words[1]), ObjectId(*map(int, words[2:])) if len(words) == 5 else None


def fork_host(coordinator: str, test_hooks: testhooks.Hooks) -> tuple[int, int, int, int]:
    """Start an agent host as a fork of this process: it has imported what it needs already, so
    it is ready in a millisecond instead of an interpreter's start-up. Call it before trio runs
    (a fork carries only the calling thread). Returns (pid, its stdin, stdout, stderr) as our
    ends of three pipes; the host serves until its stdin closes, as `uffdsnap agent --host`."""
    import uffdsnap.inject  # noqa: F401  (now, not in each child)

    pipes = [os.pipe() for _ in range(3)]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the host: nothing of ours returns from here
        code = 1
        try:
            for n, (r, w) in enumerate(pipes):
                os.dup2(r if n == 0 else w, n)
                os.close(r)
                os.close(w)
            set_process_name(HOST_NAME)  # (its command line is still the command's)
            trio.run(run_host, coordinator, test_hooks, _say)
            code = 0
        except BaseException as e:  # one line on stderr, as the CLI would
            print(f"uffdsnap: error: agent host: {_one_line(e)}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    for n, (r, w) in enumerate(pipes):
        os.close(r if n == 0 else w)
    return pid, pipes[0][1], pipes[1][0], pipes[2][0]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _serve_target(coordinator: str, pid: int, obj: ObjectId | None,
                        hooks: testhooks.Hooks, say: Callable[[str], None],
                        injections: trio.CapacityLimiter) -> None:
    """Inject, then run the target's agent. With the object's identity, the target's mappings
    of it are registered before it runs again (agent.register_stopped)."""
    from uffdsnap.agent import register_stopped, run_agent
    from uffdsnap.inject import create_uffd_in
    from uffdsnap.tracker import Tracker

    stopped: list[Tracker] = []  # what register_stopped registered

    def while_stopped(uffd: int) -> None:
        if obj is not None:
            stopped.append(register_stopped(uffd, pid, obj))

    t0 = time.monotonic()
    try:
        async with injections:
            uffd, route = await _in_new_thread(
                functools.partial(create_uffd_in, pid, while_stopped=while_stopped))
    except (UserError, KernelError, OSError) as e:
        say(f"failed {pid} {_one_line(e)}")
        return
    t1 = time.monotonic()

    def joined() -> None:
        log.debug("pid %d: uffd injected in %.1f ms (%s), joined %.1f ms later", pid,
                  (t1 - t0) * 1e3, route, (time.monotonic() - t1) * 1e3)
        say(f"joined {pid}")

    try:
        reason = await run_agent(coordinator, pid, uffd, "attach", on_joined=joined,
                                 test_hooks=hooks, handle_signals=False,
                                 stopped=stopped[0] if stopped else None)
    except Exception as e:  # contained: the other targets' agents go on
        log.error("agent for pid %d: %s", pid, _one_line(e),
                  exc_info=log.isEnabledFor(logging.DEBUG))
        reason = _one_line(e)
    say(f"ended {pid} {reason}")


async def _in_new_thread(fn: Callable[[], _T]) -> _T:
    """fn() in a thread of its own; its result or exception here. Not trio.to_thread: its
    threads are started one at a time, each start waiting until the new thread has run (and
    taken the interpreter lock), which on a busy machine spread 64 injections' starts over a
    quarter of a second while their targets waited, stopped. Not cancellable (an injection
    always ends by itself, within its timeouts, and must release its target)."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as e:  # (handed over, raised in the caller)
            result.append((False, e))
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass  # (we are exiting: nobody waits for it)

    _thread.start_new_thread(run, ())
    with trio.CancelScope(shield=True):
        await done.wait()
    ok, value = result[0]
    if not ok:
        raise value
    return value


async def _end_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _batches(stream: trio.abc.ReceiveStream) -> AsyncIterator[list[str]]:
    """The lines that each read completes (a coordinator's requests come in bursts)."""
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        *complete, buf = (buf + data).split(b"\n")
        if complete:
            yield [line.decode(errors="replace").strip() for line in complete]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
