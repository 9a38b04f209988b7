"""A thread's requested slice (native/sched.py), on real threads of this process: asked and put
back, its nice value kept, other threads and other policies left alone. No root needed."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from uffdsnap.native import sched


def _slice_of(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/sched") as f:
        return int(next(line for line in f if line.startswith("se.slice")).split(":")[1])


def _in_a_thread(fn: Callable[[int], object]) -> object:
    """fn(its tid), run in a new thread (the slice and the nice value are per thread)."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn(threading.get_native_id())))
    t.start()
    t.join(10)
    assert not t.is_alive()
    return out[0]


def test_a_short_slice_is_asked_and_put_back() -> None:
    def run(tid: int) -> tuple[int, int, int, int, int]:
        os.setpriority(os.PRIO_PROCESS, tid, 5)  # (raising it needs no privilege)
        own = _slice_of(tid)
        before = sched.short_slice()
        during = _slice_of(tid)
        nice_during = os.getpriority(os.PRIO_PROCESS, tid)
        sched.restore(before)
        return own, during, nice_during, _slice_of(tid), _slice_of(threading.main_thread()
                                                                    .native_id or 0)

    main = _slice_of(threading.main_thread().native_id or 0)
    own, during, nice_during, after, main_during = _in_a_thread(run)  # type: ignore[misc]
    assert during == sched.SHORTEST_SLICE_NS != own
    assert nice_during == 5
    assert after == own
    assert main_during == main  # another thread's is not touched


def test_a_thread_of_another_policy_is_left_alone() -> None:
    def run(tid: int) -> tuple[object, int]:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        own = _slice_of(tid)
        return sched.short_slice(), _slice_of(tid) - own

    asked, change = _in_a_thread(run)  # type: ignore[misc]
    assert asked is None and change == 0


def test_nothing_to_put_back_is_fine() -> None:
    sched.restore(None)
    gone = sched.Slice(tid=2**22 + 12345, runtime_ns=1, flags=0)  # no such thread
    sched.restore(gone)
