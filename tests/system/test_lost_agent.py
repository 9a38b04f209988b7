"""An agent whose connection ends mid-snapshot matters if anything it tracks may still write:
its own process, the children it named, and (delegated mode) any process whose uffd it lent
us, named or not. Its reports of named children may lag (a fork chain's newest member), so
the coordinator also asks the lent uffds (Peer.any_alive)."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
from collections.abc import Iterator

import pytest

from uffdsnap.coordinator._peers import Peer
from uffdsnap.native import uffd
from uffdsnap.procfs import ObjectId
from uffdsnap.tracker import Tracker

PAGE = mmap.PAGESIZE
WP_FEATURES = uffd.FEATURES["PAGEFAULT_FLAG_WP"] | uffd.FEATURES["WP_HUGETLBFS_SHMEM"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="userfaultfd() needs root here")


@pytest.fixture
def exited_peer() -> Iterator[Peer]:
    """A peer whose own process has exited and that named no child: counted gone so far."""
    proc = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(proc.pid)
    assert proc.wait(timeout=20) == 0
    peer = Peer(chan=None, pid=proc.pid, comm="true", mode="delegated",  # type: ignore[arg-type]
                pidfd=pidfd, outbox=None)  # type: ignore[arg-type]
    try:
        yield peer
    finally:
        os.close(pidfd)


def lent_uffd(registered: bool) -> tuple[Tracker, mmap.mmap]:
    """A uffd of this (live) process, its shared mapping of a memfd registered or not, as a
    delegated uffd of an unnamed fork child."""
    fd = os.memfd_create("lost-agent")
    os.ftruncate(fd, 4 * PAGE)
    area = mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED)
    os.close(fd)
    ufd, _ = uffd.create_uffd()
    uffd.api(ufd, WP_FEATURES)
    view = ctypes.c_char.from_buffer(area)
    start = ctypes.addressof(view)
    del view  # (an exported buffer would keep the mapping from closing)
    if registered:
        uffd.register(ufd, start, 4 * PAGE, uffd.REGISTER_MODE_WP)
    ranges = [(start, start + 4 * PAGE)] if registered else []
    return Tracker(ufd, None, ObjectId(0, 0, 0), PAGE, registered=ranges), area


@needs_root
def test_an_unnamed_child_whose_uffd_was_lent_keeps_its_lost_agent_alive(exited_peer) -> None:
    assert not exited_peer.any_alive()  # control: by its pids alone, it is gone
    tracker, area = lent_uffd(registered=True)
    try:
        exited_peer.delegated.append(tracker)
        assert exited_peer.any_alive()  # the uffd's address space lives: not gone
    finally:
        tracker.close()
        area.close()


@needs_root
def test_a_lent_uffd_with_nothing_registered_protects_nothing(exited_peer) -> None:
    tracker, area = lent_uffd(registered=False)
    try:
        exited_peer.delegated.append(tracker)
        assert not exited_peer.any_alive()
    finally:
        tracker.close()
        area.close()
