"""What a snapshot reports: the summary (`snapshot --json`, the client's `result`) and the
manifest fields published beside the image."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from uffdsnap.native.core import CoreStats
from uffdsnap.procfs import SharedObject
from uffdsnap.stats import LatencyHistogram, monotonic_ns


@dataclass
class Timeline:
    """CLOCK_MONOTONIC instants of one snapshot (ns), and T on the wall clock."""

    start: int = 0  # the request
    protect: int = 0  # protect sent (joining done)
    t_mono: int = 0  # T
    t_wall: int = 0
    copied: int = 0  # the copy ended


def summary(*, mode: str, obj: SharedObject, timeline: Timeline, core: CoreStats,
            processes: list[dict[str, Any]], gone: list[dict[str, Any]],
            agent_hists: list[tuple[tuple[tuple[int, int], ...], int]], faults: int,
            duplicate_faults: int, held_wait_max_ns: int, fault_channels: int,
            bytes_scanned: int, escapes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's result as one flat-ish dict (JSON-ready). `escapes`: the escape audit's
    report (coordinator/_escapes.py), kept in the manifest's stats too."""
    hist = LatencyHistogram()
    hist.merge(core.service_buckets, core.service_max_ns)
    for buckets, max_ns in agent_hists:
        hist.merge(buckets, max_ns)
    t = timeline
    copy_s = max(t.copied - t.t_mono, 1) / 1e9
    return {
        "ok": True,
        "mode": mode,
        "snapshot_time_unix_ns": t.t_wall,
        "snapshot_time": datetime.fromtimestamp(t.t_wall / 1e9, UTC).isoformat(),
        "object_size": obj.size,
        "page_size": obj.page_size,
        "processes": processes,
        "processes_gone": gone,
        "join_ns": (t.protect or t.t_mono) - t.start,
        "protect_phase_ns": t.t_mono - (t.protect or t.t_mono),
        "request_to_t_ns": t.t_mono - t.start,
        "kernel_protect_max_ns": max((p["protect_ns"] for p in processes), default=0),
        # (every process's, back to back: what one protector needs, as the native handler)
        "kernel_protect_total_ns": sum(p["protect_ns"] for p in processes),
        "start_pause_max_ns": max(held_wait_max_ns, core.held_wait_max_ns),
        "faults": faults + core.faults,
        "fault_channels": fault_channels,
        "duplicate_faults": duplicate_faults + core.duplicates,
        "pages_saved_by_faults": core.fault_pages_saved,
        "fault_service": hist.summary(),
        "bytes_scanned": bytes_scanned,
        "copy_ns": t.copied - t.t_mono,
        "copy_throughput_bytes_per_s": math.floor(bytes_scanned / copy_s),
        "duration_ns": monotonic_ns() - t.start,
        "escapes": escapes if escapes is not None else {"audited": False},
    }


def manifest_fields(obj: SharedObject, summary: dict[str, Any]) -> dict[str, Any]:
    """What the coordinator adds to the image's manifest (the writer adds the extents)."""
    oid = obj.object_id
    return {
        "object": {"size": obj.size, "page_size": obj.page_size, "source": obj.spec,
                   "kind": "hugetlbfs" if obj.hugetlb else "shmem",
                   "dev": os.makedev(oid.major, oid.minor), "inode": oid.inode},
        "snapshot_time": summary["snapshot_time_unix_ns"],
        "processes": summary["processes"] + summary["processes_gone"],
        "stats": {k: v for k, v in summary.items()
                  if k not in ("processes", "processes_gone", "snapshot_time",
                               "snapshot_time_unix_ns", "ok")},
    }


def flat(summary: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of a summary, for a `result` message (nested values flattened one
    level, lists counted)."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": v for k, v in value.items()
                        if isinstance(v, int | float | str | bool)})
        elif isinstance(value, int | float | str | bool):
            out[key] = value
        elif isinstance(value, list):
            out[f"{key}_count"] = len(value)
    return out
