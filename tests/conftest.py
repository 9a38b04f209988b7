"""Shared fixtures: unique shared-memory objects, an in-process coordinator, writer fleets."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from uffdsnap import workload as wl
from uffdsnap.coordinator import Coordinator
from uffdsnap.hosted import hosted
from uffdsnap.procfs import open_object

ROOT = os.geteuid() == 0
# Every process the tests start directly: whatever a failing test leaves running is killed at
# the end of the session (a writer whose object was unlinked would otherwise spin forever).
SPAWNED: list[Any] = []


@pytest.fixture(autouse=True)
def _kill_leftovers() -> Iterator[None]:
    """After each test: kill whatever it left running (writers it started, and any descendant of
    ours: agents, coordinators, their children), so that no test runs beside another's leftovers
    (a writer whose object was unlinked would otherwise spin on until the session ends)."""
    mark = len(SPAWNED)
    yield
    for proc in SPAWNED[mark:]:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    del SPAWNED[mark:]
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(root: int) -> list[int]:
    """Every live descendant of `root`, from /proc (children first-level, then theirs)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (userfaultfd on other processes, "
                                                 "ptrace attach); CI runs as root")


@pytest.fixture
def shm_path() -> Iterator[str]:
    """A fresh /dev/shm path, removed afterwards."""
    path = f"/dev/shm/uffdsnap-test-{uuid.uuid4().hex[:12]}"
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@pytest.fixture
def shm() -> Iterator[Path]:
    """A fresh directory in /dev/shm (tmpfs, as objects live), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="uffdsnap-test-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_workload(path: str, nwriters: int, data_pages: int = 512) -> wl.Layout:
    fd, _size = wl.create_object(path, nwriters, data_pages)
    os.close(fd)
    os.chmod(path, 0o666)  # writers may run as an unprivileged user
    return wl.read_layout(path)


@asynccontextmanager
async def running_coordinator(path: str, tmp_path: Path, *, attach: bool = True,
                              hooks: dict[str, Any] | None = None,
                              protect_timeout: float = 30.0, delegate: bool = False
                              ) -> AsyncIterator[tuple[Coordinator, str]]:
    """A coordinator for the object at `path`, serving on a socket in `tmp_path`, in this
    process (which never maps the object, so it is never a mapper itself)."""
    obj = open_object(path)
    try:
        async with hosted(obj, socket_path=str(tmp_path / f"coord-{uuid.uuid4().hex[:8]}.sock"),
                          attach=attach, protect_timeout=protect_timeout, join_timeout=30.0,
                          delegate=delegate,
                          test_hooks=hooks or {}) as host:
            yield host.coordinator, host.socket_path
    finally:
        obj.close()


@contextmanager
def at_priority(nice: int) -> Iterator[None]:
    """The calling thread (a trio test's: its coordinator's) at priority `nice` for the block,
    as `uffdsnap snapshot --nice` would run it; processes it starts inherit it, or (an agent
    host) are passed it."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


def start_writers(path: str, *, native: int = 4, enlisted: int = 0, enlist: str | None = None,
                  first_index: int = 0, user: int | None = None,
                  agent_hooks: dict[str, Any] | None = None,
                  **kwargs: Any) -> list[wl.WriterProcess]:
    """Start `native` C writers then `enlisted` Python writers (which enlist with `enlist`,
    their agents given `agent_hooks`), with consecutive indexes, and wait until every one is
    writing."""
    specs = [(first_index + i, {"impl": "c", **kwargs}) for i in range(native)]
    specs += [(first_index + native + i, {"impl": "python", "enlist": enlist,
                                          "agent_hooks": agent_hooks, **kwargs})
              for i in range(enlisted)]
    return spawn_writers(path, specs, user=user)


def spawn_writers(path: str, specs: list[tuple[int, dict[str, Any]]],
                  user: int | None = None) -> list[wl.WriterProcess]:
    """Start writer processes, one per (index, spawn_writer options), and wait until each is
    writing; on any failure none is left running."""
    writers = []
    try:
        for index, options in specs:
            options = dict(options)
            impl, enlist = options.pop("impl", "c"), options.pop("enlist", None)
            writers.append(_spawn(path, index, impl, enlist, user, **options))
        for w in writers:
            w.wait_ready()
    except BaseException:
        for w in writers:
            w.kill()
        raise
    return writers


def _spawn(path: str, index: int, impl: str, enlist: str | None, user: int | None,
           **kwargs: Any) -> wl.WriterProcess:
    if user is None:
        writer = wl.spawn_writer(path, index, impl=impl, enlist=enlist, **kwargs)
        SPAWNED.append(writer.proc)
        return writer
    import shutil
    import subprocess
    import tempfile

    argv = wl.writer_command(path, index, impl=impl, enlist=enlist, **kwargs)
    if impl == "c":  # the build cache is private to root: give the user its own copy
        import atexit

        where = tempfile.mkdtemp(prefix="uffdsnap-writer-")
        atexit.register(shutil.rmtree, where, True)
        os.chmod(where, 0o755)
        argv[0] = shutil.copy(argv[0], where)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, user=user, group=user,
                            extra_groups=[])
    SPAWNED.append(proc)
    return wl.WriterProcess(proc, index, impl)


def stop_writers(path: str, writers: list[wl.WriterProcess]) -> list[int]:
    """Tell every writer to stop; return their final seqs."""
    wl.set_stop(path)
    try:
        return [w.wait() for w in writers]
    finally:
        for w in writers:
            w.kill()


# --- huge pages: reserved by the tests that need them, never assumed ---------------------------

HUGE_PAGE = 2 << 20
HUGEPAGES_PER_TEST = 64  # 128 MiB: every hugetlb test here needs well under this
_HUGE_SYSFS = "/sys/kernel/mm/hugepages/hugepages-2048kB"


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def _set_nr_hugepages(count: int) -> int:
    """Ask the kernel for `count` persistent 2 MiB pages; return how many it now has."""
    with open(f"{_HUGE_SYSFS}/nr_hugepages", "w") as f:
        f.write(str(count))
    return _read_int(f"{_HUGE_SYSFS}/nr_hugepages")


@pytest.fixture
def hugepages() -> Iterator[int]:
    """Reserve HUGEPAGES_PER_TEST more free 2 MiB huge pages for one test (raising the 2 MiB
    pool, the per-size vm.nr_hugepages) and restore the pool afterwards; yields the number of
    free pages. Never skips: CI runs as root and must run the hugetlb tests, so a pool that
    cannot grow fails the test with the reason."""
    try:
        old = _read_int(f"{_HUGE_SYSFS}/nr_hugepages")
        free = _read_int(f"{_HUGE_SYSFS}/free_hugepages")
        added = _set_nr_hugepages(old + HUGEPAGES_PER_TEST) - old
    except OSError as e:
        pytest.fail(f"cannot reserve 2 MiB huge pages through {_HUGE_SYSFS}/nr_hugepages: "
                    f"{e.strerror} (needs root and a kernel with CONFIG_HUGETLBFS)")
    try:
        if added < HUGEPAGES_PER_TEST:
            pytest.fail(f"asked the kernel for {HUGEPAGES_PER_TEST} more 2 MiB huge pages, it "
                        f"found only {added} (memory too fragmented or too small: "
                        f"{_read_int(f'{_HUGE_SYSFS}/free_hugepages')} free)")
        yield free + added
    finally:
        # Give back what we added (not "restore the old value": other runs may be reserving
        # at the same time). Pages still in use stay as surplus until freed.
        if added > 0:
            _set_nr_hugepages(max(_read_int(f"{_HUGE_SYSFS}/nr_hugepages") - added, 0))


@pytest.fixture
def hugetlbfs(tmp_path: Path, hugepages: int) -> Iterator[Path]:
    """A hugetlbfs (2 MiB pages) mounted on a fresh directory for one test, unmounted after
    (lazily if something still holds it, so a failing test cannot leave it behind)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    where = tmp_path / "hugetlbfs"
    where.mkdir()
    if libc.mount(b"none", os.fsencode(where), b"hugetlbfs", 0, b"pagesize=2M") != 0:
        err = ctypes.get_errno()
        pytest.fail(f"mount -t hugetlbfs none {where}: {os.strerror(err)} (needs root, "
                    "CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        if libc.umount2(os.fsencode(where), 0) != 0:
            libc.umount2(os.fsencode(where), 2)  # MNT_DETACH
