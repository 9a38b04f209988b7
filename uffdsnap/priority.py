"""The CPU share of our own threads. From a request to T, writers wait on us: a protected
writer is held at its first write until T, and beside busy writers every step of ours (the
agent host's protects, the coordinator's handshakes and its look before T) waits its turn for
a CPU. So the coordinator's event loop runs the way to T at the highest share it may take
(`URGENT_NICE`), and its agent host's from the first protect to T (not while it injects: the
targets it waits on would wait longer). The copy and everything after T run at the command's
own (`--nice`), as measured for the copy against fault service.

Linux keeps a nice value per thread, and a thread starts with its creator's: a worker thread
started while its creator was urgent would stay so, so work handed to a thread
(`in_worker_thread`) sets its own. Best effort throughout: raising needs CAP_SYS_NICE (or
RLIMIT_NICE)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import trio

URGENT_NICE = -20

_T = TypeVar("_T")
_saved: int | None = None  # the nice of the thread inside `urgent()`, outside it


def this_thread() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, 0)  # (0: the calling thread, on Linux)


def set_this_thread(nice: int) -> bool:
    """Give the calling thread `nice`; False if we may not (raising needs a capability)."""
    return _set(0, nice)


def normal() -> int:
    """The nice value of the calling thread outside `urgent()`: what work after T runs at."""
    return this_thread() if _saved is None else _saved


@contextlib.contextmanager
def urgent() -> Iterator[None]:
    """Run the calling thread (an event loop: every task in it) at `URGENT_NICE` inside the
    block, and at its own nice value again after it, however it ends. (Nested: no change.)"""
    global _saved
    before = None if _saved is not None else _raise(0)
    if before is None:
        yield
        return
    _saved = before
    try:
        yield
    finally:
        _saved = None
        _set(0, before)


@contextlib.contextmanager
def urgent_thread(tid: int | None) -> Iterator[None]:
    """Run thread `tid` of another process (our agent host's event loop) at `URGENT_NICE`
    inside the block, and at its own nice value again after it; nothing if it is gone or we
    may not."""
    before = None if tid is None else _raise(tid)
    try:
        yield
    finally:
        if before is not None and tid is not None:
            _set(tid, before)


async def in_worker_thread(fn: Callable[..., _T], *args: object,
                           abandon_on_cancel: bool = False) -> _T:
    """fn(*args) in a trio worker thread at our normal share (`normal()`), whatever that
    thread inherited when it was started."""
    nice = normal()

    def at_nice() -> _T:
        set_this_thread(nice)
        return fn(*args)

    return await trio.to_thread.run_sync(at_nice, abandon_on_cancel=abandon_on_cancel)


def _raise(tid: int) -> int | None:
    """Raise thread `tid` (0: ours) to `URGENT_NICE`: its nice value before, or None if
    unchanged (gone, urgent already, or not allowed)."""
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None
    return before if before > URGENT_NICE and _set(tid, URGENT_NICE) else None


def _set(tid: int, nice: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        return False
    return True
