"""Attaching agents to processes that map the object and have none.

One agent host process per coordinator (`uffdsnap agent --host`, agent/_host.py), started when
first needed and kept for the coordinator's life: it is asked for targets line by line and
answers line by line; each target's agent then joins our socket like any other. An interpreter
starts once, not per target, so attaching costs an injection and a handshake. The host is a
separate process (never a thread of ours): its death, and only that, releases its targets, and
the coordinator kills it when one of its agents stops answering.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from uffdsnap import priority, testhooks
from uffdsnap.errors import SnapshotFailed
from uffdsnap.native.pidfd import pidfd_open
from uffdsnap.procfs import ObjectId, process_running

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Target:
    """A process we asked the host to attach to."""

    pid: int
    ended: trio.Event = field(default_factory=trio.Event)  # failed, or its agent ended
    reason: str = ""


class ForkedHost:
    """An agent host forked before trio started (agent._host.fork_host), seen through the part
    of trio.Process's interface the Attacher uses."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int):
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = trio.lowlevel.FdStream(stdin)
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)

    async def wait(self) -> int:
        if self.returncode is None:
            pidfd = pidfd_open(self.pid)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def agent_command(coordinator: str, *args: str) -> list[str]:
    # -P: never import a uffdsnap/ from the current directory (a source tree) instead of ours
    return [sys.executable, "-P", "-m", "uffdsnap", "agent", "--coordinator", coordinator,
            *args]


class Attacher:
    """The agent host of one coordinator and the targets it was asked for."""

    def __init__(self, coordinator_path: str, object_id: ObjectId,
                 test_hooks: testhooks.Hooks | None = None, forked: ForkedHost | None = None):
        self.coordinator_path = coordinator_path
        # (the host registers a target's mappings of it before the target runs again)
        self.object_id = object_id
        self.test_hooks = test_hooks  # passed on to the host's agents (tests only)
        self.targets: dict[int, Target] = {}
        self.host: trio.Process | ForkedHost | None = None
        self._forked = forked  # a host started already, ours to use first
        self._host_gone = trio.Event()
        self._last_error = ""
        self._killed = False  # (kill_host: once per host)

    @property
    def host_pid(self) -> int | None:
        return self.host.pid if self.host is not None else None

    async def start(self, pids: list[int], nursery: trio.Nursery) -> list[Target]:
        """Ask for an agent for each pid that has none coming; return the new targets."""
        new = [Target(pid) for pid in pids
               if pid not in self.targets or self.targets[pid].ended.is_set()]
        if not new:
            return []
        host = await self._ensure_host(nursery)
        for target in new:
            self.targets[target.pid] = target
        assert host.stdin is not None
        try:
            o = self.object_id
            await host.stdin.send_all("".join(f"attach {t.pid} {o.major} {o.minor} {o.inode}\n"
                                              for t in new).encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            for target in new:
                self._end(target, f"the agent host is gone ({e})")
        return new

    async def wait_joined(self, targets: list[Target], joined: Callable[[], set[int]],
                          changed: Callable[[], trio.Event], timeout: float) -> None:
        """Until each target has joined or exited; SnapshotFailed if attaching failed while
        the target lives, or the wait outlasts `timeout`."""
        with trio.move_on_after(timeout):
            while True:
                have = joined()
                waiting = []
                for target in targets:
                    if target.pid in have:
                        continue
                    if target.ended.is_set():
                        if process_running(target.pid):
                            raise SnapshotFailed(f"cannot attach to pid {target.pid}: "
                                                 f"{target.reason}")
                        continue  # it exited before we got to it
                    waiting.append(target)
                if not waiting:
                    return
                await _first_of([changed()] + [t.ended for t in waiting])
        raise SnapshotFailed(f"agents for pids {[t.pid for t in targets]} did not join "
                             f"within {timeout:g} s")

    def kill_host(self, why: str) -> None:
        """One of the host's agents stopped answering: kill the host, which releases every
        target it holds (they are attached anew next time)."""
        if self.host is not None and self.host.returncode is None and not self._killed:
            log.warning("killing the agent host (pid %d): %s", self.host.pid, why)
            self._killed = True
            self.host.kill()

    async def aclose(self) -> None:
        """We are done: the host sees its stdin close, lets every target go and exits (nobody
        waits for it: it needs nothing from us)."""
        if self.host is not None and self.host.stdin is not None:
            await self.host.stdin.aclose()
        if self._forked is not None:  # never needed
            await self._forked.stdin.aclose()

    async def _ensure_host(self, nursery: trio.Nursery) -> trio.Process | ForkedHost:
        if self.host is not None and not self._host_gone.is_set():
            return self.host
        self._host_gone = trio.Event()
        self._killed = False
        if self._forked is not None:
            self.host, self._forked = self._forked, None
        else:
            self.host = await trio.lowlevel.open_process(
                agent_command(self.coordinator_path, "--host", *_our_priority(),
                              *testhooks.argv(self.test_hooks),
                              *(["-v"] if logging.getLogger("uffdsnap").isEnabledFor(
                                  logging.DEBUG) else [])),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        nursery.start_soon(self._read_answers, self.host, self._host_gone)
        nursery.start_soon(self._read_errors, self.host)
        return self.host

    async def _read_answers(self, host: trio.Process | ForkedHost, gone: trio.Event) -> None:
        assert host.stdout is not None
        try:
            async for line in _lines(host.stdout):
                word, _, rest = line.partition(" ")
                pid_text, _, reason = rest.partition(" ")
                target = self.targets.get(int(pid_text)) if pid_text.isdigit() else None
                if word in ("failed", "ended") and target is not None:
                    self._end(target, reason or word)
            await host.wait()  # (its stdout closed: it is exiting)
        finally:  # exited, or we are shutting down (then nobody waits for it: it needs nothing)
            gone.set()
            for target in list(self.targets.values()):
                self._end(target, self._last_error or "the agent host exited "
                          f"(status {host.returncode})")

    async def _read_errors(self, host: trio.Process | ForkedHost) -> None:
        assert host.stderr is not None
        async for line in _lines(host.stderr):
            self._last_error = line.removeprefix("uffdsnap: ").removeprefix("error: ")
            log.warning("[agent host %d] %s", host.pid, line)

    def _end(self, target: Target, reason: str) -> None:
        if not target.ended.is_set():
            target.reason = reason
            target.ended.set()
        if self.targets.get(target.pid) is target:
            del self.targets[target.pid]


def _our_priority() -> list[str]:
    """`--nice N` for a host started as a program: it runs at the priority of the thread that
    runs the coordinator, as a forked host does (`uffdsnap snapshot --nice`: "this command and
    its agents"). Not inherited: trio starts programs from a worker thread, and Linux keeps a
    priority per thread."""
    nice = priority.normal()  # (not the urgency of the way to T, which we start it on)
    return [f"--nice={nice}"] if nice else []


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buf = b""
    while data := await stream.receive_some(4096):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace").rstrip()


async def _first_of(events: list[trio.Event]) -> None:
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()
        for event in events:
            nursery.start_soon(wait, event)
