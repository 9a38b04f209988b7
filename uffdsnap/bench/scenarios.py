"""Running the sessions of a bench and turning writer logs + event timestamps into numbers.

A session is one object, one set of writer processes, and a sequence of events run against the
same writers one after another: stop-the-world, the native reference handler, then ours in each
mode (or, for the idle object, a raw copy instead of stop-the-world). Every event reports its
anchors on CLOCK_MONOTONIC:

    begin    the event was started (our snapshot process launched, "go" sent, SIGSTOP sent)
    start    writers can first be affected (protect begins; the first SIGSTOP)
    t        T: everything protected (stopped)
    copied   the copy is complete (every page un-protected)
    end      the event is over

and the writers' logs are cut along them. The window just before each event (`gap_s` long) is
that event's undisturbed baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from uffdsnap.bench import procs as P
from uffdsnap.bench.config import BenchConfig, Session, size_label
from uffdsnap.bench.writerlog import Fleet, distribution

WRITER_MAX_SECONDS = 3600
TIMELINE_MARGIN_NS = 30_000_000
MAX_TIMELINE_POINTS = 4000
CDF_POINTS = 400

Say = Callable[[str], None]


def anchors(name: str, ev: dict[str, Any]) -> dict[str, int]:
    """The common anchors of an event's raw report (see the module doc)."""
    if name == "stw":
        return {"begin": ev["t_start_ns"], "start": ev["t_start_ns"], "t": ev["t_stopped_ns"],
                "copied": ev["t_copied_ns"], "end": ev["t_end_ns"]}
    if name == "raw":
        return {"begin": ev["t_start_ns"], "start": ev["t_start_ns"], "t": ev["t_start_ns"],
                "copied": ev["t_end_ns"], "end": ev["t_end_ns"]}
    if name == "native":
        return {"begin": ev["t_sent_ns"], "start": ev["t_go_ns"], "t": ev["t_protected_ns"],
                "copied": ev["t_copied_ns"], "end": ev["t_done_ns"]}
    return {"begin": ev["t_call_ns"], "start": ev["t_protect_start_ns"], "t": ev["t_snapshot_ns"],
            "copied": ev["t_copied_ns"], "end": ev["t_return_ns"]}


def analyse(name: str, ev: dict[str, Any], fleet: Fleet, gap_ns: int,
            first_ns: int) -> dict[str, Any]:
    """What the writers saw of one event: stalls, fault latencies, throughput."""
    a = anchors(name, ev)
    out: dict[str, Any] = {"anchors": a}
    if not fleet.logs:
        return out
    quiet = (max(first_ns, a["begin"] - gap_ns), a["begin"] - 5_000_000)
    out["quiet_ops_per_s"] = fleet.ops_per_s(*quiet)
    out["quiet_max_stall_ns"] = fleet.max_stall(*quiet)
    if name == "stw":
        out["start_pause_ns"] = fleet.max_stall(a["start"], a["end"])
        out["during_ops_per_s"] = fleet.ops_per_s(a["start"], a["end"])
    else:
        out["start_pause_ns"] = fleet.max_stall(a["start"], a["t"])
        out["during_ops_per_s"] = fleet.ops_per_s(a["start"], a["copied"])
        out["fault_latency"] = distribution(fleet.wp_latencies(a["t"], a["end"]))
    if a["begin"] < a["start"]:
        out["before_start_max_stall_ns"] = fleet.max_stall(a["begin"], a["start"])
    out["throughput_ratio"] = out["during_ops_per_s"] / max(out["quiet_ops_per_s"], 1e-9)
    return out


def timeline(name: str, ev: dict[str, Any], fleet: Fleet) -> dict[str, Any]:
    """Plot data for one event: slow operations and ops per interval around it, times in ms
    relative to the event's start."""
    a = anchors(name, ev)
    lo, hi = a["start"] - TIMELINE_MARGIN_NS, a["copied"] + TIMELINE_MARGIN_NS
    slow = fleet.slow_in(lo, hi)
    if len(slow) > MAX_TIMELINE_POINTS:  # keep the tallest, they are what the plot is about
        slow = sorted(sorted(slow, key=lambda x: -x[1])[:MAX_TIMELINE_POINTS])
    times, ops, _ = fleet.series(lo, hi)
    interval_ms = fleet.logs[0].interval_ns / 1e6 if fleet.logs else 1.0
    return {
        "event": name,
        "phases_ms": {k: (v - a["start"]) / 1e6 for k, v in a.items()},
        "slow_ms": [[(t - a["start"]) / 1e6, v / 1e6] for t, v in slow],
        "ops_t_ms": [(t - a["start"]) / 1e6 for t in times],
        "ops_per_ms": [n / interval_ms for n in ops],
        "slow_threshold_ms": fleet.slow_threshold_ns / 1e6,
    }


def cdf_points(values: list[int]) -> list[int]:
    """At most CDF_POINTS evenly spaced order statistics of `values` (for a CDF plot)."""
    v = sorted(values)
    if len(v) <= CDF_POINTS:
        return v
    return [v[round(i * (len(v) - 1) / (CDF_POINTS - 1))] for i in range(CDF_POINTS)]


def run_session(ws: P.Workspace, cfg: BenchConfig, s: Session, say: Say) -> dict[str, Any]:
    """Run one session; return its raw events, what the writers saw of each, and plot data."""
    result: dict[str, Any] = {"name": s.name, "label": s.label, "kind": s.kind, "size": s.size,
                              "procs": s.procs, "rate": s.rate, "probe": s.probe,
                              "idle": s.idle, "purposes": list(s.purposes), "events": {},
                              "seen": {}, "errors": {}}
    if s.kind == "hugetlb":
        why = P.ensure_huge_pages(ws, s.size, cfg.reserve_hugepages)
        if why:
            result["skipped"] = why
            say(f"  {s.label}: skipped ({why})")
            return result
    how = "idle mappers" if s.idle else \
        f"writers at {s.rate:g} writes/s" if s.rate else "writers flat out"
    say(f"  {s.label}: {how}; events: {', '.join(s.events)}")
    obj = P.create_object(ws, s.kind, s.size)
    handler = P.start_handler(ws, obj, s.procs, cfg.nice) if "native" in s.events else None
    writers: list[P.Writer] = []
    try:
        writers = P.start_writers(ws, obj, s.procs, rate=s.rate, probe=s.probe, idle=s.idle,
                                  uffd_sock=handler.sock if handler else None,
                                  max_seconds=WRITER_MAX_SECONDS)
        t_first = P.now_ns()
        if handler:
            P.handler_ready(handler)
        time.sleep(cfg.warmup_s)
        pids = [w.proc.pid for w in writers]
        for name in s.events:
            try:
                ev = _run_event(ws, cfg, name, obj, pids, handler)
            except P.BenchError as e:
                result["errors"][name] = str(e)
                say(f"    {name}: FAILED: {e}")
            else:
                result["events"][name] = ev
                say(f"    {name}: {_brief(name, ev)}")
            time.sleep(cfg.gap_s)
        fleet = P.stop_writers(ws, writers)
        writers = []
    finally:
        for w in writers:
            ws.end(w.proc)
        if handler:
            ws.end(handler.proc)
        P.close_object(ws, obj)
    gap_ns = int(cfg.gap_s * 1e9)
    result["writer_ops"] = fleet.ops
    result["writer_records_dropped"] = fleet.dropped
    for name, ev in result["events"].items():
        seen = analyse(name, ev, fleet, gap_ns, t_first + 100_000_000)
        result["seen"][name] = seen
        if "timeline" in s.purposes and fleet.logs:
            result.setdefault("timelines", {})[name] = timeline(name, ev, fleet)
        if s.probe and name not in ("stw", "raw") and fleet.logs:
            a = seen["anchors"]
            result.setdefault("fault_cdf_ns", {})[name] = cdf_points(
                fleet.wp_latencies(a["t"], a["end"]))
    return result


def _run_event(ws: P.Workspace, cfg: BenchConfig, name: str, obj: P.BenchObject,
               pids: list[int], handler: P.Handler | None) -> dict[str, Any]:
    if name == "stw":
        return P.stop_the_world(ws, obj, pids)
    if name == "raw":
        return P.plain_copy(ws, obj)
    if name == "native":
        assert handler is not None
        return P.run_native(ws, handler, cfg.timeout_s)
    return P.run_ours(ws, obj, name, cfg.timeout_s, cfg.nice)


def _brief(name: str, ev: dict[str, Any]) -> str:
    ms = 1e6
    mbps = ev.get("copy_bytes_per_s", 0) / (1 << 20)
    if name == "stw":
        return f"paused {ev['pause_ns'] / ms:.1f} ms (copy {mbps:.0f} MiB/s)"
    if name == "raw":
        return f"copied at {mbps:.0f} MiB/s"
    if name == "native":
        return (f"protect {ev['protect_total_ns'] / ms:.2f} ms, {ev['faults']} faults, "
                f"copy {mbps:.0f} MiB/s")
    s = ev["summary"]
    return (f"protect phase {s['protect_phase_ns'] / ms:.2f} ms, {s['faults']} faults, copy "
            f"{s['copy_throughput_bytes_per_s'] / (1 << 20):.0f} MiB/s, coordinator "
            f"{ev['coordinator_cpu_s']:.2f} s CPU, {ev['coordinator_maxrss_bytes'] >> 20} MiB")


def run_all(cfg: BenchConfig, sessions: list[Session], dest_dir: str,
            say: Say) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every session in a fresh workspace that is cleaned up on every way out."""
    ws = P.Workspace(dest_dir)
    info = {"machine": P.machine_info(dest_dir), "load_before": P.load_average()}
    results = []
    try:
        for i, s in enumerate(sessions, 1):
            say(f"[{i}/{len(sessions)}] {s.name} ({', '.join(s.purposes)}; "
                f"{size_label(s.size)}, {s.procs} process{'es' if s.procs > 1 else ''})")
            results.append(run_session(ws, cfg, s, say))
    finally:
        ws.close()
    info["load_after"] = P.load_average()
    return results, info
