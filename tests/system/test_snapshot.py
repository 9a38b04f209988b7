"""Consistency: many real processes write throughout a snapshot; the checker proves the image is
one point-in-time state, and catches a deliberately wrong coordinator."""

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
    make_workload,
    needs_root,
    running_coordinator,
    start_writers,
    stop_writers,
)
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


@pytest.mark.parametrize("mode", ["agents", "delegated", "agents-without-fault-channel"])
async def test_native_and_enlisted_writers_repeatedly(mode: str, shm_path: str,
                                                      tmp_path: Path) -> None:
    """4 unmodified native writers (attached with ptrace) and 2 enlisted Python writers write
    throughout 3 snapshots from one long-running coordinator: each image is one instant. (The
    third mode: agents that send faults and take un-protects on their main connection, the
    protocol's path for agents without a native core.)"""
    agent_hooks = {"no_fault_channel": True} if mode == "agents-without-fault-channel" else {}
    make_workload(shm_path, 6, data_pages=1024)
    async with running_coordinator(shm_path, tmp_path, delegate=mode == "delegated",
                                   hooks={"agent": agent_hooks}) as (coordinator, sock):
        writers = await trio.to_thread.run_sync(
            lambda: start_writers(shm_path, native=4, enlisted=2, enlist=sock,
                                  agent_hooks=agent_hooks))
        try:
            faults = 0
            for n in range(3):
                out = str(tmp_path / f"snap{n}.img")
                summary = await _snapshot_and_check(coordinator, shm_path, out)
                assert len(summary["processes"]) == 6
                modes = sorted(p["mode"] for p in summary["processes"])
                assert modes == ["attach"] * 4 + ["enlist"] * 2
                assert summary["fault_channels"] == (6 if mode == "agents" else 0)
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
            [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path, "-o", out, "--json"],
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


async def test_unprivileged_writers_are_attached(shm_path: str, tmp_path: Path) -> None:
    """Native writers running as nobody (uid 65534), where an injected userfaultfd() gets EPERM:
    the agent hands them /dev/userfaultfd and the snapshot is still one instant."""
    make_workload(shm_path, 3, data_pages=512)
    writers = start_writers(shm_path, native=2, user=65534)
    writers += start_writers(shm_path, native=1, first_index=2)
    out = str(tmp_path / "nobody.img")
    try:
        proc = await trio.run_process(
            [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path, "-o", out, "--json"],
            capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        summary = json.loads(proc.stdout)
        assert sorted(p["pid"] for p in summary["processes"]) == sorted(w.pid for w in writers)
        result = wl.check_file(out)
        assert result.ok, result.summary()
    finally:
        stop_writers(shm_path, writers)


async def test_restore_reproduces_the_state_at_t(shm_path: str, tmp_path: Path) -> None:
    """Restore gives back exactly the image (which the checker proves is the state at T); and
    for an object whose writers have stopped, exactly the object's bytes."""
    make_workload(shm_path, 4, data_pages=256)
    writers = start_writers(shm_path, native=4)
    live = str(tmp_path / "live.img")
    try:
        proc = await trio.run_process(
            [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path, "-o", live],
            capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
    finally:
        final = stop_writers(shm_path, writers)
    restored = shm_path + "-restored"
    try:
        await trio.run_process([sys.executable, "-m", "uffdsnap", "restore", live, "--to",
                                restored])
        assert Path(restored).read_bytes() == Path(live).read_bytes()
        assert wl.check_file(restored).ok
        # writers stopped: a snapshot now must equal the object byte for byte
        quiet = str(tmp_path / "quiet.img")
        await trio.run_process([sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path,
                                "-o", quiet], capture_stdout=True)
        await trio.run_process([sys.executable, "-m", "uffdsnap", "restore", quiet, "--to",
                                restored, "--force"], capture_stdout=True)
        assert Path(restored).read_bytes() == Path(shm_path).read_bytes()
        assert wl.check_file(restored).seqs == final
    finally:
        os.unlink(restored)


async def test_long_running_coordinator_via_cli(shm_path: str, tmp_path: Path) -> None:
    """`uffdsnap coordinator --attach` serves enlisted writers and attaches native ones at each
    `uffdsnap snapshot --coordinator` request."""
    make_workload(shm_path, 4, data_pages=512)
    sock = str(tmp_path / "c.sock")
    coord = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm", shm_path,
                              "--listen", sock, "--attach"], stdout=subprocess.PIPE, text=True)
    writers: list[wl.WriterProcess] = []
    try:
        assert "listening" in coord.stdout.readline()
        writers = start_writers(shm_path, native=2, enlisted=2, enlist=sock)
        for n in range(2):
            out = str(tmp_path / f"c{n}.img")
            proc = await trio.run_process(
                [sys.executable, "-m", "uffdsnap", "snapshot", "--coordinator", sock, "-o", out,
                 "--json"], capture_stdout=True, capture_stderr=True, check=False)
            assert proc.returncode == 0, proc.stderr.decode()
            assert json.loads(proc.stdout)["processes_count"] == 4
            assert wl.check_file(out).ok
    finally:
        if writers:
            stop_writers(shm_path, writers)
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(timeout=20) == 0
    assert not os.path.exists(sock)


async def test_both_modes_give_the_same_bytes(shm_path: str, tmp_path: Path) -> None:
    """For a frozen object (processes map it writable, so agents attach and protect, but none
    writes), agents mode and delegated mode produce identical images, equal to the object."""
    from uffdsnap.testing import build as devbuild

    make_workload(shm_path, 4, data_pages=256)
    for w in start_writers(shm_path, native=4, max_ops=3000):
        assert w.proc.wait(timeout=60) == 0  # fill the object, then exit
    idle = [subprocess.Popen([str(devbuild.build("lifecycle")), "--object", shm_path, "--index",
                              str(i), "--supervisor"], stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True)
            for i in range(2)]
    SPAWNED.extend(idle)
    try:
        for p in idle:
            assert p.stdout is not None and "ready" in p.stdout.readline()
        images = []
        for mode in ("agents", "delegated"):
            out = str(tmp_path / f"{mode}.img")
            proc = await trio.run_process(
                [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path, "-o", out,
                 "--mode", mode, "--json"], capture_stdout=True, capture_stderr=True,
                check=False)
            assert proc.returncode == 0, proc.stderr.decode()
            assert json.loads(proc.stdout)["mode"] == mode
            images.append(Path(out).read_bytes())
        assert images[0] == images[1]
        assert images[0] == Path(shm_path).read_bytes()
    finally:
        wl.set_stop(shm_path)
        for p in idle:
            p.wait(timeout=30)


@pytest.mark.parametrize("mode", ["agents", "delegated"])
async def test_object_whose_size_is_not_whole_pages(mode: str, shm_path: str,
                                                    tmp_path: Path) -> None:
    """The last page of the object is partial: the image has the object's exact size and
    bytes, the partial page included (a process maps all of it, so it is protected too)."""
    size = 5 * 4096 + 123
    data = os.urandom(size)
    Path(shm_path).write_bytes(data)
    mapper = subprocess.Popen(
        [sys.executable, "-c", "import mmap, os, sys; f = os.open(sys.argv[1], os.O_RDWR); "
         "m = mmap.mmap(f, 0, mmap.MAP_SHARED); print('ready', flush=True); sys.stdin.read()",
         shm_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    SPAWNED.append(mapper)
    try:
        assert mapper.stdout is not None and mapper.stdout.readline().strip() == "ready"
        out = tmp_path / "tail.img"
        proc = await trio.run_process(
            [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path, "-o", str(out),
             "--mode", mode, "--json"], capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        assert [p["pid"] for p in json.loads(proc.stdout)["processes"]] == [mapper.pid]
        assert out.read_bytes() == data
        assert verify(str(out)).ok
    finally:
        mapper.kill()
        mapper.wait()
