"""`uffdsnap bench`: our snapshots measured against their baselines, side by side in one run.

The scenarios (DESIGN §6, docs/benchmarks.md): start pause vs. stop-the-world and vs. the
kernel's protect time; fault service latency as a writer sees it vs. a native C handler; copy
throughput vs. a raw copy; workload throughput during a snapshot vs. undisturbed; and how each
grows with object size and process count, with the coordinator's CPU and peak RSS.

Layout: config (modes, targets, plan of sessions) -> procs (helper processes, events, cleanup)
-> writerlog (what the writers recorded) -> scenarios (sessions -> numbers) -> report (table)
-> plots (PNG, optional). snaprun is the process one of our snapshots runs in.
"""

from typing import Any

from uffdsnap.bench.config import MODES, BenchConfig

__all__ = ["MODES", "BenchConfig", "run_bench"]


def __getattr__(name: str) -> Any:
    # run_bench is imported on first use: `uffdsnap` builds every command's parser at start-up
    # (every agent too), and the bench machinery has no business slowing that down.
    if name == "run_bench":
        from uffdsnap.bench.run import run_bench

        return run_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
