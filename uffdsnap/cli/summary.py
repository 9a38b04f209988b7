"""The human-readable snapshot summary (the JSON form is the summary dict itself)."""

from __future__ import annotations

from typing import Any

from uffdsnap.stats import ns_text, size_text


def human_summary(s: dict[str, Any]) -> str:
    procs = s.get("processes", s.get("processes_count", 0))
    nproc = len(procs) if isinstance(procs, list) else procs
    gone = s.get("processes_gone", s.get("processes_gone_count", 0))
    ngone = len(gone) if isinstance(gone, list) else gone
    fs = s.get("fault_service", {
        k.removeprefix("fault_service_"): v for k, v in s.items()
        if k.startswith("fault_service_")})
    copy_s = max(s.get("copy_ns", 0), 1) / 1e9
    return "\n".join([
        f"snapshot {s.get('image', '')}: {size_text(s['object_size'])} at {s['snapshot_time']}",
        *_incremental_lines(s),
        f"  processes    {nproc} tracked, {ngone} exited during the snapshot; agents joined in "
        f"{ns_text(s.get('join_ns', 0))}; request to T {ns_text(s.get('request_to_t_ns', 0))}",
        f"  start pause  protect phase {ns_text(s['protect_phase_ns'])} (kernel protect max "
        f"{ns_text(s['kernel_protect_max_ns'])}), longest held fault "
        f"{ns_text(s['start_pause_max_ns'])}",
        f"  faults       {s['faults']} ({s['duplicate_faults']} duplicates); service p50 "
        f"{ns_text(fs.get('p50_ns', 0))}, p99 {ns_text(fs.get('p99_ns', 0))}, max "
        f"{ns_text(fs.get('max_ns', 0))}",
        f"  copy         {size_text(s['bytes_scanned'])} in {ns_text(s['copy_ns'])} "
        f"({size_text(s['bytes_scanned'] / copy_s)}/s); total {ns_text(s['duration_ns'])}",
    ])


def _incremental_lines(s: dict[str, Any]) -> list[str]:
    """Nothing, or (write tracking) what kind of image this is and why."""
    inc = s.get("incremental") or {k.removeprefix("incremental_"): v for k, v in s.items()
                                   if k.startswith("incremental_")}
    if not inc:
        return []
    pages = inc.get("pages_written_since_parent", 0)
    if inc.get("delta"):
        return [f"  incremental  delta of {pages} page(s) written since {inc.get('parent', '')}"]
    if inc.get("requested"):
        return [f"  incremental  FULL image instead of a delta: {inc.get('full_reason', '')}"]
    return ["  incremental  full image (writes are tracked for the next --incremental)"]
