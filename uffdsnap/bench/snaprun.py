"""One of our snapshots, in a process of its own, for the bench: the coordinator's summary plus
the clock anchors and resource usage the bench needs.

    python -m uffdsnap.bench.snaprun --object SPEC --output OUT.img --mode agents [--nice N]

This is `uffdsnap snapshot --shm SPEC` (uffdsnap.hosted.attach_and_snapshot) with the
coordinator built from the bench's mode table, so each mode in uffdsnap.bench.config.MODES runs
through the same code. It prints one JSON object: the summary, T on CLOCK_MONOTONIC (the writers'
clock), and getrusage of this process (the coordinator) and of its reaped children (the attach
agents). Run in its own process so that its CPU time and peak RSS are the coordinator's alone,
at the priority the command takes (--nice, as `uffdsnap snapshot --nice`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from typing import Any

import trio

from uffdsnap.bench.config import MODES
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.hosted import attach_and_snapshot
from uffdsnap.procfs import ObjectError, SharedObject, open_object


def clock_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, from the tightest of a few paired readings."""
    best: tuple[int, int] | None = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, w - (m0 + m1) // 2)
    assert best is not None
    return best[1]


async def snapshot(obj: SharedObject, output: str, mode: str, timeout: float) -> dict[str, Any]:
    """`uffdsnap snapshot --shm` (hosted.attach_and_snapshot) in the given mode."""
    return await attach_and_snapshot(obj, output, protect_timeout=timeout, **MODES[mode])


def _cpu_s(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: a child started with vfork
    or fork inherits its parent's high-water mark there, so it would report the bench's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def set_nice(nice: int) -> None:
    """Take the priority `uffdsnap snapshot --nice` would (best effort, as there: only root may
    raise it); the agents we start inherit it."""
    if nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def main(argv: list[str] | None = None) -> int:
    """Take one snapshot and print the JSON result; exit 2 for a bad object, 1 if it failed."""
    parser = argparse.ArgumentParser(prog="python -m uffdsnap.bench.snaprun")
    parser.add_argument("--object", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--mode", required=True, choices=sorted(MODES))
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args(argv)
    set_nice(args.nice)
    try:
        obj = open_object(args.object)
    except ObjectError as e:
        sys.stderr.write(f"snaprun: {e}\n")
        return 2
    before = resource.getrusage(resource.RUSAGE_SELF)
    rss_before = peak_rss_bytes()
    offset = clock_offset_ns()
    t_call = time.monotonic_ns()
    try:
        summary = trio.run(snapshot, obj, args.output, args.mode, args.timeout)
    except (SnapshotFailed, UserError, OSError) as e:
        sys.stderr.write(f"snaprun: snapshot failed: {e}\n")
        return 1
    finally:
        obj.close()
    t_return = time.monotonic_ns()
    after = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "mode": args.mode,
        "summary": summary,
        "t_call_ns": t_call,
        "t_return_ns": t_return,
        "t_snapshot_ns": summary["snapshot_time_unix_ns"] - offset,
        "coordinator_cpu_s": _cpu_s(after) - _cpu_s(before),
        "coordinator_maxrss_bytes": peak_rss_bytes(),
        "coordinator_rss_before_bytes": rss_before,
        "agents_cpu_s": _cpu_s(children),
        # ru_maxrss of the largest agent; an upper bound (see peak_rss_bytes)
        "agents_maxrss_bytes": children.ru_maxrss * 1024,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
