"""Attaching through the agent host: processes that live for tens of milliseconds (a fork chain)
are caught and tracked from birth, many processes are joined and protected in one snapshot,
and the host's death releases every target it holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conftest import (
    SPAWNED,
    at_priority,
    make_workload,
    needs_root,
    running_coordinator,
    start_writers,
    stop_writers,
)
from procutil import assert_nothing_published, assert_writers_resume, wait_gone, wait_line
from uffdsnap import workload as wl
from uffdsnap.cli import DEFAULT_NICE
from uffdsnap.image import verify
from uffdsnap.testing import build as devbuild

pytestmark = needs_root


def _snapshot(shm_path: str, out: str, mode: str, *more: str
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "-v", "--shm", shm_path,
                           "-o", out, "--json", "--mode", mode, *more], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("mode", ["agents", "delegated"])
@pytest.mark.parametrize("lifetime_ms", [20, 50, 200])
def test_fork_chain_is_caught_and_tracked_from_birth(lifetime_ms: int, mode: str,
                                                     shm_path: str, tmp_path: Path) -> None:
    """Writer 0 is a chain of processes, each forking its successor and exiting every
    `lifetime_ms`: the agent host attaches the current one before it is gone, and once it is
    protected its forks are tracked from birth. Three snapshots in a row, each one instant."""
    plain = _chain_beside_a_writer(shm_path, lifetime_ms, data_pages=256)
    try:
        for n in range(3):
            out = str(tmp_path / f"chain{n}.img")
            before = wl.read_live_seqs(shm_path)
            proc = _snapshot(shm_path, out, mode)
            assert proc.returncode == 0, proc.stderr
            result = wl.check_file(out)
            assert result.ok, result.summary()
            assert verify(out).ok
            assert result.seqs[0] >= before[0]  # the chain's state, between start and end
            summary = json.loads(proc.stdout)
            assert summary["processes"], summary
            _assert_times_reported(summary)
    finally:
        wl.set_stop(shm_path)
        stop_writers(shm_path, plain)


@pytest.mark.parametrize("mode", ["agents", "delegated"])
def test_a_chain_forking_all_through_the_copy_stays_tracked(mode: str, shm_path: str,
                                                            tmp_path: Path) -> None:
    """A fork chain whose processes live 50 ms while untracked (attachable: see above) and
    2 ms once born registered, through copies slowed to about 1.6 s (a test hook), five in a
    row: hundreds of forks and exits while protected, beside a writer whose faults keep every
    uffd busy with un-protects. A fork event an un-protect or a protect reads (it met EAGAIN)
    just before its parent exits is followed: the child is tracked and served, neither
    dropped with its parent's uffd nor left with a reader that does not serve it."""
    plain = _chain_beside_a_writer(shm_path, 50, data_pages=4096, tracked_lifetime_ms=2)
    hooks = json.dumps({"scan_delay_s": 0.1})  # each of the 16 windows of the copy
    try:
        for n in range(5):
            out = str(tmp_path / f"chain{n}.img")
            proc = _snapshot(shm_path, out, mode, "--test-hooks", hooks)
            assert proc.returncode == 0, proc.stderr[-4000:]
            result = wl.check_file(out)
            assert result.ok, result.summary()
    finally:
        wl.set_stop(shm_path)
        stop_writers(shm_path, plain)


def _chain_beside_a_writer(shm_path: str, lifetime_ms: int, data_pages: int,
                           tracked_lifetime_ms: int = 0) -> list[wl.WriterProcess]:
    """Writer 0: a fork chain (helpers/chain.c), ready; writer 1: a native writer
    (returned)."""
    make_workload(shm_path, 2, data_pages=data_pages)
    tracked = (["--tracked-lifetime-ms", str(tracked_lifetime_ms)]
               if tracked_lifetime_ms else [])
    chain = subprocess.Popen([str(devbuild.build("chain")), "--object", shm_path, "--index",
                              "0", "--lifetime-ms", str(lifetime_ms), *tracked],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    SPAWNED.append(chain)
    plain = start_writers(shm_path, native=1, first_index=1)
    try:
        wait_line(chain.stdout, "ready")
    except BaseException:
        wl.set_stop(shm_path)
        stop_writers(shm_path, plain)
        raise
    return plain


def _assert_times_reported(s: dict[str, int]) -> None:
    """What `snapshot --json` says of the way to T (issue 11), consistent with itself (values,
    not speeds: those are the benchmark's)."""
    assert s["request_to_t_ns"] == s["join_ns"] + s["protect_phase_ns"] > 0
    assert s["kernel_protect_total_ns"] >= s["kernel_protect_max_ns"] > 0
    # (the command's age includes the interpreter's start-up; its start is known to a tick)
    assert s["command_wall_ns"] >= s["request_to_t_ns"]


async def test_sixty_four_writers_joined_and_protected(shm_path: str, tmp_path: Path) -> None:
    """64 writer processes, each attached (one host), protected and tracked: one instant. The
    coordinator runs at the priority `uffdsnap snapshot` takes by default (its host too), the
    writers at theirs: 64 writers at this rate keep both CPUs busy, and at an equal share an
    interpreter's start-up alone takes seconds."""
    make_workload(shm_path, 64, data_pages=16)
    writers = await trio.to_thread.run_sync(lambda: start_writers(shm_path, native=64,
                                                                  rate=2000))
    try:
        with at_priority(DEFAULT_NICE):
            summary, hosts = await _snapshot_in_process(shm_path, tmp_path)
        assert sorted(p["pid"] for p in summary["processes"]) == sorted(w.pid for w in writers)
        assert len(hosts) == 1  # every one of them through one agent host
        result = wl.check_file(str(tmp_path / "many.img"))
        assert result.ok, result.summary()
    finally:
        await trio.to_thread.run_sync(stop_writers, shm_path, writers)


async def test_a_started_host_runs_at_its_coordinators_priority(shm_path: str,
                                                                 tmp_path: Path) -> None:
    """A host the coordinator starts as a program (a library's coordinator: none was forked)
    runs at the priority of the coordinator's thread, as a forked host would, not at that of
    the worker thread trio starts programs from (Linux keeps one per thread)."""
    make_workload(shm_path, 1, data_pages=16)
    writers = await trio.to_thread.run_sync(lambda: start_writers(shm_path, native=1))
    try:
        await trio.to_thread.run_sync(lambda: None)  # a worker thread, cached, at our priority
        theirs = os.getpriority(os.PRIO_PROCESS, 0)
        for nice in (theirs + 3, DEFAULT_NICE):
            with at_priority(nice):
                async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
                    await coordinator.snapshot(str(tmp_path / f"n{nice}.img"))
                    host = coordinator.attacher.host_pid
                    assert host is not None
                    assert _nice_of(host) == nice
    finally:
        await trio.to_thread.run_sync(stop_writers, shm_path, writers)


def _nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19, nice


async def _snapshot_in_process(shm_path: str, tmp_path: Path) -> tuple[dict, set[int | None]]:
    """One snapshot by a coordinator in this process: its summary, and the agent hosts used."""
    async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
        summary = await coordinator.snapshot(str(tmp_path / "many.img"))
        return summary, {coordinator.attacher.host_pid}


async def test_killing_the_agent_host_mid_copy_releases_every_target(shm_path: str,
                                                                     tmp_path: Path) -> None:
    """The host holds every target's uffd: killed mid-copy (held there by a test hook, writers
    shown blocked or running), every writer is released within the resume limit, the snapshot
    fails naming them, and nothing is published."""
    make_workload(shm_path, 4, data_pages=256)
    writers = await trio.to_thread.run_sync(lambda: start_writers(shm_path, native=4))
    out = str(tmp_path / "x.img")
    killed: list[int] = []
    try:
        async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
            async def during_copy() -> None:
                host = coordinator.attacher.host_pid
                os.kill(host, signal.SIGKILL)
                killed.append(host)
                await trio.to_thread.run_sync(assert_writers_resume, shm_path, writers)

            coordinator.test_hooks["at_phase"] = {"copying": during_copy}
            from uffdsnap.errors import SnapshotFailed

            with pytest.raises(SnapshotFailed, match="lost|left"):
                await coordinator.snapshot(out)
        wait_gone(killed)
        assert_nothing_published(out)
    finally:
        await trio.to_thread.run_sync(stop_writers, shm_path, writers)
