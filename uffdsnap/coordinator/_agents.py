"""What an agent's messages do to the coordinator: the running snapshot's events (faults,
protected, released, lent uffds and fault channels, children, removals) and, between snapshots,
write tracking's record (_tracking.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from uffdsnap.channel import PeerClosed
from uffdsnap.coordinator._native import check_lent_fd
from uffdsnap.coordinator._peers import Peer
from uffdsnap.coordinator._trust import PidView
from uffdsnap.protocol import (
    Abort,
    Delegate,
    Fault,
    FaultChannel,
    Gone,
    Protected,
    Released,
    Removed,
    Tracked,
    Written,
)

if TYPE_CHECKING:
    from uffdsnap.coordinator._run import Run
    from uffdsnap.coordinator._server import Coordinator

log = logging.getLogger(__name__)


async def agent_messages(coord: Coordinator, peer: Peer, view: PidView) -> None:
    """An agent's messages until it leaves; pids it names are translated into ours."""
    while True:
        msg, fds = await peer.chan.receive()
        run = coord.run
        if isinstance(msg, Fault):
            if run is not None:
                run.fault(peer, msg)
            else:  # stale, or (tracking writes) from an agent that kept nothing: recorded
                _written(coord, None, ((msg.offset, coord.page_size),))
                coord.wake(peer, msg.offset)
        elif isinstance(msg, Protected):
            peer.mappings, peer.protect_ns = msg.mappings, msg.protect_ns
            if run is not None:
                if run.tracked is not None:
                    run.tracked.agent_gaps[peer] = msg.gap
                run.protected(peer, msg.snapshot)
        elif isinstance(msg, Released):
            peer.release_stats = msg
            if run is not None:
                run.released(peer)
            peer.released.set()
        elif isinstance(msg, Delegate | FaultChannel):
            named = (dataclasses.replace(msg, pid=view.ours(msg.pid) or 0)
                     if isinstance(msg, Delegate) and msg.pid else msg)
            _lend(coord, peer, named, fds[0])
        elif isinstance(msg, Tracked):
            pids = view.translate(msg.pids)
            log.debug("agent for pid %d tracks %s", peer.pid, list(pids))
            peer.pids = set(pids)
            if run is not None:
                run.policy.tracked(peer, pids)
                run.changed_now()
            coord.changed()
        elif isinstance(msg, Removed):
            if run is not None:
                run.removed(list(msg.ranges))
            else:  # content changed (to zeros) between snapshots
                _written(coord, None, msg.ranges)
        elif isinstance(msg, Written):
            _written(coord, run, msg.ranges)
        elif isinstance(msg, Gone):
            if run is not None:
                run.gone(peer, msg.reason)
            return
        elif isinstance(msg, Abort):
            raise PeerClosed(f"agent aborted: {msg.reason}")

def _written(coord: Coordinator, run: Run | None, ranges: tuple[tuple[int, int], ...]) -> None:
    """Write tracking: pages written between snapshots (an agent un-protected them itself).
    An agent says so before it protects, so before a running snapshot's T: then they are
    that snapshot's; otherwise (no snapshot, or after its T) the next one's."""
    if not coord.tracking.active or coord.test_hooks.get("untracked_writes"):
        return  # (the hook: wrong on purpose)
    if run is not None and run.written_before_t(ranges):
        return
    for offset, length in ranges:
        coord.tracking.record(offset, length)

def _lend(coord: Coordinator, peer: Peer, msg: Delegate | FaultChannel, fd: int) -> None:
    """A uffd (delegated mode) or a fault channel (agents mode) for the running snapshot's
    native core; with no snapshot running (or another one), nothing to serve: closed."""
    check_lent_fd(msg, fd)  # the right kind of fd, or the connection ends
    run = coord.run
    if run is None or (isinstance(msg, FaultChannel) and msg.snapshot != run.id):
        os.close(fd)
        return
    if isinstance(msg, Delegate):
        run.link.take_delegate(peer, msg, fd)
    else:
        run.link.take_channel(peer, fd)
