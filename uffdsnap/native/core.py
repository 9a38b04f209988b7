"""ctypes binding of uffdsnap/native/src/snapcore.c (ABI: snapcore.h), the native data path
(one context per snapshot).

The library keeps the `saved` page map, writes the image, copies windows and, in delegated mode,
serves write-protect faults on a thread of its own that never needs the GIL (see the C file for
why and for the rules). Every call here releases the GIL while it runs, so copy workers and the
fault thread run in parallel with the event loop.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from functools import cache

from uffdsnap.errors import UserError
from uffdsnap.native.libc import KernelError

SC_EVENT, SC_GONE, SC_FAILED, SC_UNPROTECT, SC_SAVED = 1, 2, 3, 4, 5
_u64 = ctypes.c_uint64
_p_u64 = ctypes.POINTER(_u64)
_RANGE = struct.Struct("=QQ")


class _Event(ctypes.Structure):
    _fields_ = [("ident", ctypes.c_int64), ("kind", ctypes.c_int32), ("err", ctypes.c_int32),
                ("msg", ctypes.c_ubyte * 32)]


class _Stats(ctypes.Structure):
    _fields_ = [(name, _u64) for name in ("faults", "duplicates", "fault_pages_saved",
                                          "held_wait_max_ns", "service_count",
                                          "service_max_ns")]


@dataclass(frozen=True)
class CoreEvent:
    """What the core hands to Python: a uffd message that needs policy (SC_EVENT, with the raw
    32 bytes), a process gone under a uffd or a channel closed by its peer (SC_GONE), a failure
    (SC_FAILED, errno; ident -1: the run as a whole), a range to un-protect in agents on the
    main connection (SC_UNPROTECT, see `unprotected`), or pages to take with
    `take_fault_saved` (SC_SAVED)."""

    ident: int
    kind: int
    err: int
    msg: bytes

    @property
    def unprotected(self) -> tuple[int, int]:
        """SC_UNPROTECT: the (offset, length) saved and un-protected everywhere else."""
        return _RANGE.unpack_from(self.msg)


@dataclass(frozen=True)
class CoreStats:
    faults: int
    duplicates: int
    fault_pages_saved: int
    held_wait_max_ns: int
    service_max_ns: int
    service_buckets: tuple[tuple[int, int], ...]  # (LatencyHistogram bucket, count)


ABI_VERSION = 5  # snapcore.h's SC_ABI_VERSION
TEST_UNPROTECT_BEFORE_SAVE = 1  # SC_TEST_UNPROTECT_BEFORE_SAVE
FAULT_DEADLINE_MS = 2000  # SC_FAULT_DEADLINE_MS: the default of SnapCore.set_fault_deadline
EVENT_BATCH = 256  # events taken per call


@cache
def _library() -> ctypes.CDLL:
    from uffdsnap.native import core_library

    path = core_library()
    try:
        lib = ctypes.CDLL(str(path), use_errno=True)
    except OSError as e:
        raise UserError(f"cannot load the native core {path}: {e}") from None
    _check_abi(lib, path)
    i, i64, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    sigs = {
        "sc_new": (vp, [i, i, _u64, _u64, vp]),
        "sc_free": (None, [vp]),
        "sc_notify_fd": (i, [vp]),
        "sc_saved": (vp, [vp]),
        "sc_start": (i, [vp]),
        "sc_stop": (None, [vp]),
        "sc_add": (i, [vp, i64, i, i, _p_u64]),
        "sc_set_maps": (i, [vp, i64, i, _p_u64]),
        "sc_resume": (i, [vp, i64]),
        "sc_drain": (i, [vp, i64]),
        "sc_remove": (i, [vp, i64]),
        "sc_go": (None, [vp]),
        "sc_add_channel": (i, [vp, i64, i]),
        "sc_set_forward": (i, [vp, i64, i]),
        "sc_save_page": (i, [vp, _u64]),
        "sc_claim": (i, [vp, _u64, _u64, _p_u64, i]),
        "sc_copy_window": (i, [vp, _u64, _u64, vp, _p_u64, i]),
        "sc_take_events": (i, [vp, ctypes.POINTER(_Event), i]),
        "sc_take_pending": (i, [vp, i64, ctypes.c_char_p, i]),
        "sc_stats": (None, [vp, ctypes.POINTER(_Stats), _p_u64]),
        "sc_hist_buckets": (i, []),
        "sc_set_test_flags": (None, [vp, i]),
        "sc_relay_unprotects": (i, [vp]),
        "sc_set_fault_deadline": (i, [vp, _u64]),
        "sc_set_fault_saved_limit": (i, [vp, _u64]),
        "sc_take_fault_saved": (i, [vp, _p_u64, i]),
        "sc_poll": (i, [vp, i]),
        "sc_track_writes": (i, [vp, vp]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _check_abi(lib: ctypes.CDLL, path: object) -> None:
    """Refuse a library built from other sources than this binding was written for."""
    try:
        version = lib.sc_abi_version()
    except AttributeError:
        version = 0
    event, stats = _u64(), _u64()
    if version == ABI_VERSION:
        lib.sc_abi_sizes(ctypes.byref(event), ctypes.byref(stats))
    if (version, event.value, stats.value) != (ABI_VERSION, ctypes.sizeof(_Event),
                                               ctypes.sizeof(_Stats)):
        raise UserError(f"the native core {path} does not match this uffdsnap (ABI "
                        f"{version}, expected {ABI_VERSION}): reinstall uffdsnap (in a source "
                        "checkout, `pip install -e .` rebuilds it)")


def load() -> None:
    """Load the library (once); UserError, one line, if it is missing or does not match."""
    _library()


def _check(call: str, ret: int, detail: str = "") -> int:
    if ret < 0:
        raise KernelError(call, -ret, detail, hint="")
    return ret


def _maps_array(maps: list[tuple[int, int, int]]) -> ctypes.Array[ctypes.c_uint64]:
    flat = [v for m in maps for v in m]
    return (_u64 * max(1, len(flat)))(*flat)


class SnapCore:
    """One snapshot's native data path over the object `obj_fd` and the image `img_fd`.

    An agent's core (`SnapCore.for_agent`) has neither: it forwards its process's faults over a
    fault channel (`forward`) and applies the un-protects that come back."""

    @classmethod
    def for_agent(cls, page_size: int) -> SnapCore:
        return cls(-1, -1, 0, page_size)

    def __init__(self, obj_fd: int, img_fd: int, size: int, page_size: int):
        self._lib = _library()
        self.page_size = page_size
        self.npages = -(-size // page_size) if page_size > 0 else 0  # the last may be partial
        # The saved map is ours (the core writes it while it lives), so that every view of it,
        # slices included, stays valid after close(): it then reads the final map.
        array = (ctypes.c_ubyte * max(1, self.npages))()
        ptr = self._lib.sc_new(obj_fd, img_fd, size, page_size,
                               ctypes.addressof(array) if obj_fd >= 0 else None)
        if not ptr:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                raise ValueError(f"snapcore: bad geometry (size {size}, page size {page_size})")
            raise MemoryError(f"snapcore: cannot allocate the context: {describe_error(err)}")
        self._ptr: int | None = ptr
        # One byte per page, 0 → 1 once: a 1 read without the lock is final.
        self.saved = memoryview(array).cast("B")
        self.written: memoryview | None = None  # see track_writes
        self.notify_fd: int = self._lib.sc_notify_fd(ptr)

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError("snapcore context is closed")
        return self._ptr

    def close(self) -> None:
        """Stop the fault thread and free everything (the uffds stay open: they are Python's)."""
        if self._ptr is not None:
            self._lib.sc_free(self._ptr)
            self._ptr = None

    def start(self) -> None:
        _check("snapcore start", self._lib.sc_start(self._p()))

    def stop(self) -> None:
        if self._ptr is not None:
            self._lib.sc_stop(self._ptr)

    def go(self) -> None:
        """T: serve the held faults, then every fault as it comes."""
        self._lib.sc_go(self._p())

    def add(self, ident: int, uffd: int, maps: list[tuple[int, int, int]]) -> None:
        """Serve the faults of a delegated uffd whose mappings are (address, length, offset)."""
        _check("snapcore add", self._lib.sc_add(self._p(), ident, uffd, len(maps),
                                                _maps_array(maps)), f"uffd={uffd}")
        self.start()

    def add_channel(self, ident: int, sock: int) -> None:
        """Coordinator: serve the faults an agent forwards over the fault channel `sock`."""
        _check("snapcore add_channel", self._lib.sc_add_channel(self._p(), ident, sock))
        self.start()

    def forward(self, ident: int, sock: int) -> None:
        """Agent: forward faults over the fault channel `sock`, apply what comes back."""
        _check("snapcore forward", self._lib.sc_set_forward(self._p(), ident, sock))
        self.start()

    def set_maps(self, ident: int, maps: list[tuple[int, int, int]]) -> None:
        _check("snapcore set_maps", self._lib.sc_set_maps(self._p(), ident, len(maps),
                                                          _maps_array(maps)))

    def resume(self, ident: int) -> None:
        self._lib.sc_resume(self._p(), ident)

    def drain(self, ident: int) -> int:
        """Read a delegated uffd's pending messages into the core (after an EAGAIN)."""
        return _check("snapcore drain", self._lib.sc_drain(self._p(), ident))

    def remove(self, ident: int) -> None:
        """Stop using a delegated uffd or a channel; the caller may close it afterwards."""
        if self._ptr is not None:
            self._lib.sc_remove(self._ptr, ident)

    def save_page(self, page: int) -> bool:
        """Save one page if it is not saved yet; True if this call saved it."""
        return bool(_check("saving page", self._lib.sc_save_page(self._p(), page),
                           f"offset={page * self.page_size:#x}"))

    def _runs(self, fn: object, *args: object, length: int) -> list[tuple[int, int]]:
        cap = length // self.page_size // 2 + 1
        runs = (_u64 * (2 * cap))()
        n = fn(self._p(), *args, runs, cap)  # type: ignore[operator]
        _check("snapcore copy", n, f"offset={args[0]:#x}, length={length}")
        return [(runs[2 * i], runs[2 * i + 1]) for i in range(n)]

    def claim(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Mark the unsaved pages of a range saved (a hole: zero in the image already);
        returns them as (start, end) runs, un-protected in every delegated uffd."""
        return self._runs(self._lib.sc_claim, offset, length, length=length)

    def copy_window(self, offset: int, length: int,
                    buf: bytearray | memoryview) -> list[tuple[int, int]]:
        """Fill `buf` (writable, `length` bytes) with the window's content at T and store its
        unsaved pages; returns the runs it claimed (un-protected in every delegated uffd and
        sent on every fault channel already)."""
        if len(buf) < length:
            raise ValueError(f"buffer of {len(buf)} bytes for a window of {length}")
        cbuf = (ctypes.c_char * length).from_buffer(buf)
        return self._runs(self._lib.sc_copy_window, offset, length, cbuf, length=length)

    def take_events(self, limit: int = EVENT_BATCH) -> list[CoreEvent]:
        """Up to `limit` queued events, in order (the core notifies again while more wait)."""
        out = (_Event * max(1, limit))()
        n = _check("snapcore events", self._lib.sc_take_events(self._p(), out, limit))
        return [CoreEvent(e.ident, e.kind, e.err, bytes(e.msg)) for e in out[:n]]

    def take_all_events(self) -> list[CoreEvent]:
        """Every queued event, in order (at the end of a run: none may be left behind)."""
        out: list[CoreEvent] = []
        while True:
            got = self.take_events()
            out += got
            if len(got) < EVENT_BATCH:
                return out

    def take_pending(self, ident: int) -> list[bytes]:
        """The uffd messages the core read but did not handle, in order: after stop(), or of a
        uffd it reported gone (it handles none of its messages any more)."""
        out: list[bytes] = []
        while True:
            buf = ctypes.create_string_buffer(32 * 256)
            n = self._lib.sc_take_pending(self._p(), ident, buf, 256)
            out += [buf.raw[32 * i:32 * (i + 1)] for i in range(n)]
            if n < 256:
                return out

    def relay_unprotects(self) -> None:
        """From now on also hand Python every range un-protected everywhere (SC_UNPROTECT
        events, coalesced), for agents without a fault channel: one batcher for everyone."""
        _check("snapcore relay", self._lib.sc_relay_unprotects(self._p()))

    def set_fault_deadline(self, seconds: float) -> None:
        """How long un-protects may wait for a fault-channel peer that does not read them
        (default FAULT_DEADLINE_MS): past it the peer is dropped and the run fails (SC_FAILED,
        ETIMEDOUT), which releases everyone. From 1 ms to an hour."""
        _check("snapcore deadline", self._lib.sc_set_fault_deadline(
            self._p(), max(0, round(seconds * 1000))), f"{seconds} s")

    def set_fault_saved_limit(self, n: int) -> None:
        """Record the pages saved because of faults for `take_fault_saved`, at most `n`
        waiting; 0 (the default) turns recording off and drops what waits. One page more than
        `n` fails the run (SC_FAILED, ENOBUFS)."""
        if n < 0:
            raise ValueError(f"a limit of {n} pages")
        _check("snapcore fault-saved limit", self._lib.sc_set_fault_saved_limit(self._p(), n))

    def take_fault_saved(self, max: int) -> list[int]:  # (`max`: the C API's name)
        """Up to `max` page numbers saved because of faults (delegated uffds, fault channels,
        save_page) since the last call, in the order they were saved. An SC_SAVED event says
        there are some again. KernelError(ENOBUFS) once the limit was exceeded and what was
        recorded before is taken."""
        out = (_u64 * (max if max > 0 else 1))()
        n = _check("snapcore fault-saved pages", self._lib.sc_take_fault_saved(self._p(), out,
                                                                                max))
        return list(out[:n])

    def poll(self, timeout: float = 0.0) -> None:
        """Without a fault thread: do one round of its work here, waiting at most `timeout`."""
        _check("snapcore poll", self._lib.sc_poll(self._p(), max(0, round(timeout * 1000))))

    def track_writes(self) -> memoryview:
        """Incremental snapshots: the scan's saves keep their pages protected from now on, and
        the returned map (one byte per page, ours like `saved`) gets a 1 for every page a fault
        is served for (Python marks the faults it serves itself)."""
        array = (ctypes.c_ubyte * max(1, self.npages))()
        _check("snapcore track_writes", self._lib.sc_track_writes(self._p(),
                                                                   ctypes.addressof(array)))
        self.written = memoryview(array).cast("B")
        return self.written

    def set_test_flags(self, flags: int) -> None:
        """Deliberately wrong behaviours for tests' negative controls (TEST_*)."""
        self._lib.sc_set_test_flags(self._p(), flags)

    def stats(self) -> CoreStats:
        st = _Stats()
        hist = (_u64 * self._lib.sc_hist_buckets())()
        self._lib.sc_stats(self._p(), ctypes.byref(st), hist)
        return CoreStats(st.faults, st.duplicates, st.fault_pages_saved, st.held_wait_max_ns,
                         st.service_max_ns,
                         tuple((b, int(n)) for b, n in enumerate(hist) if n))


def describe_error(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
