"""A snapshot's verdict, once every agent has released: whose processes still live, which
writable mappers have no agent, and whether the policy finds the image consistent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uffdsnap.coordinator._peers import Peer
from uffdsnap.errors import SnapshotFailed
from uffdsnap.procfs import ScanUnstable, process_label

if TYPE_CHECKING:
    from uffdsnap.coordinator._run import Run


def final_facts(run: Run) -> tuple[dict[Peer, bool], list[str]]:
    """What the verdict needs from the world once everyone has released: whose processes
    still live, and which writable mappers (that existed when the copy ended) have no agent."""
    coord = run.coord
    alive = {p: p.any_alive() for p in run.policy.members}  # type: ignore[attr-defined]
    skip = coord.test_hooks.get("no_protect") or coord.test_hooks.get("ignore_late_mappers")
    try:
        untracked = [] if skip else [
            process_label(p) for p in coord.untracked_writers(run.policy.tracked_pids())
            if p in run.existed]
    except ScanUnstable as e:
        run.policy.fail(str(e))
        untracked = []
    return alive, untracked


def verdict(run: Run, alive: dict[Peer, bool], untracked: list[str]) -> None:
    """SnapshotFailed unless the run is proven one instant."""
    for peer, lives in alive.items():
        if not lives:  # exited during the snapshot, before its agent could say so
            run.policy.gone(peer, "process exited")
    if run.coord.test_hooks.get("no_protect"):
        for member in run.policy.members.values():
            member.reported, member.escapes = True, ()
    failure = run.policy.verdict(alive, untracked)  # type: ignore[arg-type]
    if failure:
        raise SnapshotFailed(failure)
