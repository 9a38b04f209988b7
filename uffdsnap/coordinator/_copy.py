"""The background copy: every page not saved by a fault, read from the object in large windows by
copy threads (the GIL released: the native core reads, claims and stores), holes skipped with
SEEK_DATA, each window's content at T checksummed for the manifest.

Streamed (`snapshot --to`, `stream_all`): the native core saves into a local staging file
instead of the image; faulted pages are sent from there first (and punched out of it), then one
scan window at a time, each sent before the next is copied, so the scan goes at the link's
pace while faults never wait on it."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from uffdsnap import priority
from uffdsnap.image import extent_checksum
from uffdsnap.native.fileops import punch_hole
from uffdsnap.native.libc import KernelError
from uffdsnap.stats import size_text
from uffdsnap.stream import StreamFailed, StreamSender

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
                   progress: Callable[[int, int], None] | None, delay_s: float = 0.0,
                   windows: Iterator[tuple[int, int, bool]] | None = None) -> tuple[int, str]:
    """Copy every window of the object (or only `windows`: a delta's) through `core` into
    `writer`, in COPY_WORKERS threads that stop at the next window once `failed` is set or we
    are cancelled. (The core un-protects what each window claims, through its one batcher.)
    Returns (bytes scanned, error or "")."""
    if windows is None:
        windows = copy_windows(fd, size, page_size, window)
    scan = CopyScan(windows, size)
    errors: list[str] = []
    token = trio.lowlevel.current_trio_token()

    def on_progress(done: int) -> None:  # in a worker thread
        if progress is not None:
            trio.from_thread.run_sync(progress, done, size, trio_token=token)

    async def worker() -> None:
        buf = bytearray(window)  # reused: a fresh one per window page-faults
        error = await priority.in_worker_thread(_copy_loop, core, writer, scan, buf,
                                                on_progress, delay_s)
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


# ---- streamed: `snapshot --to` ---------------------------------------------------------------

FAULT_BATCH_PAGES = 1024  # faulted pages taken from the core at a time (4 MiB of 4 KiB pages)


@dataclass(eq=False)
class StreamJob:
    """One streamed snapshot: where it goes, and the staging file the core saves into."""

    sender: StreamSender
    staging_fd: int
    staging_bytes: int  # --staging: faulted bytes that may wait to be sent
    object_fields: dict[str, object]  # the HEADER's object (source, kind, dev, inode)
    staging_where: str = ""
    faulted_sent: int = 0  # pages sent from staging
    peak_bytes: int = 0  # the most the staging file held (allocated), sampled at each send
    sent: list[int] = field(default_factory=list)  # faulted pages sent, not punched out yet

    def punch_sent(self, page_size: int, size: int, *, at_least: int = 0) -> None:
        """Punch the faulted pages sent so far out of the staging file once there are
        `at_least` of them: late, so that neighbours sent at different times go in one call
        (a page sent is never written again: it is saved)."""
        if not self.sent or len(self.sent) < at_least:
            return
        self.sent.sort()
        for first, count in _runs(self.sent, len(self.sent)):
            off = first * page_size
            punch_hole(self.staging_fd, off, min(count * page_size, size - off))
        self.sent.clear()

    def fault_limit(self, page_size: int) -> int:
        """The core's limit on faulted pages waiting (one more fails the run: ENOBUFS)."""
        return max(1, self.staging_bytes // page_size)


def staging_overflowed(core: SnapCore) -> bool:
    """After a failed streamed run: did faulted pages overflow the staging bound?"""
    try:
        while core.take_fault_saved(1 << 16):
            pass
    except KernelError as e:
        return e.errno == errno.ENOBUFS
    return False


async def stream_all(core: SnapCore, job: StreamJob, fd: int, size: int, page_size: int,
                     window: int, t_unix_ns: int, failed: trio.Event,
                     progress: Callable[[int, int], None] | None,
                     delay_s: float = 0.0,
                     windows: Iterator[tuple[int, int, bool | None]] | None = None,
                     parent: dict[str, Any] | None = None) -> tuple[int, str]:
    """The streamed copy: HEADER, then window after window (each preceded by the pages
    writers faulted on meanwhile), then the last faulted pages. Returns (bytes scanned, error
    or ""); the caller sends END once the snapshot is proven. A delta (`parent`, and its
    `windows`) sends only the pages written since its parent, zeros included, and a HOLE
    ("as in the parent") for each run between them."""
    sender = job.sender
    scanned, reported = 0, 0
    buf = bytearray(window)  # reused: a fresh one per window page-faults
    if windows is None:
        windows = copy_windows(fd, size, page_size, window)
    try:
        await sender.header(size, page_size, t_unix_ns, job.object_fields, parent)
        for start, length, is_data in windows:
            if failed.is_set():
                return scanned, ""
            await _send_faulted(core, job, size, page_size)
            if is_data is None:  # a delta's: left to the parent
                await sender.hole(start, length)
            elif is_data:
                if delay_s:  # test hook: a deliberately slow scan
                    await trio.sleep(delay_s)
                view = memoryview(buf)[:length]
                # (on this thread: a hand-off to a worker thread per window cost more than
                # the copy itself on a loaded machine, and the copy releases the GIL)
                runs = core.copy_window(start, length, view)
                for a, b in runs:
                    b = min(b, size)
                    await sender.pages(a, view[a - start:b - start])
                    punch_hole(job.staging_fd, a, b - a)  # the core stored them there too
                scanned += length
            else:
                for piece in range(start, start + length, HOLE_CLAIM_BYTES):
                    for a, b in core.claim(piece, min(HOLE_CLAIM_BYTES, start + length - piece)):
                        await sender.hole(a, min(b, size) - a)
            await sender.flush()
            end = start + length
            if progress is not None and (end >= size or end - reported >= PROGRESS_BYTES):
                reported = end
                progress(end, size)
        # every page is saved now: whatever faulted is in the core's list already
        await _send_faulted(core, job, size, page_size)
        await sender.flush()
    except StreamFailed as e:
        return scanned, str(e)
    except KernelError as e:
        if e.errno == errno.ENOBUFS:
            return scanned, staging_full(job)
        return scanned, f"streaming: {e}"
    return scanned, ""


def staging_full(job: StreamJob) -> str:
    return (f"staging full: writers faulted on more than {size_text(job.staging_bytes)} of "
            f"pages faster than the stream to {job.sender.address} took them; raise "
            "--staging (or --max-rate, if set), or snapshot when the writers are quieter")


async def _send_faulted(core: SnapCore, job: StreamJob, size: int, page_size: int) -> None:
    """Send every page saved because of a fault so far, from the staging file, in runs of
    consecutive pages, and punch each out of the file once sent."""
    limit = max(1, (4 << 20) // page_size)
    job.peak_bytes = max(job.peak_bytes, os.fstat(job.staging_fd).st_blocks * 512)
    while pages := core.take_fault_saved(FAULT_BATCH_PAGES):
        for first, count in _runs(sorted(pages), limit):
            off = first * page_size
            length = min(count * page_size, size - off)
            data = _pread_exact(job.staging_fd, length, off)
            await job.sender.pages(off, memoryview(data))
            job.sent.extend(range(first, first + count))
            job.faulted_sent += count
        # the staging file holds at most 1.5x --staging of faulted pages: those waiting, and
        # those sent since the last punch
        job.punch_sent(page_size, size, at_least=max(1, job.fault_limit(page_size) // 2))
        if len(pages) < FAULT_BATCH_PAGES:
            return


def _runs(pages: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """(first page, count) of consecutive pages, at most `limit` each."""
    i = 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and pages[j] == pages[j - 1] + 1 and j - i < limit:
            j += 1
        yield pages[i], j - i
        i = j


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        piece = os.pread(fd, n - got, offset + got)
        if not piece:  # the staging file is the object's size: cannot happen
            raise KernelError("pread", errno.EIO, f"staging, offset={offset + got:#x}")
        parts.append(piece)
        got += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)
