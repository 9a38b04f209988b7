"""The Python writer: the workload's step in Python, for code that enlists through the Python API.

It does exactly what uffdsnap/native/src/writer.c does (tests compare the two byte for byte), one
aligned 8-byte store per memoryview item assignment, so the checker's ordering argument holds for
both. main() is `python -m uffdsnap.workload`: the native writer's command line, in Python.
Mind the GIL hazard (DESIGN §5): a Python writer blocked on a write-protect fault holds the GIL,
so its faults must be served by another process.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from uffdsnap.errors import UserError
from uffdsnap.workload._layout import (
    C_IMPL,
    C_OBS,
    C_PID,
    C_SEQ,
    H_STOP,
    HEADER_BYTES,
    IMPL_PYTHON,
    STEP_MAX,
    Layout,
    page_for_step,
    stamp,
)
from uffdsnap.workload._object import ObjectRef, open_object, read_layout


class WorkloadError(RuntimeError):
    """A writer process failed to start, misbehaved, or did not finish in time."""


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
    fd, owned = open_object(obj, os.O_RDWR)
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m uffdsnap.workload`: one Python writer, with the native writer's arguments and
    its "ready ..." / "done seq=N ops=M" lines, so WriterProcess drives either the same way."""
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
