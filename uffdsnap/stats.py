"""Latency statistics that travel over the wire: a log-bucket histogram (about 2% resolution).

Agents record every fault's service time into one; the coordinator merges them and reads
percentiles, so no per-fault list ever grows with the number of faults.
"""

from __future__ import annotations

import math
import time
from collections import Counter

_GROWTH = 1.02


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC: one clock for every process on the machine, so an agent's time of a
    fault and the coordinator's time of its service can be compared."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
_LOG_GROWTH = math.log(_GROWTH)


def bucket_of(ns: int) -> int:
    return 0 if ns <= 1 else int(math.log(ns) / _LOG_GROWTH)


def bucket_value(bucket: int) -> int:
    """A representative value for `bucket` (its geometric middle)."""
    return round(_GROWTH ** (bucket + 0.5))


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.max_ns = 0
        self.total = 0

    def record(self, ns: int) -> None:
        ns = max(0, ns)
        self.counts[bucket_of(ns)] += 1
        self.max_ns = max(self.max_ns, ns)
        self.total += 1

    def merge(self, buckets: tuple[tuple[int, int], ...] | list[tuple[int, int]],
              max_ns: int) -> None:
        for bucket, count in buckets:
            self.counts[bucket] += count
            self.total += count
        self.max_ns = max(self.max_ns, max_ns)

    def buckets(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted(self.counts.items()))

    def percentile(self, p: float) -> int:
        """Value at percentile p (0..100); 0 when empty. Never above the recorded maximum."""
        if not self.total:
            return 0
        rank = max(1, math.ceil(self.total * p / 100))
        seen = 0
        for bucket, count in sorted(self.counts.items()):
            seen += count
            if seen >= rank:
                return min(bucket_value(bucket), self.max_ns)
        return self.max_ns

    def summary(self) -> dict[str, int]:
        return {"count": self.total, "p50_ns": self.percentile(50),
                "p99_ns": self.percentile(99), "max_ns": self.max_ns}


def size_text(n: float) -> str:
    """Bytes for people: 1536 -> "1.5 KiB" (exact counts stay in --json)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def ns_text(ns: float) -> str:
    """Nanoseconds for people: 1500000 -> "1.5 ms"."""
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"
