"""Incremental snapshots (`snapshot --coordinator SOCK --incremental`): a delta holds exactly the
pages any tracked process wrote since the parent, and restoring the chain gives the object's
state at the delta's T: byte for byte on a frozen object, and a state the consistency checker
accepts under live writers. Negative controls: a write lost on purpose is caught; a process that
joined since the parent forces a full image, with the reason."""

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
from uffdsnap.image import load_manifest, manifest_path, restore, verify
from uffdsnap.testing.poker import PAGE
from uffdsnap.testing.poker import Poker as _Poker

pytestmark = needs_root

OBJECT_PAGES = 2048  # 8 MiB

def Poker(path: str) -> _Poker:  # noqa: N802 (a class, for the tests)
    poker = _Poker(path)
    SPAWNED.append(poker.proc)
    return poker


def _make_object(path: str, size: int = OBJECT_PAGES * PAGE) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _snap(coordinator, out: str, incremental: bool = True) -> dict:
    return await coordinator.snapshot(out, incremental=incremental)


async def _proven_delta(coordinator, out: str, pages: int, tmp_path: Path, obj: str) -> dict:
    """A snapshot that must be a delta of `pages` pages, restoring (chain) to the object."""
    summary = await _snap(coordinator, out)
    assert summary["image_kind"] == "delta", summary["incremental"]
    assert summary["incremental"]["pages_written_since_parent"] == pages
    assert _restored(out, tmp_path) == _read(obj)
    return summary


def _restored(image: str, tmp_path: Path) -> bytes:
    to = str(tmp_path / "restored.bin")
    if os.path.exists(to):
        os.unlink(to)
    restore(image, to)
    return _read(to)


@pytest.mark.parametrize("mode", ["agents", "delegated"])
async def test_delta_holds_exactly_the_written_pages(mode: str, shm_path: str,
                                                     tmp_path: Path) -> None:
    """A frozen object between snapshots: each delta holds the pages written since its parent
    (no more: its size tracks the writes), names its parent, and full + deltas restore to the
    same bytes as a full snapshot taken at the same point (and as the object itself)."""
    _make_object(shm_path)
    async with running_coordinator(shm_path, tmp_path, delegate=mode == "delegated") as (
            coordinator, _sock):
        poker = await trio.to_thread.run_sync(Poker, shm_path)
        try:
            s0 = await _snap(coordinator, str(tmp_path / "s0.img"))
            assert s0["image_kind"] == "full"
            assert "no parent" in s0["incremental"]["full_reason"]
            written = [(3, 0xAA), (4, 0xAB), (1000, 0x00), (OBJECT_PAGES - 1, 0x11)]
            links = [str(tmp_path / "s0.img")]
            for n, batch in enumerate([written, [(3, 0x33), (7, 0x77)], []], start=1):
                for page, value in batch:
                    await trio.to_thread.run_sync(poker.write, page, value)
                out = str(tmp_path / f"s{n}.img")
                summary = await _snap(coordinator, out)
                assert summary["image_kind"] == "delta", summary["incremental"]
                pages = {p for p, _ in batch}
                assert summary["incremental"]["pages_written_since_parent"] == len(pages)
                manifest = load_manifest(manifest_path(out))
                assert manifest.extent_bytes == len(pages) * PAGE
                assert {e.offset // PAGE for e in manifest.extents
                        for _ in range(1)} <= pages
                assert manifest.parent is not None
                assert manifest.parent.image == os.path.basename(links[-1])
                links.append(out)
                full = str(tmp_path / f"full{n}.img")
                await _snap(coordinator, full, incremental=False)
                links.append(full)  # a full image published while tracking is a parent too
                state = _read(shm_path)
                assert _restored(out, tmp_path) == state
                assert _restored(full, tmp_path) == state
                assert verify(out).ok
        finally:
            poker.close()


async def test_lost_write_is_caught(shm_path: str, tmp_path: Path) -> None:
    """Negative control: with recording of writes between snapshots disabled on purpose, the
    delta misses the written pages, and the restored chain differs from the object."""
    _make_object(shm_path)
    hooks = {"untracked_writes": True}
    async with running_coordinator(shm_path, tmp_path, hooks=hooks) as (coordinator, _sock):
        poker = await trio.to_thread.run_sync(Poker, shm_path)
        try:
            await _snap(coordinator, str(tmp_path / "s0.img"))
            await trio.to_thread.run_sync(poker.write, 5, 0x55)
            out = str(tmp_path / "s1.img")
            summary = await _snap(coordinator, out)
            assert summary["image_kind"] == "delta"
            assert _restored(out, tmp_path) != _read(shm_path)
        finally:
            poker.close()


async def test_late_mapper_forces_a_full_image(shm_path: str, tmp_path: Path) -> None:
    """A process that maps the object between snapshots wrote before anyone protected it: the
    next --incremental is full and says why; the one after is a delta again."""
    _make_object(shm_path)
    async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
        first = await trio.to_thread.run_sync(Poker, shm_path)
        late = None
        try:
            await _snap(coordinator, str(tmp_path / "s0.img"))
            late = await trio.to_thread.run_sync(Poker, shm_path)
            await trio.to_thread.run_sync(late.write, 9, 0x99)  # unprotected: not recorded
            s1 = await _snap(coordinator, str(tmp_path / "s1.img"))
            assert s1["image_kind"] == "full"
            assert f"pid {late.proc.pid}" in s1["incremental"]["full_reason"]
            assert "joined since the previous snapshot" in s1["incremental"]["full_reason"]
            assert load_manifest(manifest_path(str(tmp_path / "s1.img"))).parent is None
            await trio.to_thread.run_sync(late.write, 10, 0x10)
            await trio.to_thread.run_sync(first.write, 11, 0x11)
            await _proven_delta(coordinator, str(tmp_path / "s2.img"), 2, tmp_path,
                                shm_path)
        finally:
            first.close()
            if late is not None:
                late.close()


@pytest.mark.parametrize("mode", ["agents", "delegated"])
async def test_chain_under_live_writers(mode: str, shm_path: str, tmp_path: Path) -> None:
    """4 native writers (attached) and 2 enlisted Python writers write throughout a chain of a
    full image and 10 deltas from one coordinator: every link restores to one point-in-time
    state the checker accepts, between the seqs seen before and after its snapshot."""
    make_workload(shm_path, 6, data_pages=1024)
    async with running_coordinator(shm_path, tmp_path, delegate=mode == "delegated") as (
            coordinator, sock):
        writers = await trio.to_thread.run_sync(
            lambda: start_writers(shm_path, native=4, enlisted=2, enlist=sock))
        try:
            kinds = []
            for n in range(11):
                out = str(tmp_path / f"c{n}.img")
                before = wl.read_live_seqs(shm_path)
                summary = await _snap(coordinator, out)
                after = wl.read_live_seqs(shm_path)
                kinds.append(summary["image_kind"])
                to = str(tmp_path / f"c{n}.restored")
                restore(out, to)
                result = wl.check_file(to)
                assert result.ok, (n, result.summary())
                for i, seq in enumerate(result.seqs):
                    assert before[i] <= seq < after[i], (n, i, before[i], seq, after[i])
                os.unlink(to)
            assert kinds == ["full"] + ["delta"] * 10
            assert verify(str(tmp_path / "c10.img")).ok
        finally:
            await trio.to_thread.run_sync(stop_writers, shm_path, writers)


async def test_forked_child_writes_are_in_the_delta(shm_path: str, tmp_path: Path) -> None:
    """A tracked process forks between snapshots; the child (tracked from birth: it inherits
    the protection) writes and exits: its write is in the next delta, which stays a delta."""
    _make_object(shm_path)
    async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
        poker = await trio.to_thread.run_sync(Poker, shm_path)
        try:
            await _snap(coordinator, str(tmp_path / "s0.img"))
            await trio.to_thread.run_sync(poker.write, 20, 0x20, "fork")
            await trio.to_thread.run_sync(poker.write, 21, 0x21)
            await _proven_delta(coordinator, str(tmp_path / "s1.img"), 2, tmp_path,
                                shm_path)
        finally:
            poker.close()


async def test_hugetlbfs_deltas(hugetlbfs: Path, tmp_path: Path) -> None:
    """Huge pages: a delta holds the huge pages written since its parent."""
    huge = 2 << 20
    path = str(hugetlbfs / "obj")
    with open(path, "wb") as f:  # hugetlbfs takes whole pages through mmap only
        f.truncate(8 * huge)
    poker0 = Poker(path)  # fill it: every huge page data
    try:
        for n in range(8):
            poker0.write(n * huge // PAGE, n + 1)
    finally:
        poker0.close()
    async with running_coordinator(path, tmp_path) as (coordinator, _sock):
        poker = await trio.to_thread.run_sync(Poker, path)
        try:
            await _snap(coordinator, str(tmp_path / "s0.img"))
            await trio.to_thread.run_sync(poker.write, 3 * huge // PAGE + 5, 0x35)
            await trio.to_thread.run_sync(poker.write, 3 * huge // PAGE + 9, 0x39)
            await trio.to_thread.run_sync(poker.write, 6 * huge // PAGE, 0x60)
            out = str(tmp_path / "s1.img")
            summary = await _snap(coordinator, out)
            assert summary["image_kind"] == "delta", summary["incremental"]
            assert summary["incremental"]["pages_written_since_parent"] == 2
            assert load_manifest(manifest_path(out)).extent_bytes == 2 * huge
            assert _restored(out, tmp_path) == _read(path)
        finally:
            poker.close()


async def test_incremental_via_cli(shm_path: str, tmp_path: Path) -> None:
    """`uffdsnap coordinator` + `snapshot --coordinator SOCK --incremental`: full, then deltas
    naming their parent; `info` shows the chain, `verify` checks it, `restore` and `compact`
    give the object's bytes; --incremental without a coordinator is one clear error line."""
    _make_object(shm_path)
    sock = str(tmp_path / "c.sock")
    coord = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm", shm_path,
                              "--listen", sock, "--attach"], stdout=subprocess.PIPE, text=True)
    SPAWNED.append(coord)
    poker = None
    try:
        assert coord.stdout is not None and "listening" in coord.stdout.readline()
        poker = await trio.to_thread.run_sync(Poker, shm_path)

        async def uffdsnap(*args: str) -> subprocess.CompletedProcess[bytes]:
            return await trio.run_process([sys.executable, "-m", "uffdsnap", *args],
                                          capture_stdout=True, capture_stderr=True, check=False)

        kinds = []
        for n in range(3):
            await trio.to_thread.run_sync(poker.write, 40 + n, n + 1)
            proc = await uffdsnap("snapshot", "--coordinator", sock, "-o",
                                  str(tmp_path / f"n{n}.img"), "--incremental", "--json")
            assert proc.returncode == 0, proc.stderr.decode()
            kinds.append(json.loads(proc.stdout)["image_kind"])
        assert kinds == ["full", "delta", "delta"]
        last = str(tmp_path / "n2.img")
        info = json.loads((await uffdsnap("info", last, "--json")).stdout)
        assert len(info["chain"]) == 3
        assert (await uffdsnap("verify", last)).returncode == 0
        restored, full = str(tmp_path / "r.bin"), str(tmp_path / "full.img")
        assert (await uffdsnap("restore", last, "--to", restored)).returncode == 0
        assert (await uffdsnap("compact", last, "-o", full)).returncode == 0
        assert _read(restored) == _read(full) == _read(shm_path)
        text = await uffdsnap("snapshot", "--coordinator", sock, "-o",
                              str(tmp_path / "h.img"), "--incremental")
        assert text.returncode == 0
        assert b"delta of 0 page(s)" in text.stdout, text.stdout.decode()
        bad = await uffdsnap("snapshot", "--shm", shm_path, "-o", str(tmp_path / "x.img"),
                             "--incremental")
        err = bad.stderr.decode()
        assert bad.returncode != 0 and err.count("\n") == 1 and "--coordinator" in err, err
    finally:
        if poker is not None:
            poker.close()
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(timeout=20) == 0


@pytest.mark.parametrize("mode", ["agents", "delegated"])
async def test_deltas_over_the_stream(mode: str, shm_path: str, tmp_path: Path) -> None:
    """Streamed to a receiver (`receive --keep-listening -o DIR`): the first --incremental is
    full, the next ones are deltas naming the receiver's previous image, and the chain at the
    receiver restores to the object; a local --incremental after them is full (its parent is
    at the receiver), with the reason."""
    from uffdsnap.stream import StreamOptions

    _make_object(shm_path)
    rdir = tmp_path / "received"
    rdir.mkdir()
    rsock = str(tmp_path / "r.sock")
    recv = subprocess.Popen([sys.executable, "-m", "uffdsnap", "receive", "--listen",
                             f"unix:{rsock}", "--keep-listening", "-o", str(rdir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    SPAWNED.append(recv)
    try:
        assert recv.stdout is not None and "listening" in recv.stdout.readline()
        async with running_coordinator(shm_path, tmp_path,
                                       delegate=mode == "delegated") as (coordinator, _sock):
            poker = await trio.to_thread.run_sync(Poker, shm_path)
            try:
                names = []
                for n, pages in enumerate([[1], [2, 3], [3, OBJECT_PAGES - 1]]):
                    for page in pages:
                        await trio.to_thread.run_sync(poker.write, page, 0x40 + n)
                    s = await coordinator.snapshot("", stream=StreamOptions(f"unix:{rsock}"),
                                                   incremental=True)
                    assert s["image_kind"] == ("full" if n == 0 else "delta"), s["incremental"]
                    if n:
                        assert s["incremental"]["pages_written_since_parent"] == len(pages)
                        assert s["incremental"]["parent"] == names[-1]
                    names.append(s["stream"]["image"])
                last = str(rdir / names[-1])
                manifest = load_manifest(manifest_path(last))
                assert manifest.parent is not None and manifest.parent.image == names[-2]
                assert manifest.extent_bytes == 2 * PAGE
                assert verify(last).ok
                assert _restored(last, tmp_path) == _read(shm_path)
                local = await _snap(coordinator, str(tmp_path / "local.img"))
                assert local["image_kind"] == "full"
                assert "streamed to" in local["incremental"]["full_reason"]
            finally:
                poker.close()
    finally:
        recv.terminate()
        recv.wait(timeout=20)


async def test_writes_of_a_process_that_exited_are_in_the_delta(shm_path: str,
                                                                tmp_path: Path) -> None:
    """A tracked process writes between snapshots and exits: its agent told the coordinator
    before it left, so the next snapshot is still a delta, and holds that write."""
    _make_object(shm_path)
    async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
        stays = await trio.to_thread.run_sync(Poker, shm_path)
        leaves = await trio.to_thread.run_sync(Poker, shm_path)
        try:
            await _snap(coordinator, str(tmp_path / "s0.img"))
            await trio.to_thread.run_sync(leaves.write, 30, 0x30)
            await trio.to_thread.run_sync(leaves.close)
            await trio.to_thread.run_sync(stays.write, 31, 0x31)
            await _proven_delta(coordinator, str(tmp_path / "s1.img"), 2, tmp_path,
                                shm_path)
        finally:
            stays.close()
