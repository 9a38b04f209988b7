"""An agent's per-process backlog handling (Agent.handle_backlog) keeps nothing of a process
it no longer tracks: a long-running agent following fork chains would otherwise grow."""

from __future__ import annotations

import os

from uffdsnap.agent._agent import Agent
from uffdsnap.procfs import ObjectId
from uffdsnap.tracker import Tracker

OBJ = ObjectId(0, 1, 2)


async def test_a_dropped_process_leaves_no_backlog_lock_behind() -> None:
    agent = Agent(os.getpid(), handle_signals=False)
    trackers = [Tracker(os.open("/dev/null", os.O_RDONLY), os.getpid(), OBJ, 4096)
                for _ in range(3)]
    for tracker in trackers:
        agent.add(tracker)
        await agent.handle_backlog(tracker)  # (an empty backlog: nothing to handle)
    assert len(agent._backlog_locks) == 3
    agent.drop(trackers[0])  # (closes its fd)
    agent.drop(trackers[2])
    assert list(agent._backlog_locks) == [trackers[1]]
    agent.drop(trackers[1])
    assert agent._backlog_locks == {}
