"""run_bench(): plan, run every session, derive the scenarios and the table, draw the plots."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from uffdsnap.bench import plots
from uffdsnap.bench.config import BenchConfig, plan
from uffdsnap.bench.incremental import run_incremental
from uffdsnap.bench.procs import BenchError
from uffdsnap.bench.report import scenarios, table
from uffdsnap.bench.scenarios import run_all
from uffdsnap.bench.streaming import rows as streaming_rows
from uffdsnap.bench.streaming import run_streaming
from uffdsnap.bench.timetot import run_time_to_t
from uffdsnap.errors import UserError
from uffdsnap.native.libc import KernelError
from uffdsnap.native.uffd import create_uffd
from uffdsnap.testing import build as devbuild


def preflight(cfg: BenchConfig) -> str:
    """Fail early, in one line, where the bench cannot run; return the destination directory."""
    if os.geteuid() != 0:
        raise UserError("the bench attaches to its writers with ptrace and creates "
                        "userfaultfds for them: run it as root (see `uffdsnap doctor`)")
    try:
        fd, _ = create_uffd()
        os.close(fd)
    except KernelError as e:
        raise UserError(f"userfaultfd is not available here: {e}") from None
    devbuild.build("bench_writer")
    devbuild.build("bench_handler")
    dest = cfg.dest_dir or tempfile.gettempdir()
    if not os.path.isdir(dest) or not os.access(dest, os.W_OK):
        raise UserError(f"--dest {dest}: not a writable directory")
    return dest


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = print,
              command: str = "uffdsnap bench") -> dict[str, Any]:
    """Run the whole bench; return the result (JSON-able). Plots go to cfg.out_dir if given."""
    dest_root = preflight(cfg)
    sessions = plan(cfg) if "sessions" in cfg.parts else []
    say(f"uffdsnap bench: {len(sessions)} sessions, modes {', '.join(cfg.modes)}; images in "
        f"{dest_root}")
    dest = tempfile.mkdtemp(prefix="uffdsnap-bench-", dir=dest_root)
    t0 = time.monotonic()
    try:
        results, info = run_all(cfg, sessions, dest, say)
        time_to_t = run_time_to_t(cfg, dest, say) if "time-to-t" in cfg.parts else []
        streaming = run_streaming(cfg, dest, say) if "streaming" in cfg.parts else {}
        incremental = run_incremental(cfg, dest, say) if "incremental" in cfg.parts else {}
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    sc = scenarios(results, list(cfg.modes))
    sc["time_to_t"] = time_to_t
    sc["streaming"] = streaming
    sc["incremental"] = incremental
    rows = table(sc) + (streaming_rows(streaming) if streaming else [])
    skipped = [{"session": r["name"], "reason": r["skipped"]} for r in results if r.get("skipped")]
    errors = [{"session": r["name"], "event": ev, "error": msg}
              for r in results for ev, msg in r.get("errors", {}).items()]
    result: dict[str, Any] = {
        "ok": not errors,
        "command": command,
        "config": cfg.to_dict(),
        **info,
        "duration_s": round(time.monotonic() - t0, 1),
        "sessions": results,
        "scenarios": sc,
        "table": rows,
        "skipped": skipped,
        "errors": errors,
        "plots": [],
        "notes": [],
    }
    load = (info.get("load_before") or [0.0])[0]  # before we added any load of our own
    if load > (os.cpu_count() or 1) * 0.5:
        result["notes"].append(f"the machine was busy before the run (load average {load:.1f} "
                               f"on {os.cpu_count()} CPUs): numbers are noisier than usual")
    if cfg.plots and cfg.out_dir:
        why_not = plots.available()
        if why_not:
            result["notes"].append(why_not)
        else:
            result["plots"] = plots.draw(result, cfg.out_dir)
    elif cfg.plots:
        result["notes"].append("plots skipped: no --out directory")
    if errors and not any(r["ours"] is not None for r in rows):
        raise BenchError(f"the bench failed: {errors[0]['session']} {errors[0]['event']}: "
                         f"{errors[0]['error']}")
    return result
