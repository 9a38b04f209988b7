"""File calls Python's os module lacks: fallocate(2) with flags (punching holes)."""

from __future__ import annotations

import ctypes

from uffdsnap.native.libc import KernelError, libc

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_fallocate = libc.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of [offset, offset+length) in the file `fd` (they read as zeros after),
    keeping its size. KernelError if the file system cannot."""
    if length <= 0:
        return
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise KernelError("fallocate(PUNCH_HOLE)", ctypes.get_errno(),
                          f"offset={offset:#x}, length={length}", hint="")
