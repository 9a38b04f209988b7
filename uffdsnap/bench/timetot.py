"""Time to T: how long a user waits between asking for a snapshot and its instant T, and for the
command to return, with busy writers. Two ways of asking, each measured as a user runs it (a
separate `uffdsnap` process, wall clock around it):

- one-shot: `uffdsnap snapshot --shm OBJ` (finds, attaches and protects every writer);
- long-running: `uffdsnap coordinator --shm OBJ --attach` started once, then
  `uffdsnap snapshot --coordinator SOCK`; the first request joins the writers, the later ones
  find them joined (the number reported is the median of those).

The baseline is the kernel's protect time in the same snapshot (the longest
UFFDIO_WRITEPROTECT of one process, as its agent timed it)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from uffdsnap.bench import procs as P
from uffdsnap.bench.config import BenchConfig, MiB
from uffdsnap.bench.procs import BenchError

OBJECT_SIZE = 64 * MiB  # the wall-time target is for 64 MiB with 8 busy writers
LATER_REQUESTS = 3  # snapshots through a long-running coordinator after the joining one
READY_TIMEOUT_S = 60.0


def run_time_to_t(cfg: BenchConfig, dest_dir: str,
                  say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One record per (process count, mode): request → T and wall time, both ways of asking."""
    ws = P.Workspace(dest_dir)
    out: list[dict[str, Any]] = []
    try:
        for procs in cfg.procs:
            obj = P.create_object(ws, "shmem", OBJECT_SIZE)
            writers = P.start_writers(ws, obj, procs, rate=None, probe=False, idle=False,
                                      uffd_sock=None, max_seconds=600)
            try:
                for mode in cfg.modes:
                    say(f"time to T: {procs} busy writer{'s' if procs > 1 else ''}, {mode}")
                    out.append({"procs": procs, "size": OBJECT_SIZE, "mode": mode,
                                "one_shot": _one_shot(ws, obj.path, mode, cfg.timeout_s),
                                "long_running": _long_running(ws, obj.path, mode,
                                                              cfg.timeout_s)})
            finally:
                P.stop_writers(ws, writers)
                P.close_object(ws, obj)
    finally:
        ws.close()
    return out


def _measured(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one `uffdsnap snapshot ... --json`; its summary's times and the command's wall time."""
    t0 = time.monotonic_ns()
    proc = subprocess.run([sys.executable, "-m", "uffdsnap", *argv, "--json"],
                          capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.monotonic_ns() - t0
    if proc.returncode != 0:
        raise BenchError(f"uffdsnap {' '.join(argv)}: {proc.stderr.strip()[-300:]}")
    s = json.loads(proc.stdout)
    return {"wall_ns": wall, "request_to_t_ns": s["request_to_t_ns"],
            "command_wall_ns": s["command_wall_ns"],  # (as the command saw it, to 10 ms)
            "join_ns": s["join_ns"], "protect_phase_ns": s["protect_phase_ns"],
            "kernel_protect_max_ns": s["kernel_protect_max_ns"],
            "kernel_protect_total_ns": s["kernel_protect_total_ns"],
            "start_pause_max_ns": s["start_pause_max_ns"], "duration_ns": s["duration_ns"]}


def _one_shot(ws: P.Workspace, path: str, mode: str, timeout: float) -> dict[str, Any]:
    image = ws.temp_path("timetot.img")
    try:
        return _measured(["snapshot", "--shm", path, "-o", image, "--force", "--mode", mode],
                         timeout)
    finally:
        ws.remove(image, image + ".json")


def _long_running(ws: P.Workspace, path: str, mode: str, timeout: float) -> dict[str, Any]:
    sock_dir = tempfile.mkdtemp(prefix="uffdsnap-bench-")  # (AF_UNIX paths are short)
    sock = os.path.join(sock_dir, "c.sock")
    image = ws.temp_path("timetot.img")
    coord = ws.start([sys.executable, "-m", "uffdsnap", "coordinator", "--shm", path,
                      "--listen", sock, "--attach", "--mode", mode], stdin=subprocess.DEVNULL)
    try:
        P.expect(coord, "coordinator listening", f"coordinator (pid {coord.pid})",
                 READY_TIMEOUT_S)
        ask = ["snapshot", "--coordinator", sock, "-o", image, "--force"]
        first = _measured(ask, timeout)
        later = [_measured(ask, timeout) for _ in range(LATER_REQUESTS)]
    finally:
        ws.end(coord)
        ws.remove(image, image + ".json")
        shutil.rmtree(sock_dir, ignore_errors=True)
    pick = sorted(later, key=lambda r: r["request_to_t_ns"])[len(later) // 2]
    return {**pick, "first": first,
            "request_to_t_all_ns": [r["request_to_t_ns"] for r in later],
            "request_to_t_median_ns": statistics.median(r["request_to_t_ns"] for r in later)}


def rows(records: list[dict[str, Any]], row: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """The table rows of the issue's targets: request → T one-shot (≤ 100 ms + kernel protect
    for up to 8 processes, ≤ 0.5 s for more), through a long-running coordinator (≤ 1.2× kernel
    protect), and the one-shot command's wall time (≤ 1 s for 64 MiB, 8 busy writers). The
    kernel's protect time is every process's UFFDIO_REGISTER + WRITEPROTECT back to back, as
    its agent timed them in the same snapshot: what one protector needs, as the native
    handler of the start-pause rows does it (the longest single process is in the note)."""
    out = []
    for r in records:
        where = f"64M x{r['procs']} busy, {r['mode']}"
        one, lr = r["one_shot"], r["long_running"]
        kernel = one["kernel_protect_total_ns"]
        limit = 100_000_000 + kernel if r["procs"] <= 8 else 500_000_000
        out.append(row(f"request -> T, one-shot command, {where}", one["request_to_t_ns"],
                       kernel, _KERNEL, "ns", ("<=abs", limit),
                       f"join {one['join_ns'] / 1e6:.1f} ms"))
        out.append(row(f"request -> T, long-running coordinator, {where}",
                       lr["request_to_t_ns"], lr["kernel_protect_total_ns"], _KERNEL, "ns",
                       ("<=", 1.2),
                       f"first request {lr['first']['request_to_t_ns'] / 1e6:.1f} ms; one "
                       f"process's protect at most {lr['kernel_protect_max_ns'] / 1e6:.2f} ms"))
        out.append(row(f"command wall time, one-shot, {where}", one["wall_ns"], None, "", "ns",
                       ("<=abs", 1_000_000_000) if r["procs"] == 8 else None,
                       f"long-running: {lr['wall_ns'] / 1e6:.0f} ms"))
    return out


_KERNEL = "kernel protect (all processes)"
