"""Our threads' CPU share on the way to T (priority.py), on real threads of this process:
raised as far as we may, put back however the block ends, and work handed to a worker
thread born urgent run at the normal share. Runs as root (raised) and unprivileged (left alone)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
import trio

from uffdsnap import priority
from uffdsnap.priority import URGENT_NICE

OWN = 5  # each test's thread starts here (lowering it needs no privilege)


def _in_a_thread(fn: Callable[[], object]) -> object:
    """fn() in a new thread at nice OWN (the nice value is per thread)."""
    out: list[object] = []

    def run() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, OWN)
        out.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return out[0]


def _may_raise() -> bool:
    def probe() -> bool:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, OWN - 1)
        except OSError:
            return False
        return True

    return bool(_in_a_thread(probe))


def test_urgent_raises_what_it_may_and_puts_it_back_however_the_block_ends() -> None:
    def run() -> tuple[list[object], int, int]:
        seen: list[object] = []
        with pytest.raises(RuntimeError), priority.urgent():
            seen.append((priority.this_thread(), priority.normal()))
            with priority.urgent():  # nested: no change, and the outer one still restores
                seen.append(priority.this_thread())
            seen.append(priority.this_thread())
            raise RuntimeError("the way to T failed")
        return seen, priority.this_thread(), priority.normal()

    urgent = URGENT_NICE if _may_raise() else OWN
    seen, after, normal_after = _in_a_thread(run)  # type: ignore[misc]
    assert seen == [(urgent, OWN), urgent, urgent]
    assert after == normal_after == OWN


def test_work_in_a_worker_thread_born_urgent_runs_at_the_normal_share() -> None:
    def run() -> tuple[int, int]:
        async def main() -> tuple[int, int]:
            with priority.urgent():  # (trio starts its worker threads from this thread)
                born = await trio.to_thread.run_sync(priority.this_thread)  # (then cached)
                worked = await priority.in_worker_thread(priority.this_thread)
            return born, worked

        return trio.run(main)

    born, worked = _in_a_thread(run)  # type: ignore[misc]
    assert born == (URGENT_NICE if _may_raise() else OWN)  # (what Linux gives a new thread)
    assert worked == OWN


def test_another_thread_is_raised_for_the_block_and_put_back() -> None:
    ready, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def other() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, OWN)
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert ready.wait(10)
        tid = tids[0]
        with priority.urgent_thread(tid):
            during = os.getpriority(os.PRIO_PROCESS, tid)
        after = os.getpriority(os.PRIO_PROCESS, tid)
    finally:
        done.set()
        t.join(10)
    assert during == (URGENT_NICE if _may_raise() else OWN)
    assert after == OWN
    with priority.urgent_thread(None), priority.urgent_thread(2**22 + 12345):  # (none, gone)
        pass
