"""Naming a forked child (agent/_children.find_child): what it inherited survives a process
that exits while it is being named."""

from __future__ import annotations

import os

import trio

from uffdsnap.agent import _children
from uffdsnap.procfs import Mapping, ObjectId
from uffdsnap.tracker import Tracker

OBJ = ObjectId(0, 1, 2)


class _Agent:
    """The part of an Agent that find_child uses."""

    def __init__(self, nursery: trio.Nursery, child: Tracker):
        self._nursery = nursery
        self.trackers = [child]
        self.object_id = OBJ
        self.reported: list[list[int | None]] = []

    def pids_tracked_here(self) -> set[int | None]:
        return {t.pid for t in self.trackers}

    async def _watch_exit(self, tracker: Tracker) -> None:
        pass

    async def _report_tracked(self, *_: object) -> None:
        self.reported.append([t.pid for t in self.trackers])


class _Child(Tracker):
    def address_space_alive(self) -> bool:
        return True  # (alive when named; it exits right after)


async def test_a_child_that_exits_as_it_is_named_keeps_what_it_inherited(monkeypatch) -> None:
    """A fork chain's member found in /proc, then gone before its maps are read (they read
    empty): its mappings stay those it inherited, so a fork of it that the agent handles next
    inherits them too, and that grandchild's faults can be placed (with none, the native core
    fails the first one, EFAULT, and the agent ends, taking the chain's tracking with it)."""
    inherited = [Mapping(0x7000_0000, 0x7020_0000, "rw-s", 0, OBJ, "/dev/shm/x")]
    uffd = os.open("/dev/null", os.O_RDONLY)  # (closed by the tracker's owner: us)
    child = _Child(uffd, None, OBJ, 4096, list(inherited), [(0x7000_0000, 0x7020_0000)], True)
    pid = os.getpid()  # a live process to name; its maps of OBJ read empty, as an exited one's
    monkeypatch.setattr(_children, "_new_child", lambda *_: pid)
    parent = Tracker(-1, pid, OBJ, 4096)
    try:
        async with trio.open_nursery() as nursery:
            agent = _Agent(nursery, child)
            await _children.find_child(agent, parent, child)  # type: ignore[arg-type]
        assert child.pid == pid and agent.reported == [[pid]]
        assert child.mappings == inherited
        grandchild = Tracker(-1, None, OBJ, 4096, list(child.mappings), list(child.registered))
        assert grandchild.offset_of(0x7000_1234) == 0x1000
    finally:
        if child.pidfd >= 0:
            os.close(child.pidfd)
        os.close(uffd)
