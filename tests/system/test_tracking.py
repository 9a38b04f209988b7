"""Tracking that survives real programs: hugetlb objects, anonymous shared memory of a
pre-forked server, multi-threaded writers, and writers with several or partial mappings.

Every test runs real processes that keep writing through real snapshots, and the consistency
checker does the proving: an image passes only if it is the object at one instant T. Each test
also shows the writers were live around the snapshot (image seqs between the seqs read before and
after it), and the negative controls show the checker fails when nothing is protected.
"""

from __future__ import annotations

import json
import os
import socket as stdsocket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import (
    HUGE_PAGE,
    SPAWNED,
    make_workload,
    needs_root,
    running_coordinator,
    spawn_writers,
)
from procutil import await_until
from uffdsnap import workload as wl
from uffdsnap.coordinator import Coordinator
from uffdsnap.image import load_manifest, manifest_path, verify
from uffdsnap.testing import build as devbuild

pytestmark = needs_root

PROGRESS_TIMEOUT_S = 30.0
# Steps per second per writer: busy enough that writes hit protected pages in every snapshot
# (and that an unprotected copy is caught: the negative controls run at the same rates), idle
# enough that the agents starting up do not starve on a 2-core machine. A step writes one page.
RATE = 2000  # 4 KiB pages
HUGE_RATE = 200  # 2 MiB pages, native writers (~400 MiB/s each)
PYTHON_HUGE_RATE = 10  # 2 MiB pages, Python writers (one u64 store per bytecode loop: slow)
REQUEST_INTERVAL_S = 0.0005  # between a client's requests to the pre-forked server
# A coordinator that copies without protecting, slowly: what the checker must reject.
UNPROTECTED = {"no_protect": True, "scan_delay_s": 0.002}


# --- helpers ---------------------------------------------------------------------------------

spawn = spawn_writers  # (index, options) specs: hugetlb rates, threads, partial mappings


def stop(path: str, writers: list[wl.WriterProcess]) -> dict[int, int]:
    """Stop every writer; return {writer index: final seq} over all their threads."""
    wl.set_stop(path)
    finals: dict[int, int] = {}
    try:
        for w in writers:
            finals.update(w.wait_all())
    finally:
        for w in writers:
            w.kill()
    return finals


async def progressed(obj: str, seqs: list[int]) -> list[int]:
    """Live seqs once every writer has completed a step past `seqs`. Polled: a writer's step
    has no event to wait on, and a Python writer on 2 MiB pages takes tens of ms per step."""
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        while True:
            live = wl.read_live_seqs(obj)
            if all(now > seq for now, seq in zip(live, seqs, strict=True)):
                return live
            await trio.sleep(0.005)


async def check_image(obj: str, out: str, before: list[int]) -> wl.CheckResult:
    """The image is one instant (checker, checksums), between `before` and the writers' state
    after the snapshot, and every writer moved on past it."""
    result = wl.check_file(out)
    assert result.ok, result.summary()
    assert verify(out).ok
    after = await progressed(obj, result.seqs)
    for i, seq in enumerate(result.seqs):
        assert before[i] <= seq < after[i], (i, before[i], seq, after[i])
    return result


async def cli_snapshot(spec: str, out: str, mode: str = "agents") -> dict[str, Any]:
    """`uffdsnap snapshot --shm SPEC --json --mode MODE` in its own process; its summary."""
    proc = await trio.run_process(
        [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", spec, "-o", out, "--json",
         "--mode", mode],
        capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


async def repeated_snapshots(coordinator: Coordinator, obj: str, tmp_path: Path,
                             writers: list[wl.WriterProcess], count: int) -> int:
    """`count` snapshots from one coordinator while the writers run, each checked; every
    writer process takes part in each. Returns the total number of write faults served."""
    faults = 0
    for n in range(count):
        out = str(tmp_path / f"snap{n}.img")
        before = wl.read_live_seqs(obj)
        summary = await coordinator.snapshot(out)
        await check_image(obj, out, before)
        assert sorted(p["pid"] for p in summary["processes"]) == sorted(w.pid for w in writers)
        faults += summary["faults"]
    return faults


async def caught_unprotected(obj: str, tmp_path: Path, attempts: int = 10) -> dict[str, int]:
    """Copy the object `attempts` times with no protection; the violation kinds of the first
    image the checker rejects ({} if it accepted them all)."""
    async with running_coordinator(obj, tmp_path, hooks=UNPROTECTED) as (coordinator, _sock):
        for n in range(attempts):
            out = str(tmp_path / f"unprotected{n}.img")
            await coordinator.snapshot(out)
            result = wl.check_file(out)
            os.unlink(out)
            if not result.ok:
                return result.kinds
    return {}


@pytest.fixture
def hugetlb_memfd(hugepages: int) -> Iterator[str]:
    """A hugetlb memfd workload (3 writers, 4 data pages of 2 MiB: 16 huge pages) held by this
    process, which never maps it; yields the path writers and snapshots open."""
    fd, _size = wl.create_object(f"uffdsnap-test-huge-{uuid.uuid4().hex[:8]}", 3, 4,
                                 page_size=HUGE_PAGE)
    try:
        yield wl.object_path(fd)
    finally:
        os.close(fd)


# --- 1. hugetlbfs-backed objects -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["agents", "delegated"])
async def test_hugetlb_memfd_snapshot_command(mode: str, hugetlb_memfd: str,
                                              tmp_path: Path) -> None:
    """A MFD_HUGETLB memfd reached through /proc/PID/fd/N: a native writer, a native writer with
    two partial sets of mappings and a Python writer (all attached) write 2 MiB pages during
    `uffdsnap snapshot`; the image is one instant, verifies, and records the 2 MiB page size
    taken from the object itself."""
    writers = spawn(hugetlb_memfd, [(0, {"rate": HUGE_RATE}),
                                    (1, {"rate": HUGE_RATE, "partial": True, "map_twice": True}),
                                    (2, {"rate": PYTHON_HUGE_RATE, "impl": "python"})])
    out = str(tmp_path / "huge.img")
    try:
        before = wl.read_live_seqs(hugetlb_memfd)
        summary = await cli_snapshot(hugetlb_memfd, out, mode)
        result = await check_image(hugetlb_memfd, out, before)
    finally:
        stop(hugetlb_memfd, writers)
    assert sorted(p["pid"] for p in summary["processes"]) == sorted(w.pid for w in writers)
    assert summary["page_size"] == HUGE_PAGE
    assert result.layout is not None and result.layout.page_size == HUGE_PAGE
    manifest = load_manifest(manifest_path(out))
    assert manifest.object.page_size == HUGE_PAGE and manifest.object.kind == "hugetlbfs"
    proc = await trio.run_process([sys.executable, "-m", "uffdsnap", "verify", out],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


async def test_hugetlbfs_file_repeated(hugetlbfs: Path, tmp_path: Path) -> None:
    """A file on a hugetlbfs mount, written by a native writer, a two-thread native writer and a
    partially-mapping Python writer, through 2 snapshots of a long-running coordinator."""
    path = str(hugetlbfs / "pool")
    fd, _size = wl.create_object(path, 4, 4, page_size=HUGE_PAGE)
    os.close(fd)
    writers = spawn(path, [(0, {"rate": HUGE_RATE}), (1, {"rate": HUGE_RATE, "threads": 2}),
                           (3, {"rate": PYTHON_HUGE_RATE, "impl": "python", "partial": True})])
    try:
        async with running_coordinator(path, tmp_path) as (coordinator, _sock):
            assert coordinator.page_size == HUGE_PAGE  # st_blksize of the hugetlbfs file
            await repeated_snapshots(coordinator, path, tmp_path, writers, 2)
    finally:
        stop(path, writers)
    manifest = load_manifest(manifest_path(str(tmp_path / "snap1.img")))
    assert manifest.object.page_size == HUGE_PAGE and manifest.object.kind == "hugetlbfs"


# --- 2. anonymous shared memory of a pre-forked server ---------------------------------------

@dataclass
class Server:
    """helpers/preforker running: its anonymous shared memory and its pre-forked workers."""

    process: wl.WriterProcess  # speaks the writers' "ready" / "done index=I seq=S" lines
    pid: int
    spec: str  # /proc/PID/map_files/START-END of the shared memory
    workers: list[int]

    @classmethod
    def start(cls, workers: int, data_pages: int, page_size: int, *, listen: str | None = None,
              rate: float = 0) -> Server:
        """Start it: workers serve requests on `listen`, or else step at `rate` on their own."""
        argv = [str(devbuild.build("preforker")), "--workers", str(workers), "--data-pages",
                str(data_pages), "--page-size", str(page_size), "--rate", str(rate)]
        if listen:
            argv += ["--listen", listen]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        process = wl.WriterProcess(proc, 0, "preforker")
        process.wait_ready()
        fields = dict(f.split("=", 1) for f in process.ready_line.split()[1:])
        return cls(process, int(fields["pid"]), f"/proc/{fields['pid']}/map_files/{fields['map']}",
                   [int(p) for p in fields["pids"].split(",")])


@dataclass
class Load:
    """Clients of the server: one connection per worker, each sending requests (one step
    each) back to back and remembering the (worker index, seq) answers."""

    path: str
    conns: list[trio.socket.SocketType] = field(default_factory=list)
    last: dict[int, int] = field(default_factory=dict)  # worker index -> seq of its last answer
    stopping: trio.Event = field(default_factory=trio.Event)

    async def connect(self, count: int) -> None:
        for _ in range(count):
            sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
            await sock.connect(self.path)
            self.conns.append(sock)

    async def request(self, sock: trio.socket.SocketType) -> None:
        await sock.send(b"r")
        answer = b""
        while len(answer) < 16:
            chunk = await sock.recv(16 - len(answer))
            if not chunk:
                raise EOFError("the server closed a connection")
            answer += chunk
        index, seq = struct.unpack("<QQ", answer)
        self.last[index] = seq

    async def serve(self, sock: trio.socket.SocketType) -> None:
        while not self.stopping.is_set():
            await self.request(sock)
            await trio.sleep(REQUEST_INTERVAL_S)  # pacing, not synchronization

    def close(self) -> None:
        for sock in self.conns:
            sock.close()


@pytest.mark.parametrize("mode", ["agents", "delegated"])
@pytest.mark.parametrize("page_size", [4096, HUGE_PAGE], ids=["shmem", "hugetlb"])
async def test_preforked_server_anon_shm(page_size: int, mode: str, tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    """An unmodified pre-forking server keeps serving requests while `uffdsnap snapshot --shm
    /proc/PID/map_files/START-END` snapshots its MAP_SHARED|MAP_ANONYMOUS memory (plain shmem,
    or MAP_HUGETLB as PostgreSQL maps it): the parent and every worker are found by the memory's
    inode and attached, and the image is one instant."""
    if page_size == HUGE_PAGE:
        request.getfixturevalue("hugepages")
    nworkers = 3
    listen = str(tmp_path / "server.sock")
    server = Server.start(nworkers, 256 if page_size == 4096 else 4, page_size, listen=listen)
    load = Load(listen)
    out = str(tmp_path / "anon.img")
    try:
        await load.connect(nworkers)
        async with trio.open_nursery() as nursery:
            for sock in load.conns:
                nursery.start_soon(load.serve, sock)
            before = wl.read_live_seqs(server.spec)
            summary = await cli_snapshot(server.spec, out, mode)
            load.stopping.set()
        for sock in load.conns:  # one more request each: every worker serves after the snapshot
            await load.request(sock)
        result = await check_image(server.spec, out, before)
        wl.set_stop(server.spec)
        load.close()  # EOF: each worker looks at the stop word and exits
        finals = server.process.wait_all(timeout=10)
    finally:
        load.close()
        server.process.kill()
    assert sorted(p["pid"] for p in summary["processes"]) == sorted([server.pid, *server.workers])
    assert summary["page_size"] == page_size
    assert sorted(load.last) == list(range(nworkers))  # each worker served a connection
    assert finals == load.last  # a step only ever happens for a request, and each was answered
    assert all(finals[i] > seq for i, seq in enumerate(result.seqs))


# --- holes: pages first written after T ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["hugetlb", "anon-shm"])
async def test_holes_first_written_during_the_copy(kind: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    """Pages nobody had written at T have no page and no PTE; they are protected all the same
    (PTE markers), so a writer that fills one before the copy reaches it waits until it is
    saved, as zero. Slow writers on many pages leave most of them holes at T; the copy is held
    at its start (a test hook; protection is unchanged) until every writer has filled a few
    (each of those a fault), and for huge pages it is slowed too, so that writers also fill
    holes while it runs; any one written untracked would break the image."""
    if kind == "hugetlb":
        # 52 pages of 2 MiB (16 per writer; its first 16 steps fill each once); the copy takes
        # over 2.6 s (52 chunks), in which each writer makes ~8 steps
        data_pages, rate, delay = 16, 3, 0.05
        request.getfixturevalue("hugepages")
        fd, _size = wl.create_object(f"uffdsnap-test-holes-{uuid.uuid4().hex[:8]}", 3,
                                     data_pages, page_size=HUGE_PAGE)
        obj = wl.object_path(fd)
    else:
        # 8 MiB, mostly holes: scattered pages make the copy slow enough (~1 ms per extent)
        data_pages, rate, delay = 1024, 200, 0.0
        server = Server.start(2, data_pages, 4096, rate=rate)
        obj = server.spec
    writers: list[wl.WriterProcess] = []
    out = str(tmp_path / "holes.img")
    try:
        if kind == "hugetlb":
            writers = spawn(obj, [(0, {"rate": rate}), (1, {"rate": rate, "partial": True}),
                                  (2, {"rate": rate, "map_twice": True})])
            pids = [w.pid for w in writers]
        else:
            writers = [server.process]
            pids = [server.pid, *server.workers]
        async def during_copy() -> None:  # every writer fills new pages (holes at T)
            base = wl.read_live_seqs(obj)
            await await_until(lambda: all(s >= b + 3 for s, b in zip(wl.read_live_seqs(obj),
                                                                        base, strict=True)),
                              "every writer to take 3 steps in the copy")

        hooks: dict[str, Any] = {"at_phase": {"copying": during_copy}}
        if delay:
            hooks["scan_delay_s"] = delay
        async with running_coordinator(obj, tmp_path, hooks=hooks) as (coordinator, _sock):
            before = wl.read_live_seqs(obj)
            summary = await coordinator.snapshot(out)
            at_end = wl.read_live_seqs(obj)
        result = await check_image(obj, out, before)
        stop(obj, writers)
    finally:
        for w in writers:
            w.kill()
        if kind == "hugetlb":
            os.close(fd)
        else:
            server.process.kill()
    assert sorted(p["pid"] for p in summary["processes"]) == sorted(pids)
    # pages that were holes at T (no step <= S chose them) and that writers filled before the
    # snapshot was over, i.e. during the copy (before or after the scan passed them)
    first_written = sum(1 for i, seq in enumerate(result.seqs) for p in range(data_pages)
                        if wl.last_step(i, p, seq, data_pages) == 0
                        and wl.last_step(i, p, at_end[i], data_pages) > 0)
    assert first_written >= 6, (first_written, result.seqs, at_end)
    assert summary["faults"] > 0


# --- 3. multi-threaded writers ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["agents", "delegated"])
async def test_threaded_writers_repeated(mode: str, shm_path: str, tmp_path: Path) -> None:
    """2 processes × 3 writer threads + 1 single-threaded writer, through 3 snapshots: the agent
    injects into one thread of each process, and faults from every thread are served."""
    make_workload(shm_path, 7, data_pages=512)
    writers = spawn(shm_path, [(0, {"rate": RATE, "threads": 3}),
                               (3, {"rate": RATE, "threads": 3}), (6, {"rate": RATE})])
    try:
        async with running_coordinator(shm_path, tmp_path, delegate=mode == "delegated") as (
                coordinator, _sock):
            faults = await repeated_snapshots(coordinator, shm_path, tmp_path, writers, 3)
        assert faults > 0  # threads did hit protected pages and were served
    finally:
        finals = stop(shm_path, writers)
    assert sorted(finals) == list(range(7))  # every thread ran to the stop word


async def test_threads_outliving_their_main_thread(shm_path: str, tmp_path: Path) -> None:
    """A program whose main thread pthread_exit()s after starting its workers lives on with a
    zombie thread-group leader, through which /proc/PID/mem and pidfd_getfd() find nothing:
    attach must go through a live thread, and the image must hold that process's writes at T
    like anyone else's."""
    make_workload(shm_path, 3, data_pages=512)
    argv = wl.writer_command(shm_path, 0, rate=RATE, threads=2) + ["--leader-exits"]
    leaderless = wl.WriterProcess(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True), 0, "c")
    writers = [leaderless]
    try:
        leaderless.wait_ready()  # printed once /proc/PID/maps reads empty
        writers += spawn(shm_path, [(2, {"rate": RATE})])
        out = str(tmp_path / "leaderless.img")
        before = wl.read_live_seqs(shm_path)
        proc = await trio.run_process(
            [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path, "-o", out,
             "--json"], capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        summary = json.loads(proc.stdout)
        assert sorted(p["pid"] for p in summary["processes"]) == sorted(w.pid for w in writers)
        assert leaderless.pid in [p["pid"] for p in summary["processes"]]
        await check_image(shm_path, out, before)
    finally:
        stop(shm_path, writers)


# --- 4. several and partial mappings ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["agents", "delegated"])
async def test_thousands_of_mappings_in_one_process(mode: str, shm_path: str,
                                                    tmp_path: Path) -> None:
    """A writer whose every page of the object is a mapping of its own (over 8000 in one
    process, beyond what one message could once list) and a plain writer: every mapping is
    registered, protected, reported and translated, and the image is one instant."""
    make_workload(shm_path, 2, data_pages=8192)
    frag = subprocess.Popen([str(devbuild.build("fragments")), "--object", shm_path, "--index",
                             "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    SPAWNED.append(frag)
    writers = [wl.WriterProcess(frag, 0, "c")]
    try:
        writers[0].wait_ready()
        mappings = int(writers[0].ready_line.split("mappings=")[1])
        assert mappings > 8192
        writers += spawn(shm_path, [(1, {})])
        async with running_coordinator(shm_path, tmp_path,
                                       delegate=mode == "delegated") as (coordinator, _sock):
            before = wl.read_live_seqs(shm_path)
            out = str(tmp_path / "frag.img")
            summary = await coordinator.snapshot(out)
            await check_image(shm_path, out, before)
        [fragmented] = [p for p in summary["processes"] if p["pid"] == frag.pid]
        assert fragmented["mappings"] == mappings
    finally:
        stop(shm_path, writers)


async def test_multi_mapping_writers_repeated(shm_path: str, tmp_path: Path) -> None:
    """Writers that map the object twice, partially, both, one of them per thread (each thread
    with its own sets of mappings), and a Python writer doing both, through 3 snapshots: every
    offset ⇄ address translation across many mappings per process holds."""
    make_workload(shm_path, 6, data_pages=512)
    both = {"rate": RATE, "partial": True, "map_twice": True}
    writers = spawn(shm_path, [(0, {"rate": RATE, "map_twice": True}),
                               (1, {"rate": RATE, "partial": True}), (2, both),
                               (3, {**both, "threads": 2}), (5, {**both, "impl": "python"})])
    try:
        async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
            await repeated_snapshots(coordinator, shm_path, tmp_path, writers, 3)
            mappings = {p["pid"]: p["mappings"] for p in
                        load_manifest(manifest_path(str(tmp_path / "snap2.img"))).processes}
    finally:
        stop(shm_path, writers)
    assert all(mappings[w.pid] >= 2 for w in writers), mappings


async def test_writer_with_a_readonly_view(shm_path: str, tmp_path: Path) -> None:
    """A process that writes the object through one mapping and also maps it read-only through
    an O_RDONLY descriptor (a monitor view, say): the read-only mapping can never be written,
    so the snapshot tracks the other and is one instant."""
    make_workload(shm_path, 2, data_pages=512)
    argv = wl.writer_command(shm_path, 0, rate=RATE) + ["--readonly-view"]
    viewer = wl.WriterProcess(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True), 0, "c")
    writers = [viewer]
    try:
        viewer.wait_ready()
        writers += spawn(shm_path, [(1, {"rate": RATE})])
        out = str(tmp_path / "viewer.img")
        before = wl.read_live_seqs(shm_path)
        summary = await cli_snapshot(shm_path, out)
        assert sorted(p["pid"] for p in summary["processes"]) == sorted(w.pid for w in writers)
        await check_image(shm_path, out, before)
    finally:
        stop(shm_path, writers)


# --- the checker can fail on each of these shapes --------------------------------------------

@contextmanager
def running(kind: str, shm_path: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """Writers of one shape from the tests above, at the same rates; yields the object."""
    if kind == "anon-shm":
        server = Server.start(3, 256, 4096, rate=RATE)
        try:
            yield server.spec
            wl.set_stop(server.spec)
            server.process.wait_all(timeout=10)
        finally:
            server.process.kill()
        return
    if kind == "hugetlb":
        path = request.getfixturevalue("hugetlb_memfd")
        specs: list[tuple[int, dict[str, Any]]] = [(i, {"rate": HUGE_RATE}) for i in range(3)]
    else:
        path = shm_path
        make_workload(path, 7, data_pages=512)
        specs = [(0, {"rate": RATE, "threads": 3}), (3, {"rate": RATE, "threads": 3}),
                 (6, {"rate": RATE})]
    writers = spawn(path, specs)
    try:
        yield path
    finally:
        stop(path, writers)


@pytest.mark.parametrize("kind", ["hugetlb", "anon-shm", "threads"])
async def test_unprotected_copy_is_caught(kind: str, shm_path: str, tmp_path: Path,
                                          request: pytest.FixtureRequest) -> None:
    """The checker must be able to fail for every shape tested here: a coordinator that copies
    without protecting anything produces an image it rejects (even with only 16 huge pages, and
    with writers throttled to the rates used above)."""
    with running(kind, shm_path, request) as obj:
        kinds = await caught_unprotected(obj, tmp_path)
    assert kinds, f"unprotected copies of running {kind} writers passed the checker 10 times"
