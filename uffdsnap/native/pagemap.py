"""PAGEMAP_SCAN (Linux 6.7+): which pages of a range are "written" — for a range registered with
uffd write-protect, the pages whose write-protect bit is clear. Used to check, on the running
kernel, the facts write tracking rests on (tests/system/test_kernel_uffd.py), not on the
snapshot path."""

from __future__ import annotations

import ctypes
import os

from uffdsnap.native.libc import ioctl

PAGEMAP_SCAN = 0xC0606610
PAGE_IS_WRITTEN = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0  # also write-protect what matched (async uffds only)
_VEC = 256


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


def written_pages(pid: int, start: int, length: int, page_size: int,
                  protect_again: bool = False) -> list[int]:
    """Indexes (from `start`) of the pages of [start, start+length) in process `pid` that the
    kernel reports PAGE_IS_WRITTEN; `protect_again`: PM_SCAN_WP_MATCHING."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pages: list[int] = []
        pos, end = start, start + length
        while pos < end:
            vec = (_Region * _VEC)()
            arg = _ScanArg(ctypes.sizeof(_ScanArg), PM_SCAN_WP_MATCHING if protect_again else 0,
                           pos, end, 0, ctypes.addressof(vec), _VEC, 0, 0, PAGE_IS_WRITTEN, 0,
                           PAGE_IS_WRITTEN)
            n = ioctl(fd, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN", f"pid={pid}")
            for r in vec[:n]:
                pages += range((r.start - start) // page_size, (r.end - start) // page_size)
            if arg.walk_end <= pos:
                break
            pos = arg.walk_end
        return pages
    finally:
        os.close(fd)
