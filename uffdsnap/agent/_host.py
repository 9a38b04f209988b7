"""An agent host: one process that is the agent of many targets for one coordinator.

A coordinator that attaches starts one host and asks it, line by line on its stdin, to attach
targets (`attach PID`); the host injects into several at once (each injection in a thread of
its own), runs each target's agent in its own task, and answers on stdout (`joined PID`,
`failed PID REASON`, `ended PID REASON`). Starting an interpreter is paid once per coordinator,
not per target: attaching costs the injection and a handshake, a few milliseconds.

Guarantees, as for one agent per process: each target's uffd is held by this process alone, so
the host's death (killed, crashed, or its coordinator gone: stdin at EOF) releases every target
it holds; one target's failure ends only that target's agent.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable

import trio

from uffdsnap import testhooks
from uffdsnap.errors import UserError
from uffdsnap.native.libc import KernelError

log = logging.getLogger(__name__)


async def run_host(coordinator: str, test_hooks: testhooks.Hooks,
                   say: Callable[[str], None]) -> None:
    """Serve `attach PID` requests from stdin until it closes or a signal ends us; every
    target's agent then releases it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_end_on_signal, nursery.cancel_scope)
        async for line in _lines(trio.lowlevel.FdStream(sys.stdin.fileno())):
            words = line.split()
            if len(words) == 2 and words[0] == "attach" and words[1].isdigit():
                nursery.start_soon(_serve_target, coordinator, int(words[1]), test_hooks, say)
            else:
                say(f"error {line[:80]!r}: expected `attach PID`")
        nursery.cancel_scope.cancel()  # the coordinator is done with us


async def _serve_target(coordinator: str, pid: int, hooks: testhooks.Hooks,
                        say: Callable[[str], None]) -> None:
    from uffdsnap.agent import run_agent
    from uffdsnap.inject import create_uffd_in

    try:
        uffd, _route = await trio.to_thread.run_sync(create_uffd_in, pid)
    except (UserError, KernelError, OSError) as e:
        say(f"failed {pid} {_one_line(e)}")
        return
    try:
        reason = await run_agent(coordinator, pid, uffd, "attach",
                                 on_joined=lambda: say(f"joined {pid}"), test_hooks=hooks,
                                 handle_signals=False)
    except Exception as e:  # contained: the other targets' agents go on
        log.error("agent for pid %d: %s", pid, _one_line(e),
                  exc_info=log.isEnabledFor(logging.DEBUG))
        reason = _one_line(e)
    say(f"ended {pid} {reason}")


async def _end_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buf = b""
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace").strip()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
