"""The workload object from outside: create it, stop its writers, read their seqs; read an image.

Everything here uses pread/pwrite on a live object, never a mapping, so the process that drives
a test is never one of the object's mappers (a snapshot would have to attach to it). The one
exception is hugetlbfs, which has no write(): set_stop() maps the header page for one store.
check_file() maps an *image* (a regular file) read-only, which no snapshot tracks.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

from uffdsnap.errors import UserError
from uffdsnap.workload._check import CheckResult, check_image
from uffdsnap.workload._layout import HEADER_BYTES, Layout

ObjectRef = int | str | os.PathLike[str]

_U64 = struct.Struct("<Q")


def open_object(obj: ObjectRef, flags: int) -> tuple[int, bool]:
    """(fd, whether we opened it, so must close it) for an fd or a path; UserError if neither."""
    if isinstance(obj, int):
        return obj, False
    try:
        return os.open(obj, flags | os.O_CLOEXEC), True
    except OSError as e:
        raise UserError(f"cannot open workload object {os.fspath(obj)}: {e.strerror}") from None


def _pwrite_word(fd: int, offset: int, data: bytes, page_size: int) -> None:
    """pwrite `data` at `offset`; hugetlbfs has no write(), so map that one page there instead."""
    try:
        if os.pwrite(fd, data, offset) == len(data):
            return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
            raise
    start = offset - offset % page_size
    with mmap.mmap(fd, page_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                   offset=start) as mm:
        mm[offset - start:offset - start + len(data)] = data


def _header_layout(fd: int) -> Layout:
    """The layout in the header at fd; UserError if it is not a workload object."""
    try:
        return Layout.from_header(os.pread(fd, HEADER_BYTES, 0))
    except ValueError as e:
        raise UserError(f"not a workload object: {e}") from None


def create_object(target: str | os.PathLike[str], nwriters: int, data_pages: int,
                  page_size: int = 4096) -> tuple[int, int]:
    """Create a workload object, size it and write its header; return (fd, size).

    `target` is a path (contains "/": a /dev/shm or hugetlbfs file, created or truncated) or else
    a memfd name (a memfd is created; a page_size above the base page size makes it MFD_HUGETLB of
    that size). Writers open a memfd as /proc/<pid>/fd/<fd> (see object_path()). The caller owns
    the fd. Raises UserError for a bad layout or an object that cannot be created.
    """
    try:
        layout = Layout(nwriters, data_pages, page_size)
    except ValueError as e:
        raise UserError(f"bad workload layout: {e}") from None
    name = os.fspath(target)
    try:
        if "/" in name:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        else:
            flags = os.MFD_CLOEXEC
            if page_size != mmap.PAGESIZE:
                flags |= os.MFD_HUGETLB | (page_size.bit_length() - 1) << os.MFD_HUGE_SHIFT
            fd = os.memfd_create(name, flags)
    except OSError as e:
        raise UserError(f"cannot create workload object {name}: {e.strerror}") from None
    try:
        os.ftruncate(fd, layout.size)
        _pwrite_word(fd, 0, layout.header_bytes(), page_size)
    except OSError as e:
        os.close(fd)
        raise UserError(f"cannot size workload object {name} to {layout.size} bytes "
                        f"(page size {page_size}): {e.strerror}") from None
    return fd, layout.size


def object_path(fd: int, pid: int | None = None) -> str:
    """The path another process opens to reach this process's fd (memfds have no other name)."""
    return f"/proc/{os.getpid() if pid is None else pid}/fd/{fd}"


def read_layout(obj: ObjectRef) -> Layout:
    """The layout recorded in a live object's header (UserError if it is not a workload)."""
    fd, owned = open_object(obj, os.O_RDONLY)
    try:
        return _header_layout(fd)
    finally:
        if owned:
            os.close(fd)


def set_stop(obj: ObjectRef, stop: bool = True) -> None:
    """Set (or clear) the header's stop word: writers finish their current step and exit."""
    fd, owned = open_object(obj, os.O_RDWR)
    try:
        layout = _header_layout(fd)
        _pwrite_word(fd, layout.stop_offset, _U64.pack(int(stop)), layout.page_size)
    finally:
        if owned:
            os.close(fd)


def read_live_seqs(obj: ObjectRef) -> list[int]:
    """Every writer's published seq in the object now (pread, no mapping)."""
    fd, owned = open_object(obj, os.O_RDONLY)
    try:
        layout = _header_layout(fd)
        return [_U64.unpack(os.pread(fd, 8, layout.counter_offset(i)))[0]
                for i in range(layout.nwriters)]
    finally:
        if owned:
            os.close(fd)


def check_file(path: str | os.PathLike[str], *, max_violations: int = 100) -> CheckResult:
    """check_image() of a file (an image), mapped read-only."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return check_image(b"", max_violations=max_violations)
        with mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            return check_image(mm, max_violations=max_violations)
