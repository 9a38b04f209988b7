"""Starting and reaping `uffdsnap agent --attach PID` processes for a coordinator.

Each agent is a separate process (never a thread of ours: it must be able to die alone, and its
death is what releases its target). The coordinator asks for agents for the untracked writable
mappers it finds, waits until each has joined or its target has gone, and reaps them afterwards.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from uffdsnap import testhooks
from uffdsnap.errors import SnapshotFailed
from uffdsnap.procfs import process_running

log = logging.getLogger(__name__)

AGENT_EXIT_TIMEOUT_S = 10.0


@dataclass
class AgentProcess:
    target: int
    process: trio.Process
    stderr: list[str] = field(default_factory=list)
    exited: trio.Event = field(default_factory=trio.Event)


def agent_command(coordinator: str, *args: str) -> list[str]:
    # -P: never import a uffdsnap/ from the current directory (a source tree) instead of ours
    return [sys.executable, "-P", "-m", "uffdsnap", "agent", "--coordinator", coordinator,
            *args]


class Attacher:
    """The attach agents one coordinator has started, by target pid."""

    def __init__(self, coordinator_path: str, test_hooks: testhooks.Hooks | None = None):
        self.coordinator_path = coordinator_path
        self.agents: dict[int, AgentProcess] = {}
        self.test_hooks = test_hooks  # passed on to every agent (tests only)

    async def start(self, pids: list[int], nursery: trio.Nursery) -> list[AgentProcess]:
        """Start an agent for each pid that has none running; return the new ones."""
        started = []
        for pid in pids:
            old = self.agents.get(pid)
            if old is not None and not old.exited.is_set():
                continue
            proc = await trio.lowlevel.open_process(
                agent_command(self.coordinator_path, "--attach", str(pid),
                              *testhooks.argv(self.test_hooks)),
                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            agent = AgentProcess(pid, proc)
            self.agents[pid] = agent
            nursery.start_soon(_watch, agent)
            started.append(agent)
        return started

    async def wait_joined(self, agents: list[AgentProcess], joined: Callable[[], set[int]],
                          changed: Callable[[], trio.Event], timeout: float) -> None:
        """Until each agent's target has joined or exited; SnapshotFailed if an agent died
        while its target lives, or the wait outlasts `timeout`."""
        with trio.move_on_after(timeout):
            while True:
                waiting = []
                have = joined()
                for agent in agents:
                    if agent.target in have:
                        continue
                    if agent.exited.is_set():
                        if process_running(agent.target):
                            raise SnapshotFailed(f"cannot attach to pid {agent.target}: "
                                                 f"{_why(agent)}")
                        continue  # the target exited before we got to it
                    waiting.append(agent)
                if not waiting:
                    return
                await _first_of([changed()] + [a.exited for a in waiting])
        raise SnapshotFailed(f"agents for pids {[a.target for a in agents]} did not join "
                             f"within {timeout:g} s")

    async def reap(self) -> None:
        """Wait (bounded) for every agent to exit; kill the ones that do not."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(AGENT_EXIT_TIMEOUT_S):
                for agent in self.agents.values():
                    await agent.exited.wait()
            for agent in self.agents.values():
                if agent.process.returncode is None:
                    agent.process.kill()  # its uffd closes with it: the target is released
                    await agent.process.wait()
        self.agents.clear()


def _why(agent: AgentProcess) -> str:
    if agent.stderr:
        return agent.stderr[-1].removeprefix("uffdsnap: error: ")
    return f"agent exit status {agent.process.returncode}"


async def _watch(agent: AgentProcess) -> None:
    assert agent.process.stderr is not None
    try:
        async for chunk in agent.process.stderr:
            lines = chunk.decode(errors="replace").splitlines()
            agent.stderr.extend(lines)
            for line in lines:  # an agent writes only when something is wrong: pass it on
                log.warning("[agent for pid %d] %s", agent.target, line)
        with trio.CancelScope(shield=True):
            await agent.process.wait()
    finally:
        agent.exited.set()


async def _first_of(events: list[trio.Event]) -> None:
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()
        for event in events:
            nursery.start_soon(wait, event)
