"""Negative controls: every shape of tracking the product claims, run as a twin pair. The positive
test runs a scenario with real writers and asserts the snapshot is one instant (or, where no
instant can be proven, that it is refused); its control runs the same scenario with the product
broken on purpose by a test hook (uffdsnap/testhooks.py) and asserts that the same checks catch it.

Each scenario is made deterministic by events, not by luck: the coordinator or an agent is held
at a point of the snapshot (a test hook) while the writers are shown, through /proc and their
own counters, to be blocked or to have moved on by whole passes over their pages. A control's
detection rate per snapshot is measured by tests/system/measure_controls.py and recorded in
docs/testing.md.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import make_workload, needs_root, running_coordinator, start_writers, stop_writers
from procutil import Lifecycle, await_until, blocked_on_fault, progressed
from uffdsnap import workload as wl
from uffdsnap.errors import SnapshotFailed

pytestmark = needs_root
D = 256  # data pages per writer: "moved on by a whole pass" is 2*D steps
PASS = 2 * D
MODES = ["agents", "delegated"]


@dataclass
class Outcome:
    """What one snapshot gave: published (with the checker's verdict on the image) or refused."""

    published: bool
    error: str = ""
    check: wl.CheckResult | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    extra_problems: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why a test expecting one consistent instant fails on this outcome (none: it passes)."""
        if not self.published:
            return [f"snapshot refused: {self.error}"]
        assert self.check is not None
        found = [] if self.check.ok else [self.check.summary()]
        return found + self.extra_problems


async def snapshot(coordinator, out: str) -> Outcome:
    try:
        summary = await coordinator.snapshot(out)
    except SnapshotFailed as e:
        return Outcome(False, str(e))
    return Outcome(True, check=wl.check_file(out), summary=summary)


def judge(outcome: Outcome, bug: str | None) -> None:
    """The twin assertion: the positive test passes; under the bug, the positive test's own
    checks fail (the control is caught)."""
    problems = outcome.problems()
    if bug is None:
        assert not problems, problems
    else:
        assert problems, f"the bug {bug!r} went unnoticed: the snapshot looked like one instant"


def moved_on(path: str, indexes: list[int], steps: int = PASS) -> Callable[[], bool]:
    """A condition: each writer in `indexes` is `steps` beyond where it is now."""
    base = wl.read_live_seqs(path)
    return lambda: all(wl.read_live_seqs(path)[i] >= base[i] + steps for i in indexes)


def at(phase: str, fn: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """Coordinator test hook: run `fn` (our code) when the snapshot enters `phase`."""
    return {"at_phase": {phase: fn}}


def read_fifo_line(path: Path, timeout: float = 30.0) -> str:
    """One line a hooked agent writes to the FIFO at `path` (bounded)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, f"nothing on {path} within {timeout:g} s"
            data += os.read(fd, 4096)
        return data.decode()
    finally:
        os.close(fd)


# ---- 1. hold until T ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bug", [None, "serve_before_t"])
async def test_hold_until_t(bug: str | None, mode: str, shm_path: str, tmp_path: Path) -> None:
    """One process's protect is held (test hook); the others are protected and fault. Until the
    last process is protected (T) their faults must be held: the test shows them blocked in the
    kernel (wchan handle_userfault, counters frozen) while the unprotected writer runs whole
    passes over its pages. Control: serving each process once its own agent has protected lets
    them run on before T, which the unprotected writer sees and the checker catches."""
    make_workload(shm_path, 3, D)
    writers = start_writers(shm_path, native=3)
    fast, slow = writers[:2], writers[2]
    fifo = tmp_path / "hold.fifo"
    os.mkfifo(fifo)
    hooks: dict[str, Any] = {"agent": {"hold_protect": {"pid": slow.pid, "fifo": str(fifo)}}}
    if bug:
        hooks[bug] = True
    out = str(tmp_path / "x.img")
    try:
        async with running_coordinator(shm_path, tmp_path, hooks=hooks,
                                       delegate=mode == "delegated") as (coordinator, _):
            result: list[Outcome] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _append(result, snapshot(coordinator, out)))
                line = await trio.to_thread.run_sync(read_fifo_line, fifo)
                held_agent = int(line.split("agent=")[1].split()[0])
                if bug is None:
                    await await_until(lambda: all(blocked_on_fault(w.pid) for w in fast),
                                      "the protected writers to block on a fault")
                    frozen = wl.read_live_seqs(shm_path)
                    await await_until(progressed(shm_path, 2, frozen[2], PASS),
                                      "the unprotected writer to run a whole pass")
                    now = wl.read_live_seqs(shm_path)
                    assert now[:2] == frozen[:2], "a protected writer ran on before T"
                    assert all(blocked_on_fault(w.pid) for w in fast)
                else:
                    await await_until(moved_on(shm_path, [0, 1]),
                                      "the served writers to run on before T")
                    await await_until(moved_on(shm_path, [2]), "the slow writer to see them")
                os.kill(held_agent, signal.SIGUSR1)
        judge(result[0], bug)
    finally:
        stop_writers(shm_path, writers)


async def _append(into: list[Outcome], outcome: Awaitable[Outcome]) -> None:
    into.append(await outcome)


# ---- 2. partial tracking --------------------------------------------------------------------


@pytest.mark.parametrize("bug", [None, "one mapping unprotected", "one process unprotected"])
async def test_partial_tracking(bug: str | None, shm_path: str, tmp_path: Path) -> None:
    """A writer that maps the object twice (alternating steps between the mappings) and two
    plain ones; during the copy (held by a hook) every writer runs whole passes. Controls: one
    mapping, or one whole process, registered but left unprotected."""
    make_workload(shm_path, 3, D)
    writers = start_writers(shm_path, native=1, map_twice=True)
    writers += start_writers(shm_path, native=2, first_index=1)
    agent_hooks: dict[str, Any] = {}
    if bug == "one mapping unprotected":
        agent_hooks["skip_protect"] = {"pid": writers[0].pid, "which": "last"}
    elif bug == "one process unprotected":
        agent_hooks["skip_protect"] = {"pid": writers[1].pid, "which": "all"}

    async def during_copy() -> None:
        await await_until(moved_on(shm_path, [0, 1, 2]), "every writer to run a whole pass")

    try:
        async with running_coordinator(shm_path, tmp_path, hooks={
                "agent": agent_hooks, **at("copying", during_copy)}) as (coordinator, _):
            outcome = await snapshot(coordinator, str(tmp_path / "x.img"))
        judge(outcome, bug)
    finally:
        stop_writers(shm_path, writers)


# ---- 3. fork ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bug", [None, "drop_forks"])
async def test_fork_child_is_tracked(bug: str | None, mode: str, shm_path: str,
                                     tmp_path: Path) -> None:
    """A tracked writer forks during the copy; its child becomes another writer and runs whole
    passes. It must be tracked from birth. Control: the agent loses the child's uffd (yet
    reports it tracked)."""
    make_workload(shm_path, 3, D)
    forker = Lifecycle(shm_path, 0, child_index=2)
    plain = start_writers(shm_path, native=1, first_index=1)

    async def during_copy() -> None:
        await trio.to_thread.run_sync(forker.fork)
        await await_until(moved_on(shm_path, [0, 1, 2]), "parent, child and the other writer")

    hooks: dict[str, Any] = {"agent": {bug: True} if bug else {}, **at("copying", during_copy)}
    try:
        async with running_coordinator(shm_path, tmp_path, hooks=hooks,
                                       delegate=mode == "delegated") as (coordinator, _):
            outcome = await snapshot(coordinator, str(tmp_path / "x.img"))
        judge(outcome, bug)
    finally:
        forker.stop(shm_path)
        stop_writers(shm_path, plain)


# ---- 4. mremap, munmap, and mappings that grow or appear ------------------------------------


@pytest.mark.parametrize("bug", [None, "ignore_remap"])
async def test_mremap_move_is_followed(bug: str | None, shm_path: str, tmp_path: Path) -> None:
    """A writer moves its mapping during the copy and runs whole passes through the new one:
    the agent must follow the move. Control: the agent ignores the move (its address table
    goes stale)."""
    make_workload(shm_path, 2, D)
    mover = Lifecycle(shm_path, 0)
    plain = start_writers(shm_path, native=1, first_index=1)

    async def during_copy() -> None:
        await trio.to_thread.run_sync(mover.remap)
        await await_until(moved_on(shm_path, [0, 1]), "both writers to run a whole pass")

    hooks: dict[str, Any] = {"agent": {bug: True} if bug else {}, **at("copying", during_copy)}
    try:
        async with running_coordinator(shm_path, tmp_path, hooks=hooks) as (coordinator, _):
            outcome = await snapshot(coordinator, str(tmp_path / "x.img"))
        judge(outcome, bug)
    finally:
        mover.stop(shm_path)
        stop_writers(shm_path, plain)


EXTRA_PAGES = 4  # object pages past the workload: the "grow" modes take them in and write them


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how,bug", [("grow-in-place", None), ("grow-in-place", "no_escape_audit"),
                                     ("grow", None), ("replace", None),
                                     ("replace", "no_escape_audit"), ("exec", None),
                                     ("exec", "no_escape_audit")])
async def test_new_unprotected_mappings_refuse_the_snapshot(how: str, bug: str | None, mode: str,
                                                            shm_path: str,
                                                            tmp_path: Path) -> None:
    """A tracked process (mapping the object, not yet writing) gets a mapping of the object that
    was never protected, during the copy, and from then on writes through it alone: an mremap
    that grows the mapping in place (the kernel raises no event) or moves and grows it (writes
    may land in the new part before the agent protects it), munmap+mmap, or exec of a program
    that maps the object again. Writes through it are invisible, so the snapshot is refused
    (each agent audits its mappings before releasing). Controls: without the audit the image is
    published, and is not the state at T."""
    layout = make_workload(shm_path, 2, D)
    os.truncate(shm_path, layout.size + EXTRA_PAGES * layout.page_size)
    writer = Lifecycle(shm_path, 0, supervisor=True, on_usr2=how)
    plain = start_writers(shm_path, native=1, first_index=1)

    async def during_copy() -> None:
        await trio.to_thread.run_sync(writer.remap)
        await await_until(moved_on(shm_path, [0, 1]), "both writers to run a whole pass")

    hooks: dict[str, Any] = {"agent": {bug: True} if bug else {}, **at("copying", during_copy)}
    out = str(tmp_path / "x.img")
    try:
        async with running_coordinator(shm_path, tmp_path, hooks=hooks,
                                       delegate=mode == "delegated") as (coordinator, _):
            outcome = await snapshot(coordinator, out)
        if outcome.published:  # the pages past the workload held zeros at T
            with open(out, "rb") as f:
                f.seek(layout.size)
                if f.read().strip(b"\0"):
                    outcome.extra_problems.append("pages written after T are in the image")
        if bug is None:
            assert not outcome.published, "published though writes escaped tracking"
            assert "escaped tracking" in outcome.error or "untracked" in outcome.error, \
                outcome.error
        else:
            judge(outcome, bug)
    finally:
        writer.stop(shm_path)
        stop_writers(shm_path, plain)


@pytest.mark.parametrize("mode", MODES)
async def test_munmap_is_followed(mode: str, shm_path: str, tmp_path: Path) -> None:
    """A tracked process unmaps the object during the copy: the agent follows (unmap event), the
    release covers what is left, and the image is one instant."""
    make_workload(shm_path, 2, D)
    leaver = Lifecycle(shm_path, 0, on_usr2="unmap")
    plain = start_writers(shm_path, native=1, first_index=1)

    async def during_copy() -> None:
        await trio.to_thread.run_sync(leaver.remap)
        await await_until(moved_on(shm_path, [1]), "the other writer to run a whole pass")

    try:
        async with running_coordinator(shm_path, tmp_path, hooks=at("copying", during_copy),
                                       delegate=mode == "delegated") as (coordinator, _):
            outcome = await snapshot(coordinator, str(tmp_path / "x.img"))
        judge(outcome, None)
        assert leaver.pid in [p["pid"] for p in outcome.summary["processes"]]
    finally:
        leaver.stop(shm_path)
        stop_writers(shm_path, plain)


# ---- 5. late mappers ------------------------------------------------------------------------


@pytest.mark.parametrize("bug", [None, "ignore_late_mappers"])
async def test_late_mapper_is_attached_before_t(bug: str | None, shm_path: str,
                                               tmp_path: Path) -> None:
    """A process starts mapping and writing while the others are being protected; during the
    copy every writer runs whole passes. The coordinator must attach and protect it before T.
    Control: it is ignored (neither attached nor refused)."""
    make_workload(shm_path, 3, D)
    writers = start_writers(shm_path, native=2)
    late: list[wl.WriterProcess] = []

    async def while_protecting() -> None:
        late.extend(await trio.to_thread.run_sync(
            lambda: start_writers(shm_path, native=1, first_index=2)))
        await await_until(moved_on(shm_path, [2]), "the newcomer to run a whole pass")

    async def during_copy() -> None:
        await await_until(moved_on(shm_path, [0, 1, 2]), "every writer to run a whole pass")

    hooks: dict[str, Any] = {"at_phase": {"protecting": while_protecting,
                                          "copying": during_copy}}
    if bug:
        hooks[bug] = True
    try:
        async with running_coordinator(shm_path, tmp_path, hooks=hooks) as (coordinator, _):
            outcome = await snapshot(coordinator, str(tmp_path / "x.img"))
        judge(outcome, bug)
        if bug is None:
            assert late[0].pid in [p["pid"] for p in outcome.summary["processes"]]
    finally:
        stop_writers(shm_path, writers + late)


# ---- 6. save before un-protect --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bug", [None, "unprotect_before_save"])
async def test_page_saved_before_its_writer_resumes(bug: str | None, mode: str, shm_path: str,
                                                    tmp_path: Path) -> None:
    """Every faulting page must be saved before its writer is woken. During the copy (held)
    three writers run whole passes, every first write a fault. Control: the writer is woken
    first and gets a moment to write before the page is read."""
    make_workload(shm_path, 3, D)
    writers = start_writers(shm_path, native=3)

    async def during_copy() -> None:
        await await_until(moved_on(shm_path, [0, 1, 2]), "every writer to run a whole pass")

    hooks: dict[str, Any] = at("copying", during_copy)
    if bug:
        hooks[bug] = True
    try:
        async with running_coordinator(shm_path, tmp_path, hooks=hooks,
                                       delegate=mode == "delegated") as (coordinator, _):
            outcome = await snapshot(coordinator, str(tmp_path / "x.img"))
        judge(outcome, bug)
    finally:
        stop_writers(shm_path, writers)


# (the control "protect nothing" is test_snapshot.py::test_copy_without_protection_is_caught)
