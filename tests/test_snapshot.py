"""Consistency: many real processes write throughout a snapshot; the checker proves the image is
one point-in-time state, and catches a deliberately wrong coordinator."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from conftest import make_workload, needs_root, running_coordinator, start_writers, stop_writers
from uffdsnap import workload as wl
from uffdsnap.image import load_manifest, manifest_path, verify

pytestmark = needs_root


async def _snapshot_and_check(coordinator, path: str, out: str) -> dict:
    before = wl.read_live_seqs(path)
    summary = await coordinator.snapshot(out)
    after = wl.read_live_seqs(path)
    result = wl.check_file(out)
    assert result.ok, result.summary()
    assert verify(out).ok
    for i, seq in enumerate(result.seqs):
        # the image is a state between the start and the end of the snapshot, and every
        # writer kept writing through it
        assert before[i] <= seq < after[i], (i, before[i], seq, after[i])
    return summary


async def test_native_and_enlisted_writers_repeatedly(shm_path: str, tmp_path: Path) -> None:
    """4 unmodified native writers (attached with ptrace) and 2 enlisted Python writers write
    throughout 3 snapshots from one long-running coordinator: each image is one instant."""
    make_workload(shm_path, 6, data_pages=1024)
    async with running_coordinator(shm_path, tmp_path) as (coordinator, sock):
        writers = await trio.to_thread.run_sync(
            lambda: start_writers(shm_path, native=4, enlisted=2, enlist=sock))
        try:
            faults = 0
            for n in range(3):
                out = str(tmp_path / f"snap{n}.img")
                summary = await _snapshot_and_check(coordinator, shm_path, out)
                assert len(summary["processes"]) == 6
                modes = sorted(p["mode"] for p in summary["processes"])
                assert modes == ["attach"] * 4 + ["enlist"] * 2
                faults += summary["faults"]
                manifest = load_manifest(manifest_path(out))
                assert {p["pid"] for p in manifest.processes} == {w.pid for w in writers}
            assert faults > 0  # writers did hit protected pages and were served
        finally:
            await trio.to_thread.run_sync(stop_writers, shm_path, writers)


async def test_snapshot_command_attaches_every_mapper(shm_path: str, tmp_path: Path) -> None:
    """`uffdsnap snapshot --shm` (separate coordinator process, attach agents) on 4 native
    writers, one of them mapping the object twice and one only partially."""
    make_workload(shm_path, 4, data_pages=1024)
    writers = start_writers(shm_path, native=2)
    writers += start_writers(shm_path, native=1, first_index=2, map_twice=True)
    writers += start_writers(shm_path, native=1, first_index=3, partial=True)
    out = str(tmp_path / "cli.img")
    try:
        proc = await trio.run_process(
            ["python3", "-m", "uffdsnap", "snapshot", "--shm", shm_path, "-o", out, "--json"],
            capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        result = wl.check_file(out)
        assert result.ok, result.summary()
        assert verify(out).ok
    finally:
        stop_writers(shm_path, writers)


async def test_copy_without_protection_is_caught(shm_path: str, tmp_path: Path) -> None:
    """The checker must be able to fail: a coordinator that copies without protecting anything
    (a slow scan while writers run) produces images the checker rejects."""
    make_workload(shm_path, 6, data_pages=256)
    hooks = {"no_protect": True, "scan_delay_s": 0.002}
    async with running_coordinator(shm_path, tmp_path, hooks=hooks) as (coordinator, sock):
        writers = await trio.to_thread.run_sync(
            lambda: start_writers(shm_path, native=4, enlisted=2, enlist=sock))
        try:
            caught = []
            for n in range(10):
                out = str(tmp_path / f"bad{n}.img")
                await coordinator.snapshot(out)
                result = wl.check_file(out)
                os.unlink(out)
                if not result.ok:
                    caught.append(result.kinds)
                    break
            assert caught, "an unprotected copy of running writers passed the checker 10 times"
        finally:
            await trio.to_thread.run_sync(stop_writers, shm_path, writers)
