"""PNG plots of a bench result (matplotlib, the optional `plot` extra; no plots without it).

Plots are drawn from the result dictionary alone, so a saved `--json` result can be re-plotted.
"""

from __future__ import annotations

import os
from typing import Any

from uffdsnap.bench.config import size_label

COLORS = {"stw": "tab:red", "native": "tab:green", "raw": "tab:gray", "agents": "tab:blue",
          "delegated": "tab:purple"}
LABELS = {"stw": "stop-the-world", "native": "native handler (C)", "raw": "raw copy"}
DPI = 80


def available() -> str | None:
    """None if matplotlib can be used; else the note to print instead of the plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'uffdsnap[plot]')"
    return None


def _label(name: str) -> str:
    return LABELS.get(name, f"uffdsnap ({name})")


def _order(name: str) -> tuple[int, str]:
    """Baselines first (stop-the-world, raw, native), then our modes."""
    return ({"stw": 0, "raw": 1, "native": 2}.get(name, 3), name)


def _color(name: str, i: int = 0) -> str:
    return COLORS.get(name, ["tab:orange", "tab:brown", "tab:olive"][i % 3])


def draw(result: dict[str, Any], out_dir: str) -> list[str]:
    """Write every plot the result has data for into out_dir; return their paths."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fn in (("timeline.png", _timeline), ("fault-latency.png", _fault_cdf),
                     ("scaling.png", _scaling)):
        fig = fn(result, plt)
        if fig is None:
            continue
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        _shrink(path)
        paths.append(path)
    return paths


def _shrink(path: str) -> None:
    """Re-save with a 64-colour palette: a quarter of the size, small enough to commit."""
    try:
        from PIL import Image  # a dependency of matplotlib
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _ticks(ax: Any, values: list[float], labels: list[str]) -> None:
    ax.set_xticks(values)
    ax.set_xticklabels(labels)
    ax.minorticks_off()


def _timeline(result: dict[str, Any], plt: Any) -> Any:
    """Writer stalls and throughput around each event of the throughput session."""
    session = next((s for s in result["sessions"] if s.get("timelines")), None)
    if session is None:
        return None
    lines = session["timelines"]
    names = sorted(lines, key=_order)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.2), sharey="row",
                             squeeze=False)
    hi = max(lines[n]["phases_ms"]["copied"] for n in names) + 30  # one time scale for all
    for col, name in enumerate(names):
        tl = lines[name]
        ph = tl["phases_ms"]
        top, bottom = axes[0][col], axes[1][col]
        for ax in (top, bottom):
            if name == "stw":
                ax.axvspan(ph["start"], ph["end"], color="tab:red", alpha=0.15, lw=0)
            elif name != "raw":
                ax.axvspan(ph["start"], ph["t"], color="tab:orange", alpha=0.25, lw=0)
                ax.axvspan(ph["t"], ph["copied"], color="tab:blue", alpha=0.10, lw=0)
        xs = [p[0] for p in tl["slow_ms"]]
        ys = [p[1] for p in tl["slow_ms"]]
        top.scatter(xs, ys, s=4, color=_color(name, col))
        top.set_yscale("log")
        top.set_title(_label(name), fontsize=10)
        bottom.plot(tl["ops_t_ms"], [v / 1e3 for v in tl["ops_per_ms"]], lw=0.7,
                    color=_color(name, col))
        bottom.set_xlabel("ms from the event's start")
        for ax in (top, bottom):
            ax.set_xlim(-30, hi)
    axes[0][0].set_ylabel(f"write stall, ms (>= {lines[names[0]]['slow_threshold_ms']:g})")
    axes[1][0].set_ylabel("writes per ms (thousands)")
    fig.suptitle(f"one writer, random 4 KiB writes flat out, {session['label']}: red = world "
                 "stopped, orange = protect (T at its end), blue = copy", fontsize=9)
    fig.tight_layout()
    return fig


def _fault_cdf(result: dict[str, Any], plt: Any) -> Any:
    """CDF of write-protect fault latency as the writers saw it, one panel per memory kind."""
    sessions = [s for s in result["sessions"]
                if s.get("fault_cdf_ns") and "start_pause" in s["purposes"]]
    kinds = sorted({s["kind"] for s in sessions}, key=["shmem", "hugetlb"].index)
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, kind in zip(axes[0], kinds, strict=True):
        for si, s in enumerate(x for x in sessions if x["kind"] == kind):
            for ei, name in enumerate(sorted(s["fault_cdf_ns"], key=_order)):
                values = s["fault_cdf_ns"][name]
                if not values:
                    continue
                n = len(values)
                ax.plot([v / 1e3 for v in values], [(i + 1) / n for i in range(n)],
                        styles[si % len(styles)], color=_color(name, ei), lw=1.2,
                        label=f"{_label(name)}, {s['label']}")
        ax.set_xscale("log")
        ax.set_xlabel("write-protect fault as the writer sees it (µs)")
        ax.set_title(f"{kind}: store to resumption", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of faulting stores")
    fig.tight_layout()
    return fig


def _scaling(result: dict[str, Any], plt: Any) -> Any:
    """Pauses and copy throughput by object size and by process count; coordinator cost."""
    rows = result["scenarios"]["scaling"]
    if not rows:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    base = min(r["size"] for r in rows)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))

    def points(mode: str | None, key: str) -> list[dict[str, Any]]:
        pts = [r for r in rows if (mode is None or r["mode"] == mode)
               and (r["procs"] == 1 if key == "size" else r["size"] == base)]
        if mode is None:  # baselines: one point per configuration
            pts = list({(r["size"], r["procs"]): r for r in pts}.values())
        return sorted(pts, key=lambda r: r[key])

    def x(r: dict[str, Any], key: str) -> float:
        return float(r[key] / (1 << 20) if key == "size" else r[key])

    for ax, key, xlabel in ((axes[0][0], "size", "object size (1 process)"),
                            (axes[0][1], "procs", f"processes ({size_label(base)} object)")):
        for mode in modes:
            pts = points(mode, key)
            ax.plot([x(r, key) for r in pts], [r["ours_ns"] / 1e6 for r in pts], "o-",
                    color=_color(mode), label=f"{_label(mode)}: start pause (writers)")
            ax.plot([x(r, key) for r in pts], [r["ours_protect_phase_ns"] / 1e6 for r in pts],
                    ":", color=_color(mode), label=f"{_label(mode)}: protect phase")
        pts = points(None, key)
        for field, label, color in (("kernel_protect_ns", "kernel protect (native)",
                                     "tab:green"),
                                    ("stw_ns", "stop-the-world pause", "tab:red")):
            ax.plot([x(r, key) for r in pts], [(r[field] or 0) / 1e6 for r in pts], "s-",
                    color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _ticks(ax, [x(r, key) for r in pts],
               [size_label(r["size"]) if key == "size" else str(r["procs"]) for r in pts])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    ax = axes[1][0]
    for mode in modes:
        pts = points(mode, "size")
        ax.plot([x(r, "size") for r in pts], [r["ours_copy_bytes_per_s"] / (1 << 20) for r in pts],
                "o-", color=_color(mode), label=_label(mode))
    pts = points(None, "size")
    for field, label, color in (("native_copy_bytes_per_s", "native handler", "tab:green"),
                                ("raw_copy_bytes_per_s", "raw copy (world stopped)", "tab:red")):
        ax.plot([x(r, "size") for r in pts], [(r[field] or 0) / (1 << 20) for r in pts], "s-",
                label=label, color=color)
    ax.set_xscale("log", base=2)
    _ticks(ax, [x(r, "size") for r in pts], [size_label(r["size"]) for r in pts])
    ax.set_xlabel("object size (1 paced writer)")
    ax.set_ylabel("copy MiB/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    configs = sorted({(r["size"], r["procs"]) for r in rows})
    idx = list(range(len(configs)))
    ax2 = ax.twinx()
    for mode in modes:
        by = {(r["size"], r["procs"]): r for r in rows if r["mode"] == mode}
        ax.plot(idx, [by[c]["coordinator_maxrss_bytes"] / (1 << 20) if c in by else None
                      for c in configs], "o-", color=_color(mode), label=f"{mode}: peak RSS")
        ax2.plot(idx, [by[c]["coordinator_cpu_s"] if c in by else None for c in configs],
                 "^--", color=_color(mode), label=f"{mode}: CPU")
    ax.set_ylabel("coordinator peak RSS, MiB (solid)")
    ax2.set_ylabel("coordinator CPU, s (dashed)")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax.set_xticks(idx)
    ax.set_xticklabels([f"{size_label(s)}\nx{p}" for s, p in configs], fontsize=7)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
