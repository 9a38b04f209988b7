"""From session results to the scenarios of the issue, the table of ratios and targets, and text.

Every row of the table compares one of our numbers with a baseline measured in the same run on
the same memory: ratio = ours / baseline, and, where the issue sets one, the target and whether
it was met.
"""

from __future__ import annotations

from typing import Any

from uffdsnap.bench import incremental, timetot
from uffdsnap.bench.config import (
    COPY_TARGET,
    FAULT_P50_TARGET,
    FAULT_P99_NATIVE_TARGET,
    FAULT_P99_TARGET,
    RSS_TARGET_AT,
    RSS_TARGET_BYTES,
    START_PAUSE_TARGET,
    WORKLOAD_TARGET,
    size_label,
)

MiB = 1 << 20


def _ours(session: dict[str, Any], modes: list[str]) -> list[str]:
    return [m for m in modes if m in session["events"]]


def scenarios(sessions: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """The issue's scenarios, each a list of records with every raw number that matters."""
    out: dict[str, list[dict[str, Any]]] = {"start_pause": [], "fault_service": [], "copy": [],
                                            "workload": [], "scaling": []}
    for s in sessions:
        if s.get("skipped"):
            continue
        ev, seen = s["events"], s["seen"]
        where = {"session": s["name"], "kind": s["kind"], "size": s["size"], "procs": s["procs"]}
        native, stw = ev.get("native"), ev.get("stw")
        for mode in _ours(s, modes):
            ours, oseen = ev[mode], seen[mode]
            summary = ours["summary"]
            base = {**where, "mode": mode}
            if "start_pause" in s["purposes"] or "scaling" in s["purposes"]:
                pause = {
                    **base,
                    "ours_ns": oseen.get("start_pause_ns"),
                    "ours_coordinator_reported_ns": summary["start_pause_max_ns"],
                    "ours_protect_phase_ns": summary["protect_phase_ns"],
                    "ours_kernel_protect_max_ns": summary["kernel_protect_max_ns"],
                    "ours_attach_stall_ns": oseen.get("before_start_max_stall_ns"),
                    "ours_join_ns": summary["join_ns"],
                    "kernel_protect_ns": native["protect_total_ns"] if native else None,
                    "kernel_protect_per_process_ns": native["protect_ns"] if native else None,
                    "native_start_pause_ns": seen["native"].get("start_pause_ns")
                    if native else None,
                    "stw_ns": seen["stw"].get("start_pause_ns") if stw else None,
                    "stw_pause_measured_ns": stw["pause_ns"] if stw else None,
                    "quiet_max_stall_ns": oseen.get("quiet_max_stall_ns"),
                }
                if "start_pause" in s["purposes"]:
                    out["start_pause"].append(pause)
                if "scaling" in s["purposes"]:
                    out["scaling"].append({
                        **pause,
                        "ours_copy_bytes_per_s": summary["copy_throughput_bytes_per_s"],
                        "raw_copy_bytes_per_s": stw["copy_bytes_per_s"] if stw else None,
                        "native_copy_bytes_per_s": native["copy_bytes_per_s"] if native else None,
                        "coordinator_cpu_s": ours["coordinator_cpu_s"],
                        "coordinator_maxrss_bytes": ours["coordinator_maxrss_bytes"],
                        "coordinator_rss_before_bytes": ours["coordinator_rss_before_bytes"],
                        "agents_cpu_s": ours["agents_cpu_s"],
                        "agents_maxrss_bytes": ours["agents_maxrss_bytes"],
                        "faults": summary["faults"],
                        "duration_ns": summary["duration_ns"],
                    })
            if "start_pause" in s["purposes"] and native:
                out["fault_service"].append({
                    **base,
                    "ours": oseen.get("fault_latency"),
                    "native": seen["native"].get("fault_latency"),
                    "ours_agent_side": summary["fault_service"],
                    "native_handler_side": native["service"],
                    "ours_faults": summary["faults"],
                    "native_faults": native["faults"],
                })
            if "copy" in s["purposes"]:
                raw = ev.get("raw")
                out["copy"].append({
                    **base,
                    "ours_bytes_per_s": summary["copy_throughput_bytes_per_s"],
                    "raw_bytes_per_s": raw["copy_bytes_per_s"] if raw else None,
                    "native_bytes_per_s": native["copy_bytes_per_s"] if native else None,
                    "ours_copy_ns": summary["copy_ns"],
                    "coordinator_cpu_s": ours["coordinator_cpu_s"],
                    "coordinator_maxrss_bytes": ours["coordinator_maxrss_bytes"],
                })
            if "workload" in s["purposes"] or ("start_pause" in s["purposes"]
                                               and s["kind"] == "shmem"):
                out["workload"].append({
                    **base,
                    "rate": s.get("rate"),
                    "undisturbed_ops_per_s": oseen.get("quiet_ops_per_s"),
                    "during_ops_per_s": oseen.get("during_ops_per_s"),
                    "ratio": oseen.get("throughput_ratio"),
                    "window_ns": summary["protect_phase_ns"] + summary["copy_ns"],
                    "native_undisturbed_ops_per_s": seen["native"].get("quiet_ops_per_s")
                    if native else None,
                    "native_during_ops_per_s": seen["native"].get("during_ops_per_s")
                    if native else None,
                    "native_ratio": seen["native"].get("throughput_ratio") if native else None,
                    "stw_ratio": seen["stw"].get("throughput_ratio") if stw else None,
                })
    return out


def _row(scenario: str, ours: float | None, baseline: float | None, baseline_name: str,
         unit: str, target: tuple[str, float] | None, note: str = "") -> dict[str, Any]:
    """One table row. target = ("<=", x) / (">=", x) on the ratio, or ("<=abs", v) on ours."""
    ratio = ours / baseline if ours is not None and baseline else None
    met: bool | None = None
    target_text = ""
    if target is not None:
        op, value = target
        if op == "<=abs":
            target_text = f"<= {_fmt(value, unit)}"
            met = None if ours is None else ours <= value
        else:
            target_text = f"{op} {value:g}x"
            if ratio is not None:
                met = ratio <= value if op == "<=" else ratio >= value
    return {"scenario": scenario, "ours": ours, "baseline": baseline,
            "baseline_name": baseline_name, "unit": unit, "ratio": ratio,
            "target": target_text, "met": met, "note": note}


def table(sc: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the summary table: each of our numbers beside its baseline, with the ratio
    and whether it meets its target (DESIGN §6)."""
    rows: list[dict[str, Any]] = []
    for r in sc["start_pause"]:
        where = f"{r['kind']} {size_label(r['size'])} x{r['procs']}, {r['mode']}"
        rows.append(_row(f"start pause vs kernel protect, {where}", r["ours_ns"],
                         r["kernel_protect_ns"], "kernel protect (native, all processes)", "ns",
                         ("<=", START_PAUSE_TARGET)))
        rows.append(_row(f"start pause vs stop-the-world, {where}", r["ours_ns"], r["stw_ns"],
                         "stop-the-world pause", "ns", None))
    for r in sc["fault_service"]:
        ours, nat = r["ours"] or {}, r["native"] or {}
        where = f"{r['kind']} {size_label(r['size'])} x{r['procs']}, {r['mode']}"
        p50_target = FAULT_P50_TARGET.get(r["mode"])
        rows.append(_row(f"fault service p50 vs native p50, {where}", ours.get("p50_ns"),
                         nat.get("p50_ns"), "native handler p50", "ns",
                         ("<=", p50_target) if p50_target else None,
                         f"{ours.get('count', 0)} vs {nat.get('count', 0)} faults"))
        rows.append(_row(f"fault service p99 vs native p50, {where}", ours.get("p99_ns"),
                         nat.get("p50_ns"), "native handler p50", "ns",
                         ("<=", FAULT_P99_TARGET), f"native p99 {_fmt(nat.get('p99_ns'), 'ns')}"))
        rows.append(_row(f"fault service p99 vs native p99, {where}", ours.get("p99_ns"),
                         nat.get("p99_ns"), "native handler p99", "ns",
                         ("<=", FAULT_P99_NATIVE_TARGET)))
        rows.append(_row(f"fault service max vs native max, {where}", ours.get("max_ns"),
                         nat.get("max_ns"), "native handler max", "ns", None))
    for r in sc["copy"]:
        rows.append(_row(f"copy vs raw copy, idle {size_label(r['size'])}, {r['mode']}",
                         r["ours_bytes_per_s"], r["raw_bytes_per_s"], "raw copy", "B/s",
                         (">=", COPY_TARGET)))
    seen_native_copy = set()
    for r in sc["copy"]:
        if r["native_bytes_per_s"] and r["size"] not in seen_native_copy:
            seen_native_copy.add(r["size"])
            rows.append(_row(f"copy vs raw copy, idle {size_label(r['size'])}, native",
                             r["native_bytes_per_s"], r["raw_bytes_per_s"], "raw copy", "B/s",
                             None, "reference"))
    for r in sorted(sc["workload"], key=lambda r: r.get("rate") is not None):
        how = f"paced {r['rate']:g}/s" if r.get("rate") else "flat out"
        what = f"writes/s during vs undisturbed, {how}, {size_label(r['size'])} x{r['procs']}"
        rows.append(_row(f"{what}, {r['mode']}", r["during_ops_per_s"],
                         r["undisturbed_ops_per_s"], "undisturbed", "ops/s",
                         (">=", WORKLOAD_TARGET)))
        if r["native_ratio"] is not None and r["mode"] == sc["workload"][0]["mode"]:
            rows.append(_row(f"{what}, native", r["native_during_ops_per_s"],
                             r["native_undisturbed_ops_per_s"], "undisturbed", "ops/s", None,
                             "reference"))
    rows += timetot.rows(sc.get("time_to_t", []), _row)
    if sc.get("incremental"):
        rows += incremental.rows(sc["incremental"], _row)
    by_mode: dict[str, dict[str, Any]] = {}
    for r in sc["scaling"]:
        best = by_mode.get(r["mode"])
        if best is None or (r["size"], r["procs"]) > (best["size"], best["procs"]):
            by_mode[r["mode"]] = r
    for mode, r in by_mode.items():
        at = f"{size_label(r['size'])} x{r['procs']}"
        note = "" if r["size"] >= RSS_TARGET_AT else \
            f"target is for {size_label(RSS_TARGET_AT)}"
        rows.append(_row(f"coordinator peak RSS at {at}, {mode}", r["coordinator_maxrss_bytes"],
                         None, "", "B", ("<=abs", RSS_TARGET_BYTES), note))
        rows.append(_row(f"coordinator CPU at {at}, {mode}", r["coordinator_cpu_s"], None, "",
                         "s", None, f"agents {r['agents_cpu_s']:.2f} s"))
    return rows


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "ns":
        if v < 1e3:
            return f"{v:.0f} ns"
        if v < 1e6:
            return f"{v / 1e3:.1f} µs"
        if v < 1e9:
            return f"{v / 1e6:.2f} ms"
        return f"{v / 1e9:.2f} s"
    if unit == "B/s":
        return f"{v / MiB:.0f} MiB/s"
    if unit == "B":
        return f"{v / MiB:.0f} MiB"
    if unit == "ops/s":
        return f"{v / 1e3:.1f} k/s" if v >= 1e3 else f"{v:.0f} /s"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:g}"


def fmt(v: float | None, unit: str) -> str:
    return _fmt(v, unit)


def _met(m: bool | None) -> str:
    return "—" if m is None else ("met" if m else "NOT met")


def render_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The summary table as text (aligned columns, or a markdown table)."""
    head = ["scenario", "ours", "baseline", "ratio", "target", "met"]
    body = []
    for r in rows:
        body.append([r["scenario"] + (f" [{r['note']}]" if r["note"] else ""),
                     _fmt(r["ours"], r["unit"]), _fmt(r["baseline"], r["unit"]),
                     "—" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                     r["target"] or "—", _met(r["met"])])
    return _grid(head, body, markdown)


def render_scaling(sc: dict[str, Any], markdown: bool = False) -> str:
    """How each cost grows with object size and process count, one row per scaling session."""
    head = ["object", "procs", "mode", "kernel protect", "ours: protect phase", "ours: start pause",
            "stop-the-world", "ours copy", "raw copy", "coord CPU", "coord RSS", "agents CPU"]
    body = []
    for r in sorted(sc["scaling"], key=lambda r: (r["mode"], r["procs"], r["size"])):
        body.append([size_label(r["size"]), str(r["procs"]), r["mode"],
                     _fmt(r["kernel_protect_ns"], "ns"), _fmt(r["ours_protect_phase_ns"], "ns"),
                     _fmt(r["ours_ns"], "ns"), _fmt(r["stw_ns"], "ns"),
                     _fmt(r["ours_copy_bytes_per_s"], "B/s"),
                     _fmt(r["raw_copy_bytes_per_s"], "B/s"),
                     _fmt(r["coordinator_cpu_s"], "s"), _fmt(r["coordinator_maxrss_bytes"], "B"),
                     _fmt(r["agents_cpu_s"], "s")])
    return _grid(head, body, markdown)


def _grid(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in body]
    return "\n".join(lines)
