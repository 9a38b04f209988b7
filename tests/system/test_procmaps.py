"""Discovery of who maps a shared-memory object, and opening that object read-only.

The coordinator finds every mapper of an object by (device, inode) in /proc/PID/maps, in every
process, however each maps it (at any address, partially, several times); it must not count
private mappings (they never write to the object) or other objects. Mapping processes are real
separate processes; run as a script, this file is one of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from uffdsnap.procfs import (
    HUGETLBFS_MAGIC,
    TMPFS_MAGIC,
    ObjectError,
    ObjectId,
    filesystem_type,
    find_mappers,
    mappings_of,
    open_object,
    read_maps,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT = 10.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: /proc/PID/map_files is "
                                "CAP_SYS_ADMIN-only; CI runs as root")


# ---- a mapping process ----------------------------------------------------------------------


def mapper_main(spec: str) -> None:
    """Create the mappings in `spec` (JSON list of {fd, offset, length, shared, writable, fill})
    with mmap(2), print their [start, end) as one JSON line, then hold them until stdin closes."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    regions = []
    for m in json.loads(spec):
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if m.get("writable", True) else 0)
        flags = mmap.MAP_SHARED if m.get("shared", True) else mmap.MAP_PRIVATE
        fd = m.get("fd", -1)
        if fd < 0:
            flags |= mmap.MAP_ANONYMOUS
        address = libc.mmap(None, m["length"], prot, flags, fd, m.get("offset", 0))
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {m}")
        if "fill" in m:
            ctypes.memset(address, m["fill"], m["length"])
        regions.append({"start": address, "end": address + m["length"]})
    print(json.dumps(regions), flush=True)
    sys.stdin.read()


class Mapper:
    """A running mapping process and the regions it reported."""

    def __init__(self, mappings: list[dict[str, Any]], pass_fds: tuple[int, ...] = ()):
        self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(mappings)],
                                     pass_fds=pass_fds, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the child prints once its mappings exist
        assert line, "mapping process failed"
        self.regions: list[dict[str, int]] = json.loads(line)
        self.pid = self.proc.pid

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _memfd(name: str, pages: int) -> int:
    fd = os.memfd_create(name, 0)  # inheritable: passed to mapping processes by number
    os.ftruncate(fd, pages * PAGE)
    return fd


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = _memfd("procmaps-test", 6)
    yield fd
    os.close(fd)


# ---- discovery ------------------------------------------------------------------------------


def test_find_mappers_every_mapping_in_every_process(memfd: int) -> None:
    """Three processes: one maps all of it (plus a private mapping of it and a shared mapping
    of another memfd), one a middle part, one twice (once read-only). Every shared mapping of
    our object is found with its address, length and file offset; nothing else is."""
    other = _memfd("procmaps-other", 2)
    obj = ObjectId.from_stat(os.fstat(memfd))
    fds = (memfd, other)
    try:
        with Mapper([{"fd": memfd, "length": 4 * PAGE},
                     {"fd": memfd, "length": 2 * PAGE, "shared": False},
                     {"fd": other, "length": 2 * PAGE}], fds) as whole, \
             Mapper([{"fd": memfd, "offset": PAGE, "length": 2 * PAGE}], fds) as part, \
             Mapper([{"fd": memfd, "length": 4 * PAGE},
                     {"fd": memfd, "offset": 2 * PAGE, "length": 2 * PAGE,
                      "writable": False}], fds) as twice:
            found = find_mappers(obj)
            assert set(found) == {whole.pid, part.pid, twice.pid}

            def spans(pid: int) -> set[tuple[int, int, int]]:
                return {(m.start, m.end, m.offset) for m in found[pid]}

            w, p, t = whole.regions, part.regions, twice.regions
            assert spans(whole.pid) == {(w[0]["start"], w[0]["end"], 0)}
            assert spans(part.pid) == {(p[0]["start"], p[0]["end"], PAGE)}
            assert spans(twice.pid) == {(t[0]["start"], t[0]["end"], 0),
                                        (t[1]["start"], t[1]["end"], 2 * PAGE)}
            assert t[0]["start"] != t[1]["start"]
            for maps in found.values():
                for m in maps:
                    assert m.object_id == obj and m.shared
                    assert m.path.startswith("/memfd:procmaps-test")
            assert [m.writable for m in sorted(found[twice.pid], key=lambda m: m.offset)] == \
                [True, False]

            (mid,) = found[part.pid]  # object offsets <-> this process's addresses
            assert mid.length == 2 * PAGE
            assert mid.address_of(0) is None and mid.address_of(3 * PAGE) is None
            assert mid.address_of(PAGE + 7) == mid.start + 7
            assert mid.offset_of(mid.start + PAGE + 1) == 2 * PAGE + 1
            assert mid.offset_of(mid.end) is None

            assert set(find_mappers(obj, exclude={part.pid})) == {whole.pid, twice.pid}
            assert mappings_of(whole.pid, obj) == found[whole.pid]
            other_obj = ObjectId.from_stat(os.fstat(other))
            assert set(find_mappers(other_obj)) == {whole.pid}
        assert find_mappers(obj) == {}  # gone with their processes
    finally:
        os.close(other)


def test_read_maps_of_a_vanished_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        read_maps(proc.pid)


# ---- opening the object ---------------------------------------------------------------------


def test_open_dev_shm_path() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    path = f"/dev/shm/uffdsnap-procmaps-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(b"x" * (3 * PAGE + 5))
    try:
        obj = open_object(path)
        try:
            assert obj.size == 3 * PAGE + 5 and obj.page_size == PAGE and not obj.hugetlb
            assert obj.object_id == ObjectId.from_stat(os.stat(path)) and obj.spec == path
            assert os.pread(obj.fd, 2, 3 * PAGE + 3) == b"xx"
            with pytest.raises(OSError):
                os.write(obj.fd, b"no")  # read-only: the coordinator never writes
        finally:
            obj.close()
    finally:
        os.unlink(path)


def test_open_memfd_of_another_process(memfd: int) -> None:
    os.pwrite(memfd, b"data", 5 * PAGE)
    with Mapper([{"fd": memfd, "length": PAGE}], (memfd,)) as m:
        obj = open_object(f"/proc/{m.pid}/fd/{memfd}")
        try:
            assert obj.object_id == ObjectId.from_stat(os.fstat(memfd))
            assert obj.size == 6 * PAGE and obj.page_size == PAGE and not obj.hugetlb
            assert os.pread(obj.fd, 4, 5 * PAGE) == b"data"
            assert set(find_mappers(obj.object_id)) == {m.pid}
        finally:
            obj.close()


@needs_root
def test_open_map_files_of_shared_anonymous_memory() -> None:
    """MAP_SHARED|MAP_ANONYMOUS memory has no name; /proc/PID/map_files/START-END opens it, and
    the identity found that way is the one its mappers show in /proc/PID/maps."""
    with Mapper([{"length": 3 * PAGE, "fill": 0x5A}]) as m:
        (region,) = m.regions
        spec = f"/proc/{m.pid}/map_files/{region['start']:x}-{region['end']:x}"
        obj = open_object(spec)
        try:
            assert obj.size == 3 * PAGE and obj.page_size == PAGE and not obj.hugetlb
            assert os.pread(obj.fd, 1, 2 * PAGE) == b"\x5a"
            found = find_mappers(obj.object_id)
            assert set(found) == {m.pid}
            (mapping,) = found[m.pid]
            assert (mapping.start, mapping.end, mapping.offset) == (region["start"],
                                                                    region["end"], 0)
            assert mapping.path == "/dev/zero (deleted)"
        finally:
            obj.close()


def test_open_hugetlb_memfd() -> None:
    try:
        fd = os.memfd_create("procmaps-huge", os.MFD_HUGETLB)
    except OSError as e:
        pytest.skip(f"no MFD_HUGETLB memfd here: {e.strerror}")
    try:
        huge = os.fstat(fd).st_blksize
        os.ftruncate(fd, 2 * huge)
        obj = open_object(f"/proc/self/fd/{fd}")
        try:
            assert obj.hugetlb and obj.page_size == huge > PAGE and obj.size == 2 * huge
            assert filesystem_type(obj.fd) == HUGETLBFS_MAGIC
        finally:
            obj.close()
    finally:
        os.close(fd)


def _one_line_error(spec: str) -> str:
    with pytest.raises(ObjectError) as e:
        open_object(spec)
    text = str(e.value)
    assert "\n" not in text and text.startswith(spec)
    assert isinstance(e.value, ValueError)
    return text


def test_rejects_regular_file_on_disk() -> None:
    """A file on a disk file system is not shared memory: uffd-wp would not cover it."""
    fd = os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if filesystem_type(fd) in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
            pytest.skip("this checkout lives on tmpfs")
    finally:
        os.close(fd)
    assert "not shared memory" in _one_line_error(__file__)


def test_rejects_missing_path_directory_and_pipe(tmp_path: Path) -> None:
    assert "no such object" in _one_line_error(str(tmp_path / "nope"))
    assert "not a regular" in _one_line_error("/dev/shm" if os.path.isdir("/dev/shm")
                                              else str(tmp_path))
    r, w = os.pipe()
    try:
        assert "not a regular" in _one_line_error(f"/proc/self/fd/{r}")
    finally:
        os.close(r)
        os.close(w)
    a, b = socket.socketpair()
    with a, b:
        assert "cannot open" in _one_line_error(f"/proc/self/fd/{a.fileno()}")


if __name__ == "__main__":
    mapper_main(sys.argv[1])
