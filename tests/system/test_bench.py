"""`uffdsnap bench`: the plan, the log format, the table logic, and a --quick run end to end.

No timed assertions: the run is checked for structure and for every scenario having numbers,
never for how good the numbers are.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_root
from uffdsnap.bench.config import MODES, BenchConfig, parse_size, plan, size_label
from uffdsnap.bench.report import render_scaling, render_table, scenarios, table
from uffdsnap.bench.writerlog import MAGIC, Fleet, LogError, parse_log, percentile

SCENARIOS = ("start_pause", "fault_service", "copy", "workload", "scaling")


# ---- pure parts -------------------------------------------------------------------------------

def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("4G") == 4 << 30
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("4096") == 4096
    for bad in ("", "x", "-1M", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert size_label(256 << 20) == "256M" and size_label(4 << 30) == "4G"


@pytest.mark.parametrize("quick", [True, False])
def test_plan_covers_every_scenario_once(quick: bool) -> None:
    cfg = BenchConfig.preset(quick)
    sessions = plan(cfg)
    purposes = {p for s in sessions for p in s.purposes}
    assert {"start_pause", "scaling", "workload", "copy", "timeline"} <= purposes
    keys = [(s.kind, s.size, s.procs, s.idle, s.rate is None) for s in sessions]
    assert len(keys) == len(set(keys)), "a configuration is run twice"
    for s in sessions:
        assert set(MODES) <= set(s.events), "every mode of ours runs in every session"
        assert "native" in s.events
        assert ("raw" in s.events) == s.idle and ("stw" in s.events) != s.idle
        assert len(set(s.purposes)) == len(s.purposes)
    scaling = {(s.size, s.procs) for s in sessions if "scaling" in s.purposes}
    assert {(size, 1) for size in cfg.sizes} <= scaling
    assert {(cfg.base_size, p) for p in cfg.procs} <= scaling


def _log(start: int, intervals: list[tuple[int, int]], slow: list[tuple[int, int]],
         wp: list[tuple[int, int]], interval: int = 1_000_000) -> bytes:
    header = struct.pack("<12Q", 1, 42, start, interval, len(intervals), len(slow), len(wp),
                         sum(n for n, _ in intervals), 100_000, 0, 0, 1)
    body = b"".join(struct.pack("<QQ", a, b) for a, b in [*intervals, *slow, *wp])
    return MAGIC + header + body


def test_writer_log_and_windows() -> None:
    ms = 1_000_000
    start = 1000 * ms
    # 10 intervals of 1 ms: 100 ops each, except a 5 ms stall starting at +3 ms (interval 8 ends
    # it); one fault of 40 us at +9 ms.
    iv = [(100, 2000)] * 3 + [(0, 0)] * 5 + [(1, 5 * ms), (100, 50_000)]
    raw = _log(start, iv, [(start + 3 * ms, 5 * ms)], [(start + 9 * ms, 40_000)])
    log = parse_log(raw)
    assert log.pid == 42 and log.ops == 401 and len(log.interval_ops) == 10
    fleet = Fleet([log])
    # the stall is seen by every window it overlaps, also one that starts after it began
    assert fleet.max_stall(start + 5 * ms, start + 6 * ms) == 5 * ms
    assert fleet.max_stall(start, start + 3 * ms) == 5 * ms
    # a window with no slow operation falls back to the intervals' longest stall
    assert fleet.max_stall(start + 9 * ms + 1, start + 9 * ms + 2) == 50_000
    assert fleet.wp_latencies(start, start + 10 * ms) == [40_000]
    assert fleet.wp_latencies(start, start + 8 * ms) == []
    assert fleet.ops_per_s(start, start + 3 * ms) == pytest.approx(100_000)
    assert fleet.ops_per_s(start + 3 * ms, start + 8 * ms) == 0
    times, ops, stalls = fleet.series(start, start + 9 * ms)
    assert ops[:3] == [100, 100, 100] and max(stalls) == 5 * ms and len(times) == len(ops)
    with pytest.raises(LogError):
        parse_log(b"nonsense" + bytes(200))
    with pytest.raises(LogError):
        parse_log(raw[:-8])


def test_percentile() -> None:
    assert percentile([], 50) == 0
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([7], 99) == 7


def _session(mode: str = "agents") -> dict[str, Any]:
    """A synthetic session result with every event a start-pause + scaling session has."""
    summary = {"start_pause_max_ns": 3_000_000, "protect_phase_ns": 2_000_000,
               "kernel_protect_max_ns": 1_000_000, "join_ns": 1, "fault_service": {},
               "faults": 10, "copy_throughput_bytes_per_s": 900, "copy_ns": 5,
               "duration_ns": 9}
    ours = {"summary": summary, "coordinator_cpu_s": 0.5, "coordinator_maxrss_bytes": 50 << 20,
            "coordinator_rss_before_bytes": 30 << 20, "agents_cpu_s": 0.2,
            "agents_maxrss_bytes": 30 << 20}
    native = {"protect_total_ns": 2_000_000, "protect_ns": [2_000_000], "service": {},
              "faults": 9, "copy_bytes_per_s": 1000}
    stw = {"pause_ns": 50_000_000, "copy_bytes_per_s": 1000}
    lat = {"count": 10, "p50_ns": 100_000, "p90_ns": 1, "p99_ns": 500_000, "max_ns": 900_000}
    nat_lat = {"count": 9, "p50_ns": 40_000, "p90_ns": 1, "p99_ns": 60_000, "max_ns": 90_000}
    return {"name": "s", "kind": "shmem", "size": 4 << 30, "procs": 1,
            "purposes": ["start_pause", "scaling"],
            "events": {"stw": stw, "native": native, mode: ours},
            "seen": {"stw": {"start_pause_ns": 50_000_000},
                     "native": {"start_pause_ns": 2_500_000, "fault_latency": nat_lat},
                     mode: {"start_pause_ns": 2_100_000, "fault_latency": lat}}}


def test_table_ratios_and_targets() -> None:
    sc = scenarios([_session()], ["agents"])
    assert len(sc["start_pause"]) == len(sc["fault_service"]) == len(sc["scaling"]) == 1
    rows = {r["scenario"].split(",")[0]: r for r in table(sc)}
    pause = rows["start pause vs kernel protect"]
    assert pause["ratio"] == pytest.approx(1.05) and pause["met"] is True
    p50 = rows["fault service p50 vs native p50"]
    assert p50["ratio"] == pytest.approx(2.5) and p50["met"] is True   # agents: <= 3x
    p99 = rows["fault service p99 vs native p50"]
    assert p99["ratio"] == pytest.approx(12.5) and p99["met"] is False  # <= 10x
    rss = next(r for r in table(sc) if r["scenario"].startswith("coordinator peak RSS"))
    assert rss["met"] is True and rss["ratio"] is None
    assert "NOT met" in render_table(table(sc)) and "met" in render_table(table(sc), True)
    assert "4G" in render_scaling(sc)


def test_a_new_mode_gets_its_own_target() -> None:
    """Adding a mode (e.g. delegated) is one line in MODES; its p50 target is already known."""
    sc = scenarios([_session("delegated")], ["delegated"])
    p50 = next(r for r in table(sc) if r["scenario"].startswith("fault service p50"))
    assert p50["target"] == "<= 1.5x" and p50["met"] is False


def test_bad_arguments_are_one_line() -> None:
    for args in (["--sizes", "lots"], ["--modes", "telepathy"], ["--kinds", "nvme"],
                 ["--rate", "0"], ["--procs", "0"], ["--only", "sessions,everything"]):
        proc = subprocess.run([sys.executable, "-m", "uffdsnap", "bench", "--quick", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("uffdsnap: error: "), proc.stderr


# ---- the real thing ---------------------------------------------------------------------------

def _ours_everywhere(pid: int, dest: Path) -> list[str]:
    """Command lines of live processes that belong to the bench run with this pid."""
    marks = (f"/proc/{pid}/fd/", str(dest))
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in marks):
            found.append(cmd)
    return found


@needs_root
@pytest.mark.slow
def test_quick_run_json(tmp_path: Path) -> None:
    dest, out = tmp_path / "dest", tmp_path / "out"
    dest.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "bench", "--quick", "--json",
                             "--quiet", "--dest", str(dest), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["ok"] and not result["errors"], result["errors"]
    assert result["machine"]["nproc"] and result["machine"]["kernel"]
    sc = result["scenarios"]
    for name in SCENARIOS:
        assert sc[name], f"scenario {name} produced nothing"
    skipped = {s["session"] for s in result["skipped"]}
    assert all(s.startswith("hugetlb") for s in skipped), result["skipped"]
    for r in sc["start_pause"]:
        for key in ("ours_ns", "kernel_protect_ns", "stw_ns", "ours_protect_phase_ns"):
            assert isinstance(r[key], int) and r[key] > 0, (key, r)
    for r in sc["fault_service"]:
        assert r["ours"]["count"] > 0 and r["native"]["count"] > 0, r
        assert r["ours"]["p50_ns"] > 0 and r["native"]["p50_ns"] > 0
    for r in sc["copy"]:
        assert r["ours_bytes_per_s"] > 0 and r["raw_bytes_per_s"] > 0
        assert r["native_bytes_per_s"] > 0
    for r in sc["workload"]:
        assert r["undisturbed_ops_per_s"] > 0 and r["during_ops_per_s"] >= 0
        assert r["ratio"] is not None and r["native_ratio"] is not None
    for r in sc["scaling"]:
        assert r["coordinator_maxrss_bytes"] > 0 and r["coordinator_cpu_s"] > 0
    assert {(r["procs"]) for r in sc["scaling"]} == {1, 2}
    inc = sc["incremental"]
    assert "error" not in inc, inc
    # the delta holds exactly the pages written (its extents' bytes)
    assert inc["delta"]["delta_extent_bytes"] == inc["delta"]["written_bytes"] > 0
    for key in ("paced", "flat_out"):
        assert inc[key]["tracked_ops_per_s"] > 0 and inc[key]["untracked_ops_per_s"] > 0
    rows = result["table"]
    assert rows and all(r["ours"] is not None for r in rows), rows
    assert all(r["met"] in (True, False, None) for r in rows)
    assert any(r["target"] for r in rows)
    # the result and table are saved; plots are there or there is a note why not
    assert json.loads((out / "result.json").read_text())["table"] == rows
    assert "| scenario |" in (out / "table.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib" in n for n in result["notes"])
    else:
        assert {Path(p).name for p in result["plots"]} == \
            {"timeline.png", "fault-latency.png", "scaling.png"}
        assert all(Path(p).stat().st_size > 0 for p in result["plots"])
    # nothing is left behind: images, copies, processes
    assert list(dest.iterdir()) == []
    assert _ours_everywhere(proc.pid, dest) == []


def _interruptible() -> None:
    """In the child: SIGINT as a terminal gives it (a shell's background job, CI's perhaps,
    inherits it ignored, and Python then leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_root
@pytest.mark.slow
def test_interrupted_run_cleans_up(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "bench", "--quick", "--no-plots",
                             "--dest", str(dest), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_interruptible)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until a session has writers running
        line = proc.stderr.readline()
        if "events:" in line or not line:
            break
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "uffdsnap: error: interrupted"
    assert list(dest.iterdir()) == []
    time.sleep(0.5)
    assert _ours_everywhere(proc.pid, dest) == []
