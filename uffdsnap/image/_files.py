"""File I/O shared by the writer and the readers: bounded reads, sparse writes, atomic names.

Nothing here knows the manifest's fields; it moves bytes so that images stay sparse (all-zero
blocks are never written, holes are skipped with SEEK_DATA/SEEK_HOLE), no read holds more than
IO_PIECE bytes, and a file appears under its final name only when complete.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator

from uffdsnap.errors import UserError
from uffdsnap.image._format import Extent, ExtentHash, ImageError

IO_PIECE = 4 << 20  # largest read verify/restore/publish ever hold in memory at once
ZERO_BLOCK = 4096  # granularity of sparseness: all-zero blocks of this size are never written

_ZEROS = bytes(ZERO_BLOCK)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset`: pwrite may write less than asked."""
    while data:
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data = data[n:]
        offset += n


def pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`; the file is known to be long enough, so EOF means truncation."""
    while view:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise ImageError(f"image ended early at offset {offset} (truncated while reading?)")
        view = view[n:]
        offset += n


def pieces(fd: int, start: int, end: int, buf: bytearray) -> Iterator[tuple[int, memoryview]]:
    """Read [start, end) through `buf` in pieces; each yielded view is valid until the next."""
    mv = memoryview(buf)
    pos = start
    while pos < end:
        n = min(len(buf), end - pos)
        pread_exact(fd, mv[:n], pos)
        yield pos, mv[:n]
        pos += n


def data_regions(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Ranges within [start, end) that may hold data; holes are skipped with SEEK_DATA/HOLE."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here to EOF
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def nonzero_runs(buf: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) within buf[start:end] made of blocks that are not all zero."""
    run_start = -1
    for i in range(start, end, ZERO_BLOCK):
        n = min(ZERO_BLOCK, end - i)
        zero = buf.startswith(_ZEROS if n == ZERO_BLOCK else _ZEROS[:n], i, i + n)
        if zero and run_start >= 0:
            yield run_start, i
            run_start = -1
        elif not zero and run_start < 0:
            run_start = i
    if run_start >= 0:
        yield run_start, end


def write_nonzero(fd: int, offset: int, buf: bytes | bytearray, n: int) -> int:
    """Write the blocks of buf[:n] that are not all zero at `offset` (the file is sparse, or
    was emptied: zeros there are holes); returns how many bytes were written."""
    written = 0
    mv = memoryview(buf)
    for a, b in nonzero_runs(buf, 0, n):
        pwrite_all(fd, mv[a:b], offset + a)
        written += b - a
    return written


def _first_nonzero(buf: bytes | bytearray, start: int, end: int) -> int | None:
    """Index of the first nonzero byte in buf[start:end], or None."""
    for a, b in nonzero_runs(buf, start, end):
        block = bytes(buf[a:min(b, a + ZERO_BLOCK)])
        return a + len(block) - len(block.lstrip(b"\0"))
    return None


def range_checksum(fd: int, offset: int, length: int, buf: bytearray) -> str:
    """extent_checksum of a file range of any length, read through `buf`."""
    h = ExtentHash()
    for _, piece in pieces(fd, offset, offset + length, buf):
        h.update(piece)
    return h.checksum()


def nonzero_outside(fd: int, extents: tuple[Extent, ...] | list[Extent], size: int,
                     buf: bytearray, limit: int) -> list[int]:
    """First nonzero byte of each gap between extents that has one (at most `limit` of them).

    Gaps are where the object had holes; the writer never writes zeros, so they are holes in the
    image too and cost one lseek each.
    """
    found: list[int] = []
    pos = 0
    for start, end in [(e.offset, e.end) for e in extents] + [(size, size)]:
        if start > pos:  # the gap [pos, start)
            for a, b in data_regions(fd, pos, start):
                hit = _first_nonzero_in_file(fd, a, b, buf)
                if hit is not None:
                    found.append(hit)
                    break
            if len(found) >= limit:
                break
        pos = end
    return found


def _first_nonzero_in_file(fd: int, start: int, end: int, buf: bytearray) -> int | None:
    for pos, piece in pieces(fd, start, end, buf):
        hit = _first_nonzero(buf, 0, len(piece))
        if hit is not None:
            return pos + hit
    return None


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable: the new name lives in the directory, not the file."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_temp(final: str, mode: int = 0o600) -> tuple[str, int]:
    """Create `.NAME.<random>.tmp` beside `final` with O_EXCL; UserError if that is impossible."""
    directory, name = os.path.split(os.path.abspath(final))
    for _ in range(16):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise UserError(f"{final}: directory {directory} does not exist") from None
        except PermissionError:
            raise UserError(f"{final}: cannot create files in {directory}: permission denied"
                            ) from None
        except OSError as e:
            raise UserError(f"{final}: cannot create a file in {directory}: "
                            f"{e.strerror or e}") from None
    raise UserError(f"{final}: could not find a free temporary name in {directory}")


def check_replaceable(path: str) -> None:
    """`path` may be replaced by --force: absent, or a regular file. A FIFO, a device node, a
    directory or a symbolic link is never replaced (the link's target never written through)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path} is a symbolic link; refusing to replace it or write through it")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} exists and is not a regular file; refusing to replace it")


def place(tmp: str, final: str, overwrite: bool) -> None:
    """Give `tmp` its final name; without `overwrite`, never replace a file that exists, and
    with it, only a regular file (check_replaceable)."""
    if overwrite:
        check_replaceable(final)
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic no-clobber, unlike a check followed by rename
    except FileExistsError:
        raise UserError(f"{final} already exists; refusing to overwrite it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(final):  # file system without hard links: best effort
            raise UserError(f"{final} already exists; refusing to overwrite it") from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def unlink_quiet(path: str | None) -> None:
    """Remove a temporary file on a cleanup path, where "already gone" is fine."""
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
