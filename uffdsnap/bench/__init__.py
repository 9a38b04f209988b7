"""`uffdsnap bench`: our snapshots measured against their baselines, side by side in one run.

The scenarios (DESIGN §6, docs/benchmarks.md): start pause vs. stop-the-world and vs. the
kernel's protect time; fault service latency as a writer sees it vs. a native C handler; copy
throughput vs. a raw copy; workload throughput during a snapshot vs. undisturbed; and how each
grows with object size and process count, with the coordinator's CPU and peak RSS.

Layout: config (modes, targets, plan of sessions) -> procs (helper processes, events, cleanup)
-> writerlog (what the writers recorded) -> scenarios (sessions -> numbers) -> report (table)
-> plots (PNG, optional). snaprun is the process one of our snapshots runs in.
"""

from uffdsnap.bench.config import MODES, BenchConfig
from uffdsnap.bench.run import run_bench

__all__ = ["MODES", "BenchConfig", "run_bench"]
