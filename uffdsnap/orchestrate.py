"""`uffdsnap snapshot --shm OBJECT`: find every process that maps OBJECT, attach an agent to
each (a separate `uffdsnap agent --attach PID` process), and take one snapshot with an
in-process coordinator."""

from __future__ import annotations

import os
import socket as stdsocket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from uffdsnap.coordinator import Coordinator
from uffdsnap.errors import SnapshotFailed
from uffdsnap.kernel.pidfd import pidfd_open, process_alive
from uffdsnap.kernel.procmaps import SharedObject, find_mappers

AGENT_EXIT_TIMEOUT_S = 10.0


@dataclass
class AgentProcess:
    target: int
    process: trio.Process
    stderr: list[str] = field(default_factory=list)
    exited: trio.Event = field(default_factory=trio.Event)


def writable_mappers(obj: SharedObject) -> dict[int, int]:
    """{pid: number of writable shared mappings} of every process but us that can write obj."""
    return {pid: sum(m.writable for m in maps)
            for pid, maps in find_mappers(obj.object_id, exclude={os.getpid()}).items()
            if any(m.writable for m in maps)}


async def listen(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM | stdsocket.SOCK_CLOEXEC)
    await sock.bind(path)
    sock.listen(128)
    os.chmod(path, 0o600)
    return sock


def agent_command(coordinator: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "uffdsnap", "agent", "--coordinator", coordinator, *args]


async def _run_agent_process(agent: AgentProcess) -> None:
    assert agent.process.stderr is not None
    try:
        async for chunk in agent.process.stderr:
            agent.stderr.extend(chunk.decode(errors="replace").splitlines())
        await agent.process.wait()
    finally:
        agent.exited.set()


async def attach_and_snapshot(obj: SharedObject, output: str, *, overwrite: bool = False,
                              timeout: float = 30.0,
                              on_progress: Callable[[int, int], None] | None = None,
                              test_hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Attach to every writable mapper of `obj` and take one snapshot into `output`."""
    with tempfile.TemporaryDirectory(prefix="uffdsnap-") as tmp:
        path = os.path.join(tmp, "coordinator.sock")
        listener = await listen(path)
        coordinator = Coordinator(obj, protect_timeout=timeout, on_progress=on_progress,
                                  test_hooks=test_hooks)
        agents: list[AgentProcess] = []
        async with trio.open_nursery() as agent_watchers:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(coordinator.serve, listener)
                    for pid in writable_mappers(obj):
                        proc = await trio.lowlevel.open_process(
                            agent_command(path, "--attach", str(pid)),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
                        agent = AgentProcess(pid, proc)
                        agents.append(agent)
                        agent_watchers.start_soon(_run_agent_process, agent)
                    await _wait_joined(coordinator, agents, timeout)
                    summary = await coordinator.snapshot(output, overwrite=overwrite)
                    nursery.cancel_scope.cancel()  # closes every connection: agents release
            finally:
                listener.close()
                await _reap(agents)
    summary["agents"] = len(agents)
    return summary


async def _wait_joined(coordinator: Coordinator, agents: list[AgentProcess],
                       timeout: float) -> None:
    """Until every agent has joined or its target has gone; fail if one cannot attach."""
    with trio.move_on_after(timeout):
        while True:
            joined = {p.pid for p in coordinator.peers}
            waiting = []
            for agent in agents:
                if agent.target in joined:
                    continue
                if agent.exited.is_set():
                    if _alive(agent.target):
                        code = agent.process.returncode
                        why = agent.stderr[-1] if agent.stderr else f"agent exit status {code}"
                        raise SnapshotFailed(f"cannot attach to pid {agent.target}: "
                                             f"{why.removeprefix('uffdsnap: error: ')}")
                    continue  # the target exited before we got to it: nothing to track
                waiting.append(agent)
            if not waiting:
                return
            async with trio.open_nursery() as nursery:
                async def wake(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(wake, coordinator.peers_changed)
                for agent in waiting:
                    nursery.start_soon(wake, agent.exited)
    raise SnapshotFailed(f"agents did not join within {timeout:g} s")


def _alive(pid: int) -> bool:
    try:
        fd = pidfd_open(pid)
    except OSError:
        return False
    try:
        return process_alive(fd)
    finally:
        os.close(fd)


async def _reap(agents: list[AgentProcess]) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(AGENT_EXIT_TIMEOUT_S):
            for agent in agents:
                await agent.exited.wait()
        for agent in agents:
            if agent.process.returncode is None:
                agent.process.kill()  # its uffd closes with it: the target is released
                await agent.process.wait()
