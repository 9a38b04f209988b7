"""The consistency-checker workload: writers whose memory proves whether an image is one instant.

A shared-memory object (memfd, /dev/shm file, hugetlbfs file) is laid out as a header page and,
per writer, a counter page followed by D data pages. Writer i's step k fills data page
p(k) = (k*A_i + B_i) mod D with the stamp (tag | i << 40 | k), records the seqs it saw of every
writer in its counter page, and publishes seq = k last. check_image() then proves (or refutes)
that an image holds the object as it was at one instant T: every data page holds exactly the
stamp the writer's published seq implies, apart from the one step possibly in flight at T; and no
writer has observed another further along than the image shows that other. docs/workload.md has
the full design.

Writers come in two implementations with the same layout: uffdsnap/native/src/writer.c (an
unmodified native program, shipped in the package as uffdsnap-writer) and PythonWriter /
run_python_writer() here, the writer for code that enlists through uffdsnap's Python API.
`python -m uffdsnap.workload` runs the Python writer with the native writer's command line.

Nothing in this module keeps a mapping of a live object: create_object, set_stop and read_live_seqs
use pread/pwrite, so the process that drives a test is never one of the object's mappers.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from uffdsnap.errors import UserError

MAGIC = int.from_bytes(b"UFSNAPWL", "little")
VERSION = 1
STAMP_TAG = 0xA5
STEP_BITS = 40
STEP_MAX = (1 << STEP_BITS) - 1
WRITER_BITS = 16
MAX_WRITERS = 252  # counter entries fit a 4 KiB page: 8 + 2 * 252 words

# Header words (page 0). The stop word is control, not state: the checker ignores it.
H_MAGIC, H_VERSION, H_NWRITERS, H_DATA_PAGES, H_PAGE_SIZE, H_STOP = range(6)
HEADER_WORDS = 6
HEADER_BYTES = 8 * HEADER_WORDS
# Counter page words. Entry j of the observation vector is the pair (value, step) at C_OBS + 2j.
C_SEQ, C_IMPL, C_PID, C_OBS = 0, 1, 2, 8
IMPLS = {0: "unknown", 1: "c", 2: "python"}
IMPL_PYTHON = 2

_U64 = struct.Struct("<Q")


class WorkloadError(RuntimeError):
    """A writer process failed to start, misbehaved, or did not finish in time."""


# --- the step/page arithmetic (pure) ---------------------------------------------------------

def multiplier(index: int, data_pages: int) -> int:
    """A_i: odd, so k -> k*A_i + B_i mod D visits every page once in any D consecutive steps."""
    return ((((2 * index + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 32 | 1) \
        & (data_pages - 1)


def addend(index: int, data_pages: int) -> int:
    """B_i: the page of step 0 (a step that never happens; it only offsets the sequence)."""
    return ((((index + 1) * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF) >> 32) & (data_pages - 1)


def stamp(index: int, step: int) -> int:
    """The u64 word writer `index` fills its data page with at step `step` (step >= 1)."""
    return STAMP_TAG << 56 | index << STEP_BITS | step


def decode_stamp(word: int) -> tuple[int, int] | None:
    """(writer, step) of a stamp word, or None if the word is not a stamp."""
    if word >> 56 != STAMP_TAG:
        return None
    return (word >> STEP_BITS) & ((1 << WRITER_BITS) - 1), word & STEP_MAX


def page_for_step(index: int, step: int, data_pages: int) -> int:
    """The data page writer `index` fills at step `step`."""
    return (step * multiplier(index, data_pages) + addend(index, data_pages)) & (data_pages - 1)


def last_step(index: int, page: int, seq: int, data_pages: int) -> int:
    """The last step <= seq at which writer `index` filled `page`; 0 if none did (O(1)).

    Steps choosing `page` are exactly those k = (page - B_i) * A_i^-1 (mod D), one in every D.
    """
    mask = data_pages - 1
    inverse = pow(multiplier(index, data_pages), -1, data_pages) if data_pages > 1 else 0
    residue = ((page - addend(index, data_pages)) * inverse) & mask
    step = seq - ((seq - residue) & mask)
    return step if step > 0 else 0


def max_writers(page_size: int) -> int:
    """How many writers' observation entries fit one counter page (capped at MAX_WRITERS)."""
    return min(MAX_WRITERS, (page_size // 8 - C_OBS) // 2)


@dataclass(frozen=True)
class Layout:
    """Where everything is in a workload object. All offsets are byte offsets into the object."""

    nwriters: int
    data_pages: int
    page_size: int = 4096

    def __post_init__(self) -> None:
        ps, d, n = self.page_size, self.data_pages, self.nwriters
        if ps < 4096 or ps & (ps - 1):
            raise ValueError(f"page_size {ps} is not a power of two >= 4096")
        if d < 1 or d & (d - 1):
            raise ValueError(f"data_pages {d} is not a power of two >= 1")
        if not 1 <= n <= max_writers(ps):
            raise ValueError(f"nwriters {n} is not in 1..{max_writers(ps)}")

    @property
    def words_per_page(self) -> int:
        return self.page_size // 8

    @property
    def region_size(self) -> int:
        """Bytes per writer: one counter page and D data pages."""
        return (1 + self.data_pages) * self.page_size

    @property
    def size(self) -> int:
        """Bytes in the object: the header page and every writer's region."""
        return self.page_size + self.nwriters * self.region_size

    @property
    def stop_offset(self) -> int:
        return 8 * H_STOP

    def region_offset(self, index: int) -> int:
        return self.page_size + index * self.region_size

    def counter_offset(self, index: int) -> int:
        return self.region_offset(index)

    def data_offset(self, index: int, page: int) -> int:
        return self.region_offset(index) + (1 + page) * self.page_size

    def obs_offset(self, index: int, other: int) -> int:
        """Offset of the value word of writer `index`'s observation of writer `other`."""
        return self.counter_offset(index) + 8 * (C_OBS + 2 * other)

    def locate(self, offset: int) -> str:
        """Human name of the page holding `offset` ("header", "writer 2 counter", ...)."""
        if offset < self.page_size:
            return "header"
        index, rest = divmod(offset - self.page_size, self.region_size)
        if index >= self.nwriters:
            return "past the end"
        page = rest // self.page_size
        return f"writer {index} counter" if page == 0 else f"writer {index} data page {page - 1}"

    def header_bytes(self) -> bytes:
        return struct.pack(f"<{HEADER_WORDS}Q", MAGIC, VERSION, self.nwriters, self.data_pages,
                           self.page_size, 0)

    @classmethod
    def from_header(cls, header: bytes | bytearray | memoryview) -> Layout:
        """Parse the header; ValueError (with the reason) if it is not a workload header."""
        if len(header) < HEADER_BYTES:
            raise ValueError(f"header too short ({len(header)} bytes)")
        words = struct.unpack_from(f"<{HEADER_WORDS}Q", header)
        if words[H_MAGIC] != MAGIC:
            raise ValueError(f"bad magic {words[H_MAGIC]:#x} (not a workload object)")
        if words[H_VERSION] != VERSION:
            raise ValueError(f"unsupported workload version {words[H_VERSION]}")
        return cls(words[H_NWRITERS], words[H_DATA_PAGES], words[H_PAGE_SIZE])


# --- the object: create, stop, read seqs (pread/pwrite only) ---------------------------------

ObjectRef = int | str | os.PathLike[str]


def _open(obj: ObjectRef, flags: int) -> tuple[int, bool]:
    """(fd, whether we opened it) for an fd or a path."""
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
    fd, owned = _open(obj, os.O_RDONLY)
    try:
        header = os.pread(fd, HEADER_BYTES, 0)
    finally:
        if owned:
            os.close(fd)
    try:
        return Layout.from_header(header)
    except ValueError as e:
        raise UserError(f"not a workload object: {e}") from None


def set_stop(obj: ObjectRef, stop: bool = True) -> None:
    """Set (or clear) the header's stop word: writers finish their current step and exit."""
    fd, owned = _open(obj, os.O_RDWR)
    try:
        header = os.pread(fd, HEADER_BYTES, 0)
        try:
            layout = Layout.from_header(header)
        except ValueError as e:
            raise UserError(f"not a workload object: {e}") from None
        _pwrite_word(fd, layout.stop_offset, _U64.pack(int(stop)), layout.page_size)
    finally:
        if owned:
            os.close(fd)


def read_live_seqs(obj: ObjectRef) -> list[int]:
    """Every writer's published seq in the object now (pread, no mapping)."""
    fd, owned = _open(obj, os.O_RDONLY)
    try:
        try:
            layout = Layout.from_header(os.pread(fd, HEADER_BYTES, 0))
        except ValueError as e:
            raise UserError(f"not a workload object: {e}") from None
        return [_U64.unpack(os.pread(fd, 8, layout.counter_offset(i)))[0]
                for i in range(layout.nwriters)]
    finally:
        if owned:
            os.close(fd)


# --- the Python writer -----------------------------------------------------------------------

@dataclass
class _View:
    """One complete set of u64 views a writer works through (header, counters, its data)."""

    hdr: memoryview
    ctr: list[memoryview]
    data: memoryview


def _view_of(whole: memoryview, layout: Layout, index: int) -> _View:
    """Views into a u64 memoryview of the whole object."""
    w = layout.words_per_page
    ctr = [whole[layout.counter_offset(j) // 8:layout.counter_offset(j) // 8 + w]
           for j in range(layout.nwriters)]
    d0 = layout.data_offset(index, 0) // 8
    return _View(whole[:w], ctr, whole[d0:d0 + layout.data_pages * w])


class PythonWriter:
    """Writer `index` of the workload, stepping through memory given to it as u64 views.

    Build it with from_buffer() (any writable buffer holding the whole object: a bytearray for
    tests, an mmap) or let run_python_writer() map an object. `mappings` lists the (mmap, file
    offset) pairs this writer maps, for code that must register them (enlisting).
    """

    def __init__(self, layout: Layout, index: int, views: Sequence[_View],
                 mappings: Sequence[tuple[mmap.mmap, int]] = ()) -> None:
        if not 0 <= index < layout.nwriters:
            raise UserError(f"writer index {index} out of range: the object has "
                            f"{layout.nwriters} writers")
        self.layout = layout
        self.index = index
        self.mappings = list(mappings)
        self._views = list(views)
        self.seq: int = self._views[0].ctr[index][C_SEQ]  # resume where a writer i left off

    @classmethod
    def from_buffer(cls, buf: Any, index: int, *, views: int = 1) -> PythonWriter:
        """A writer over a writable buffer holding the whole object (header already written)."""
        whole = memoryview(buf).cast("B")
        layout = Layout.from_header(whole[:HEADER_BYTES])
        q = whole[:layout.size].cast("Q")
        return cls(layout, index, [_view_of(q, layout, index) for _ in range(views)])

    def mark(self) -> None:
        """Record in the counter page that a Python writer in this process owns it."""
        ctr = self._views[0].ctr[self.index]
        ctr[C_IMPL] = IMPL_PYTHON
        ctr[C_PID] = os.getpid()

    def stopped(self) -> bool:
        return self._views[0].hdr[H_STOP] != 0

    def step(self) -> int:
        """Do one step (read seqs, fill the page, publish the counter); return the new seq."""
        k = self.seq + 1
        if k > STEP_MAX:
            raise WorkloadError(f"writer {self.index}: step counter exhausted")
        view = self._views[k % len(self._views)]
        obs = [c[C_SEQ] for c in view.ctr]                                     # a)
        words = self.layout.words_per_page
        base = page_for_step(self.index, k, self.layout.data_pages) * words    # b)
        data = view.data
        word = stamp(self.index, k)
        for x in range(base, base + words):  # one aligned 8-byte store at a time, front to back
            data[x] = word
        ctr = view.ctr[self.index]                                              # c)
        for j, value in enumerate(obs):
            ctr[C_OBS + 2 * j] = value
            ctr[C_OBS + 2 * j + 1] = k
        ctr[C_SEQ] = k  # published last
        self.seq = k
        return k

    def run(self, *, rate: float | None = None, max_ops: int | None = None) -> int:
        """Step until the stop word is set or `max_ops` steps are done; return the final seq.

        `rate` limits steps per second (paced against the start time; no limit if None/0).
        """
        start = time.monotonic()
        ops = 0
        while not self.stopped() and (max_ops is None or ops < max_ops):
            if rate:
                delay = start + ops / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.step()
            ops += 1
        return self.seq

    def close(self) -> None:
        """Drop the views and unmap whatever this writer mapped."""
        self._views.clear()
        for mm, _ in self.mappings:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view into it; the GC will unmap it
                pass
        self.mappings.clear()


def _map(fd: int, offset: int, length: int) -> tuple[mmap.mmap, memoryview]:
    mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    return mm, memoryview(mm).cast("Q")


def open_python_writer(obj: ObjectRef, index: int, *, map_twice: bool = False,
                       partial: bool = False) -> PythonWriter:
    """Map the object (whole, or with `partial` only the pages writer `index` touches; with
    `map_twice` two independent sets of mappings that steps alternate between)."""
    fd, owned = _open(obj, os.O_RDWR)
    try:
        layout = read_layout(fd)
        if os.fstat(fd).st_size < layout.size:
            raise UserError(f"workload object is smaller than its header says ({layout.size})")
        if not 0 <= index < layout.nwriters:
            raise UserError(f"writer index {index} out of range: the object has "
                            f"{layout.nwriters} writers")
        views: list[_View] = []
        mappings: list[tuple[mmap.mmap, int]] = []
        for _ in range(2 if map_twice else 1):
            if not partial:
                mm, q = _map(fd, 0, layout.size)
                mappings.append((mm, 0))
                views.append(_view_of(q, layout, index))
                continue
            mm, hdr = _map(fd, 0, layout.page_size)
            mappings.append((mm, 0))
            mm, own = _map(fd, layout.region_offset(index), layout.region_size)
            mappings.append((mm, layout.region_offset(index)))
            ctr: list[memoryview] = []
            for j in range(layout.nwriters):
                if j == index:
                    ctr.append(own[:layout.words_per_page])
                else:
                    mm, c = _map(fd, layout.counter_offset(j), layout.page_size)
                    mappings.append((mm, layout.counter_offset(j)))
                    ctr.append(c)
            views.append(_View(hdr, ctr, own[layout.words_per_page:]))
    finally:
        if owned:
            os.close(fd)
    return PythonWriter(layout, index, views, mappings)


def run_python_writer(obj: ObjectRef, index: int, *, rate: float | None = None,
                      max_ops: int | None = None, map_twice: bool = False, partial: bool = False,
                      on_ready: Callable[[PythonWriter], None] | None = None) -> int:
    """Map the object, run writer `index` until stopped, unmap; return its final seq.

    `on_ready(writer)` is called once the object is mapped and before the first step: the hook
    where an enlisting workload registers `writer.mappings` with its agent (or prints "ready").
    """
    writer = open_python_writer(obj, index, map_twice=map_twice, partial=partial)
    try:
        writer.mark()
        if on_ready is not None:
            on_ready(writer)
        return writer.run(rate=rate, max_ops=max_ops)
    finally:
        writer.close()


# --- writer processes (native or Python), for tests and demos --------------------------------

@dataclass
class WriterProcess:
    """A writer running in its own process, speaking the "ready" / "done seq=N" line protocol."""

    proc: subprocess.Popen[str]
    index: int
    impl: str
    ready_line: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the writer has mapped the object and announced itself."""
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if not line.startswith("ready"):
            self.kill()
            err = self.proc.stderr.read().strip() if self.proc.stderr else ""
            raise WorkloadError(f"{self.impl} writer {self.index} did not become ready within "
                                f"{timeout}s: {err or line.strip() or 'no output'}")
        self.ready_line = line.strip()

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the writer to exit (after set_stop or --max-ops); return its final seq
        (of its last writer, for a process running several: see wait_all())."""
        return list(self.wait_all(timeout).values())[-1]

    def wait_all(self, timeout: float = 30.0) -> dict[int, int]:
        """Wait for the process to exit; return {writer index: final seq} from its "done" lines
        (one per writer: `done seq=S ...`, or `done index=I seq=S ...` when it runs several)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise WorkloadError(f"{self.impl} writer {self.index} did not exit within "
                                f"{timeout}s") from None
        done = [ln for ln in out.splitlines() if ln.startswith("done ")]
        if self.proc.returncode != 0 or not done:
            raise WorkloadError(f"{self.impl} writer {self.index} failed (exit "
                                f"{self.proc.returncode}): {err.strip() or out.strip()}")
        finals: dict[int, int] = {}
        for line in done:
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            finals[int(fields.get("index", self.index))] = int(fields["seq"])
        return finals

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def writer_command(obj: str | os.PathLike[str], index: int, *, impl: str = "c",
                   rate: float | None = None, max_ops: int | None = None,
                   map_twice: bool = False, partial: bool = False,
                   enlist: str | None = None, threads: int = 1,
                   agent_hooks: dict[str, Any] | None = None) -> list[str]:
    """argv of a writer process: the native helper (impl="c") or this module (impl="python");
    `enlist` (Python only) is a coordinator socket the writer enlists with before it starts;
    `threads` (native only) runs writers index..index+threads-1, one per thread."""
    if impl == "c":
        from uffdsnap import native
        argv = [str(native.program(native.WRITER))]
    elif impl == "python":
        argv = [sys.executable, "-P", "-m", "uffdsnap.workload"]
    else:
        raise ValueError(f"unknown writer implementation {impl!r}")
    argv += ["--object", os.fspath(obj), "--index", str(index)]
    if rate:
        argv += ["--rate", str(rate)]
    if max_ops is not None:
        argv += ["--max-ops", str(max_ops)]
    if map_twice:
        argv.append("--map-twice")
    if partial:
        argv.append("--partial")
    if enlist:
        if impl != "python":
            raise ValueError("only the Python writer enlists; native writers are attached")
        argv += ["--enlist", enlist]
        if agent_hooks:
            import json

            argv += ["--agent-hooks", json.dumps(agent_hooks)]
    if threads != 1:
        if impl != "c":
            raise ValueError("only the native writer runs several writer threads")
        argv += ["--threads", str(threads)]
    return argv


def spawn_writer(obj: str | os.PathLike[str], index: int, *, impl: str = "c",
                 rate: float | None = None, max_ops: int | None = None, map_twice: bool = False,
                 partial: bool = False, enlist: str | None = None,
                 threads: int = 1, agent_hooks: dict[str, Any] | None = None) -> WriterProcess:
    """Start a writer process on the object at path `obj`; wait_ready() before relying on it."""
    argv = writer_command(obj, index, impl=impl, rate=rate, max_ops=max_ops,
                          map_twice=map_twice, partial=partial, enlist=enlist, threads=threads,
                          agent_hooks=agent_hooks)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return WriterProcess(proc, index, impl)


# --- the checker -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Violation:
    """One proof that an image is not the object at a single instant."""

    kind: str  # "header" | "size" | "data" | "torn" | "counter" | "cross"
    writer: int | None
    page: int | None  # data page index within the writer's region; None for its counter page
    offset: int | None  # byte offset in the object of the offending page or word
    expected: str
    found: str

    def where(self) -> str:
        if self.writer is None:
            return self.kind
        place = "counter" if self.page is None else f"data page {self.page}"
        at = f" @{self.offset:#x}" if self.offset is not None else ""
        return f"writer {self.writer} {place}{at}"

    def __str__(self) -> str:
        return f"{self.kind}: {self.where()}: expected {self.expected}, found {self.found}"


@dataclass(frozen=True)
class WriterImage:
    """What the image says about one writer."""

    index: int
    seq: int
    impl: str
    phase: str  # "idle", "filling" (step seq+1's page partly stamped), "publishing", "invalid"
    inflight_words: int  # words of step seq+1's page already stamped
    inflight_entries: int  # counter entries already tagged with step seq+1


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one image; ok only when no violation was found."""

    ok: bool
    layout: Layout | None
    writers: tuple[WriterImage, ...]
    violations: tuple[Violation, ...]  # the first max_violations found
    violation_count: int
    pages_checked: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def seqs(self) -> list[int]:
        return [w.seq for w in self.writers]

    def summary(self) -> str:
        if self.ok:
            seqs = self.seqs
            inflight = sum(w.phase != "idle" for w in self.writers)
            return (f"consistent: {len(seqs)} writers at seqs {min(seqs)}..{max(seqs)} "
                    f"({inflight} caught mid-step), {self.pages_checked} pages checked")
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        return (f"INCONSISTENT: {self.violation_count} violations ({kinds}); "
                f"first: {self.violations[0]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "summary": self.summary(),
            "layout": None if self.layout is None else {
                "nwriters": self.layout.nwriters, "data_pages": self.layout.data_pages,
                "page_size": self.layout.page_size, "size": self.layout.size},
            "writers": [w.__dict__ for w in self.writers],
            "violation_count": self.violation_count,
            "violation_kinds": self.kinds,
            "violations": [{**v.__dict__, "text": str(v)} for v in self.violations],
            "pages_checked": self.pages_checked,
        }


def describe_word(word: int) -> str:
    """A stamp as "w3#17", zero as "0", anything else in hex."""
    if word == 0:
        return "0"
    decoded = decode_stamp(word)
    return f"w{decoded[0]}#{decoded[1]}" if decoded else f"{word:#018x}"


def _run_length(page: bytes, start: int, word: int) -> int:
    """How many words from word index `start` on equal `word` (galloping byte compares, so a
    2 MiB page costs a few memcmps, not a Python loop over its words)."""
    total = len(page) // 8 - start
    pattern = word.to_bytes(8, "little")

    def same(n: int) -> bool:
        return page[8 * start:8 * (start + n)] == pattern * n

    good, step = 0, 1
    while good + step <= total and same(good + step):
        good, step = good + step, step * 2
    hi = min(good + step, total + 1)  # same(good) holds; same(hi) fails or hi is past the end
    while hi - good > 1:
        mid = (good + hi) // 2
        if same(mid):
            good = mid
        else:
            hi = mid
    return good


def describe_page(page: bytes) -> str:
    """Runs of equal words in a page, e.g. "w3#17 x512" or "w3#18 x100, w3#2 x412"."""
    q = memoryview(page).cast("Q")
    runs: list[str] = []
    start = 0
    while start < len(q):
        if len(runs) == 4:
            runs.append(f"... ({len(q) - start} more words)")
            break
        n = _run_length(page, start, q[start])
        runs.append(f"{describe_word(q[start])} x{n}")
        start += n
    return ", ".join(runs)


class _Collector:
    """Counts every violation and keeps the first `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.found: list[Violation] = []
        self.count = 0
        self.kinds: dict[str, int] = {}

    @property
    def keeping(self) -> bool:
        """Whether the next violation will be kept (worth describing in detail)."""
        return len(self.found) < self.limit

    def add(self, v: Violation) -> None:
        self.count += 1
        self.kinds[v.kind] = self.kinds.get(v.kind, 0) + 1
        if self.keeping:
            self.found.append(v)


def check_image(image: Any, *, max_violations: int = 100) -> CheckResult:
    """Check that `image` (any buffer: bytes, bytearray, mmap, memoryview) holds a workload
    object as it was at one instant. Never raises for bad content: everything is a Violation.

    Rules (docs/workload.md): per writer i with published seq S, each data page equals the
    stamp of the last step <= S that chose it (zero if none) except the page of step S+1, which
    may hold a prefix of stamp S+1 over the old stamp; the counter's entries are tagged S+1 for a
    prefix and S after it, and a tagged S+1 entry needs the S+1 page complete; i's entry for
    itself holds S-1 (or S where it may be in flight); and obs_i[j] <= S_j for every other j.
    """
    mv = memoryview(image).cast("B")
    out = _Collector(max_violations)

    def verdict(layout: Layout | None, writers: tuple[WriterImage, ...] = (),
                pages: int = 0) -> CheckResult:
        return CheckResult(out.count == 0, layout, writers, tuple(out.found), out.count, pages,
                           dict(out.kinds))

    try:
        layout = Layout.from_header(mv[:HEADER_BYTES])
    except ValueError as e:
        out.add(Violation("header", None, None, 0, "a workload header", str(e)))
        return verdict(None)
    if len(mv) < layout.size:
        out.add(Violation("size", None, None, None, f"{layout.size} bytes",
                          f"{len(mv)} bytes"))
        return verdict(layout)

    n, d, ps = layout.nwriters, layout.data_pages, layout.page_size
    words = layout.words_per_page
    q = mv[:layout.size].cast("Q")
    zero = bytes(ps)
    seqs = [q[layout.counter_offset(i) // 8 + C_SEQ] for i in range(n)]
    obs = [[q[layout.obs_offset(i, j) // 8] for j in range(n)] for i in range(n)]
    writers: list[WriterImage] = []

    for i, seq in enumerate(seqs):
        impl = IMPLS.get(q[layout.counter_offset(i) // 8 + C_IMPL], "unknown")
        if seq >= STEP_MAX:
            out.add(Violation("counter", i, None, layout.counter_offset(i),
                              f"a seq below {STEP_MAX}", f"seq {seq}"))
            writers.append(WriterImage(i, seq, impl, "invalid", 0, 0))
            continue
        # Data pages: compare each whole page against the stamp its seq implies.
        inflight_page = page_for_step(i, seq + 1, d)
        inflight_words = 0
        for p in range(d):
            k = last_step(i, p, seq, d)
            expected = stamp(i, k).to_bytes(8, "little") * words if k else zero
            off = layout.data_offset(i, p)
            page = mv[off:off + ps].tobytes()
            if page == expected:
                continue
            old = describe_word(stamp(i, k) if k else 0)
            if p == inflight_page:
                new = stamp(i, seq + 1)
                split = _run_length(page, 0, new)
                if page[8 * split:] == expected[8 * split:]:
                    inflight_words = split
                    continue
                want = f"a prefix of {describe_word(new)} over {old} (step {seq + 1} in flight)"
                kind = "torn"
            else:
                want = f"{old} x{words} (last step <= {seq} to choose this page)"
                kind = "data"
            found = describe_page(page) if out.keeping else "(not described)"
            out.add(Violation(kind, i, p, off, want, found))

        # Counter page: entry tags are a prefix of seq+1 then seq; values were written with them.
        base = layout.counter_offset(i) // 8
        tags = [q[base + C_OBS + 2 * j + 1] for j in range(n)]
        advanced = 0
        while advanced < n and tags[advanced] == seq + 1:
            advanced += 1
        bad = next((j for j in range(advanced, n) if tags[j] != seq), None)
        if bad is not None:
            out.add(Violation("counter", i, None, layout.obs_offset(i, bad) + 8,
                              f"entry {bad} tagged {seq} or {seq + 1} (entries are written in "
                              f"order with the seq)", f"tag {tags[bad]}"))
        if advanced and inflight_words != words:
            out.add(Violation("counter", i, None, layout.counter_offset(i),
                              f"step {seq + 1}'s data page {inflight_page} complete, since "
                              f"{advanced} entries are tagged {seq + 1}",
                              f"{inflight_words}/{words} words stamped"))
        prev = max(seq - 1, 0)
        for j in range(n):
            value = obs[i][j]
            if j == i:
                allowed = {seq} if j < advanced else {prev, seq} if j == advanced else {prev}
            elif seq == 0 and j > advanced:
                allowed = {0}  # never written
            else:
                continue
            if value not in allowed:
                out.add(Violation("counter", i, None, layout.obs_offset(i, j),
                                  f"obs[{j}] in {sorted(allowed)}", f"obs[{j}] = {value}"))

        if 0 < inflight_words < words:
            phase = "filling"
        elif inflight_words == words or advanced:
            phase = "publishing"
        else:
            phase = "idle"
        writers.append(WriterImage(i, seq, impl, phase, inflight_words, advanced))

    # Cross-writer: nothing i saw of j before T can be ahead of j's state at T.
    for i in range(n):
        for j in range(n):
            if i != j and obs[i][j] > seqs[j]:
                out.add(Violation("cross", i, None, layout.obs_offset(i, j),
                                  f"obs[{j}] <= {seqs[j]} (writer {j}'s seq in the image)",
                                  f"obs[{j}] = {obs[i][j]}: writer {i}'s counter is newer than "
                                  f"writer {j}'s"))

    return verdict(layout, tuple(writers), 1 + n * (1 + d))


def check_file(path: str | os.PathLike[str], *, max_violations: int = 100) -> CheckResult:
    """check_image() of a file (an image), mapped read-only."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return check_image(b"", max_violations=max_violations)
        with mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            result = check_image(mm, max_violations=max_violations)
            return result


# --- `python -m uffdsnap.workload`: the Python writer with the native writer's command line ---

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uffdsnap.workload",
                                     description="Run one Python writer of the workload.")
    parser.add_argument("--object", required=True, help="path of the object (/dev/shm/X, "
                        "/proc/PID/fd/N)")
    parser.add_argument("--index", required=True, type=int, help="this writer's index")
    parser.add_argument("--rate", type=float, default=None, help="steps per second (no limit)")
    parser.add_argument("--max-ops", type=int, default=None, help="stop after N steps")
    parser.add_argument("--map-twice", action="store_true", help="map the object twice, "
                        "alternate steps between the mappings")
    parser.add_argument("--partial", action="store_true", help="map only the pages used")
    parser.add_argument("--enlist", metavar="SOCK", help="enlist with the coordinator at SOCK "
                        "(uffdsnap.enlist) once mapped, before the first step")
    parser.add_argument("--agent-hooks", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    first: list[int] = []
    enlisted: list[Any] = []

    def ready(writer: PythonWriter) -> None:
        if args.enlist:
            from uffdsnap import testhooks
            from uffdsnap.enlist import enlist

            enlisted.append(enlist(args.enlist, test_hooks=testhooks.parse(args.agent_hooks)))
        first.append(writer.seq)
        print(f"ready pid={os.getpid()} index={writer.index} seq={writer.seq}", flush=True)

    try:
        seq = run_python_writer(args.object, args.index, rate=args.rate, max_ops=args.max_ops,
                                map_twice=args.map_twice, partial=args.partial, on_ready=ready)
    except UserError as e:
        print(f"writer: {e}", file=sys.stderr)
        return 2
    finally:
        for enlistment in enlisted:
            enlistment.close()
    print(f"done seq={seq} ops={seq - first[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
