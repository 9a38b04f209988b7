"""Measure the escape audit's false alarms and cost: on workloads where every mapper is visible,
any finding is a false report. Runs the audit many times per scenario (in this process, as the
coordinator does before T), and `uffdsnap snapshot --json` end to end, and tallies.

    python tests/system/measure_escapes.py --audits 200 --snapshots 50 --cost 15

Scenarios: busy writers on /dev/shm; the same plus a process that maps, touches and unmaps the
object in a loop (a visible mapper whose page-table entries come and go while we count); writers
on a tmpfs mounted huge=always (THP: compared pages must be skipped, not misjudged). And what
the audit adds to the protect phase (snapshots with and without it). Needs root.
Prints a markdown table (docs/tracking.md records one)."""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from uffdsnap import escapes
from uffdsnap import workload as wl
from uffdsnap.procfs import open_object

WRITERS = 4
DATA_PAGES = 4096  # per writer: 16 MiB per writer


@contextmanager
def workload(path: str, churn: bool) -> Iterator[None]:
    fd, _size = wl.create_object(path, WRITERS, DATA_PAGES)
    os.close(fd)
    writers = [wl.spawn_writer(path, i) for i in range(WRITERS)]
    churner = subprocess.Popen([sys.executable, "-c", _CHURN, path]) if churn else None
    try:
        for w in writers:
            w.wait_ready()
        yield
    finally:
        if churner is not None:
            churner.kill()
            churner.wait()
        wl.set_stop(path)
        for w in writers:
            w.wait()
        os.unlink(path)


_CHURN = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
while True:
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    for off in range(0, size, 16 * mmap.PAGESIZE):
        m[off]
    m.close()
"""


def audits(path: str, runs: int) -> tuple[int, int, int, float, str]:
    """(false reports, pages compared, pages skipped as large, median ms, a not-checked
    reason) over `runs` audits."""
    obj = open_object(path)
    false, compared, skipped, times, reason = 0, 0, 0, [], ""
    try:
        for _ in range(runs):
            start = time.monotonic()
            found = escapes.audit(obj)
            times.append(time.monotonic() - start)
            false += bool(found.findings())
            compared += found.hidden.pages_compared
            skipped += found.hidden.pages_skipped_large
            reason = reason or found.hidden.reason
    finally:
        obj.close()
    return false, compared, skipped, _median(times) * 1000, reason


def snapshots(path: str, runs: int) -> tuple[int, int, float, float]:
    """(snapshots whose summary reported a finding, snapshots that failed, median ms of the
    audit inside them, median ms of their protect phase, which the audit is part of) over
    `runs`."""
    import json

    false = failed = 0
    audit_ms, protect_ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            out = os.path.join(tmp, f"{i}.img")
            proc = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--shm", path,
                                   "-o", out, "--json", "--no-progress"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                failed += 1
                print(proc.stderr, file=sys.stderr)
                continue
            summary = json.loads(proc.stdout)
            false += bool(summary["escapes"]["findings"])
            audit_ms.append(summary["escapes"]["audit_ns"] / 1e6)
            protect_ms.append(summary["protect_phase_ns"] / 1e6)
            os.unlink(out)
            os.unlink(out + ".json")
    return false, failed, _median(audit_ms), _median(protect_ms)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def cost(path: str, runs: int) -> str:
    """What the audit adds to the start pause: `runs` snapshots by an in-process coordinator
    (at nice -10, as `snapshot` runs), every other one with the audit switched off."""
    import statistics

    import trio

    from uffdsnap.hosted import hosted

    os.setpriority(os.PRIO_PROCESS, 0, -10)  # (the writers, started before, keep theirs)
    obj = open_object(path)
    results: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}

    async def take() -> None:
        async with hosted(obj) as host:
            coordinator = host.coordinator
            audited = coordinator.escape_audit.before_t

            async def not_audited(run: object, decision: object) -> object:
                return decision

            with tempfile.TemporaryDirectory() as tmp:
                for i in range(2 * runs):
                    on = i % 2 == 0
                    coordinator.escape_audit.before_t = audited if on else not_audited
                    out = os.path.join(tmp, f"{i}.img")
                    s = await coordinator.snapshot(out)
                    results[on].append((s["protect_phase_ns"] / 1e6,
                                        s["start_pause_max_ns"] / 1e6,
                                        s["escapes"].get("audit_ns", 0) / 1e6))
                    os.unlink(out)
                    os.unlink(out + ".json")

    try:
        trio.run(take)
    finally:
        obj.close()
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    lines = []
    for on in (True, False):
        protect, pause, audit_ms = (statistics.median(r[k] for r in results[on])
                                    for k in range(3))
        lines.append(f"{'with' if on else 'without'} the audit ({runs} snapshots): median "
                     f"protect phase {protect:.0f} ms, longest held fault {pause:.0f} ms, "
                     f"audit {audit_ms:.0f} ms")
    return "\n".join(lines)


@contextmanager
def thp_tmpfs() -> Iterator[str]:
    where = tempfile.mkdtemp(prefix="uffdsnap-thp-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=always,size=512m", "none", where],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)
        os.rmdir(where)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--audits", type=int, default=200)
    parser.add_argument("--snapshots", type=int, default=50)
    parser.add_argument("--cost", type=int, default=15, metavar="N",
                        help="N snapshots with the audit and N without (0: skip)")
    args = parser.parse_args()
    rows = []
    costs = ""
    base = f"/dev/shm/uffdsnap-measure-{os.getpid()}"
    for name, churn in (("busy writers", False), ("busy writers + map/unmap churn", True)):
        with workload(base, churn):
            rows.append((name, "audit", args.audits, *audits(base, args.audits)))
            if not churn and args.snapshots:
                false, failed, audit_ms, protect_ms = snapshots(base, args.snapshots)
                rows.append((name, "snapshot --json", args.snapshots, false, 0, 0, audit_ms,
                             f"{failed} failed; median protect phase {protect_ms:.0f} ms"))
            if not churn and args.cost:
                costs = cost(base, args.cost)
    with thp_tmpfs() as where:
        path = os.path.join(where, "obj")
        with workload(path, False):
            rows.append(("busy writers, tmpfs huge=always", "audit", args.audits,
                         *audits(path, args.audits)))
    print(f"page size {mmap.PAGESIZE}, {WRITERS} writers x {DATA_PAGES} pages, "
          f"{escapes.SAMPLE_PAGES} sampled pages per audit\n")
    print("| workload | what | runs | false reports | pages compared | pages skipped (large) "
          "| median audit | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name, what, runs, false, compared, skipped, ms, note in rows:
        print(f"| {name} | {what} | {runs} | {false} | {compared} | {skipped} | {ms:.0f} ms "
              f"| {note} |")
    if costs:
        print(f"\n{costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
