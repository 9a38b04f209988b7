"""The background copy: every page not saved by a fault, read from the object in large windows by
copy threads (the GIL released: the native core reads, claims and stores), holes skipped with
SEEK_DATA, each window's content at T checksummed for the manifest."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from uffdsnap.image import extent_checksum
from uffdsnap.native.libc import KernelError

if TYPE_CHECKING:
    from uffdsnap.image import ImageWriter
    from uffdsnap.native.core import SnapCore

CHUNK_BYTES = 1 << 20
# Copy worker threads: each keeps one CPU busy copying, and a writer blocked on a fault needs a
# CPU for the fault service: leave one free (measured on 2 vCPUs: two workers copy 1.1-1.5x raw
# but push fault service p99 to ~5 ms; one copies at ~raw speed).
COPY_WORKERS = max(1, min(2, (os.cpu_count() or 1) - 1))
HOLE_CLAIM_BYTES = 64 << 20  # holes are claimed in pieces: the core returns runs per piece
PROGRESS_BYTES = 64 << 20  # how often copy workers report progress


def copy_windows(fd: int, size: int, page_size: int,
                 window: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, has_data) covering [0, size), found lazily as the scan advances: whole
    `window`-aligned windows that hold any data (holes inside them read as zeros, which is what
    they were at T), and runs of windows that are holes throughout (SEEK_DATA skips them).
    Copying whole windows keeps a fragmented object as fast as a dense one."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size
        data = min(size, data - data % window)  # the window holding the next data
        if data > pos:
            yield (pos, data - pos, False)
        if data >= size:
            break
        end = min(size, data + window)
        yield (data, end - data, True)
        pos = end


@dataclass(eq=False)
class CopyScan:
    """The copy's windows, shared by the copy worker threads."""

    windows: Iterator[tuple[int, int, bool]]
    size: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    scanned: int = 0
    reported: int = 0

    def next(self) -> tuple[int, int, bool] | None:
        with self.lock:
            return None if self.stop.is_set() else next(self.windows, None)

    def done(self, end: int, length: int) -> int | None:
        """Count a copied window; returns the position to report as progress, if due."""
        with self.lock:
            self.scanned += length
            if end >= self.size or end - self.reported >= PROGRESS_BYTES:
                self.reported = max(self.reported, end)
                return self.reported
            return None


async def copy_all(core: SnapCore, writer: ImageWriter, fd: int, size: int, page_size: int,
                   window: int, failed: trio.Event,
                   progress: Callable[[int, int], None] | None, delay_s: float = 0.0) -> tuple[
                       int, str]:
    """Copy every window of the object through `core` into `writer`, in COPY_WORKERS threads
    that stop at the next window once `failed` is set or we are cancelled. (The core
    un-protects what each window claims, through its one batcher.) Returns (bytes scanned,
    error or "")."""
    scan = CopyScan(copy_windows(fd, size, page_size, window), size)
    errors: list[str] = []
    token = trio.lowlevel.current_trio_token()

    def on_progress(done: int) -> None:  # in a worker thread
        if progress is not None:
            trio.from_thread.run_sync(progress, done, size, trio_token=token)

    async def worker() -> None:
        buf = bytearray(window)  # reused: a fresh one per window page-faults
        error = await trio.to_thread.run_sync(_copy_loop, core, writer, scan, buf, on_progress,
                                              delay_s)
        if error:
            errors.append(error)

    async with trio.open_nursery() as watch:
        watch.start_soon(_set_when_cancelled, scan.stop)
        watch.start_soon(_set_on, failed, scan.stop)
        async with trio.open_nursery() as workers:
            for _ in range(COPY_WORKERS):
                workers.start_soon(worker)
        watch.cancel_scope.cancel()
    return scan.scanned, errors[0] if errors else ""


async def _set_on(event: trio.Event, flag: threading.Event) -> None:
    await event.wait()
    flag.set()


async def _set_when_cancelled(flag: threading.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        flag.set()


def _copy_loop(core: SnapCore, writer: ImageWriter, scan: CopyScan, buf: bytearray,
               progress: Callable[[int], None], delay_s: float) -> str:
    """A copy worker thread: copy windows until the scan ends or stops. Data windows go
    through the core, which reads them, claims their unsaved pages, takes pages saved earlier
    (by faults) from the image and stores the claimed ones; their content at T is checksummed
    here. Hole windows were holes at T (a page filled since then faulted and was saved): only
    their unsaved pages are claimed. Returns an error, or "" when done."""
    try:
        while (window := scan.next()) is not None:
            start, length, is_data = window
            if is_data:
                if delay_s:  # test hook: a deliberately slow scan
                    time.sleep(delay_s)
                view = memoryview(buf)[:length]
                core.copy_window(start, length, view)
                writer.record_extent(start, length, extent_checksum(view))
            else:
                for piece in range(start, start + length, HOLE_CLAIM_BYTES):
                    core.claim(piece, min(HOLE_CLAIM_BYTES, start + length - piece))
            report = scan.done(start + length, length if is_data else 0)
            if report is not None:
                progress(report)
    except KernelError as e:
        scan.stop.set()
        return f"copying: {e}"
    return ""
