"""Reading bench_writer logs and asking them questions about windows of time.

A log (format in helpers/bench_writer.c) holds, for one writer process: operations and the
longest stall per 1 ms interval, every stall above a threshold with the time the operation was
due, and with --probe-wp every store that hit a write-protected page with its latency. Times are
CLOCK_MONOTONIC nanoseconds, the clock time.monotonic_ns() reads, so windows taken from the
coordinator's or the handler's timestamps line up with the writers'.
"""

from __future__ import annotations

import math
import struct
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

MAGIC = b"UFBWLOG1"
_HEADER = struct.Struct("<12Q")


class LogError(ValueError):
    """A writer log that is missing, truncated or not a bench_writer log."""


@dataclass
class WriterLog:
    """One bench_writer's log: its per-interval throughput, its stalls, and (with --probe-wp)
    the latency of each store that took a write-protect fault."""

    pid: int
    start_ns: int
    interval_ns: int
    ops: int
    slow_threshold_ns: int
    dropped: int
    interval_ops: array[int]
    interval_max: array[int]
    slow: list[tuple[int, int]]   # (t_due_ns, stall_ns), sorted by time
    wp: list[tuple[int, int]]     # (t_store_ns, latency_ns), sorted by time


def _pairs(raw: bytes, offset: int, count: int) -> tuple[array[int], array[int], int]:
    words = array("Q")
    end = offset + 16 * count
    if len(raw) < end:
        raise LogError("writer log is truncated")
    words.frombytes(raw[offset:end])
    return words[0::2], words[1::2], end


def parse_log(raw: bytes) -> WriterLog:
    """Parse the bytes of one bench_writer log."""
    if raw[:8] != MAGIC or len(raw) < 8 + _HEADER.size:
        raise LogError("not a bench_writer log")
    (version, pid, start, interval, n_iv, n_slow, n_wp, ops, slow_ns, d_slow, d_wp,
     _threads) = _HEADER.unpack_from(raw, 8)
    if version != 1 or interval == 0:
        raise LogError(f"unsupported writer log (version {version}, interval {interval})")
    iv_ops, iv_max, pos = _pairs(raw, 8 + _HEADER.size, n_iv)
    slow_t, slow_v, pos = _pairs(raw, pos, n_slow)
    wp_t, wp_v, pos = _pairs(raw, pos, n_wp)
    return WriterLog(pid, start, interval, ops, slow_ns, d_slow + d_wp, iv_ops, iv_max,
                     sorted(zip(slow_t, slow_v, strict=True)),
                     sorted(zip(wp_t, wp_v, strict=True)))


def read_log(path: str) -> WriterLog:
    """The log a writer wrote at exit; LogError if it never wrote one (it died first)."""
    try:
        with open(path, "rb") as f:
            return parse_log(f.read())
    except FileNotFoundError:
        raise LogError(f"writer log {path} was not written") from None


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile (0 < p <= 100) of an ascending list; 0 when empty."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(len(sorted_values) * p / 100))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def distribution(values: list[int]) -> dict[str, int]:
    """count, p50, p90, p99, max of a list of nanosecond values."""
    v = sorted(values)
    return {"count": len(v), "p50_ns": percentile(v, 50), "p90_ns": percentile(v, 90),
            "p99_ns": percentile(v, 99), "max_ns": v[-1] if v else 0}


class Fleet:
    """The logs of every writer of one session, asked about windows [a, b] of monotonic time."""

    def __init__(self, logs: list[WriterLog]) -> None:
        self.logs = logs
        self.slow = sorted(x for log in logs for x in log.slow)
        self.slow_t = [t for t, _ in self.slow]
        self.wp = sorted(x for log in logs for x in log.wp)
        self.wp_t = [t for t, _ in self.wp]
        self.slow_threshold_ns = max((log.slow_threshold_ns for log in logs), default=0)
        self._longest = max((v for _, v in self.slow), default=0)

    @property
    def ops(self) -> int:
        return sum(log.ops for log in self.logs)

    @property
    def dropped(self) -> int:
        return sum(log.dropped for log in self.logs)

    def max_stall(self, a: int, b: int) -> int:
        """Longest stall, any writer, of an operation stalled at some time in [a, b] (due no
        later than b, finished no earlier than a). Exact when it is above the slow threshold;
        otherwise the longest stall of the intervals overlapping the window."""
        lo, hi = bisect_left(self.slow_t, a - self._longest), bisect_right(self.slow_t, b)
        best = max((v for t, v in self.slow[lo:hi] if t + v >= a), default=0)
        if best:
            return best
        for log in self.logs:
            first, last = self._slots(log, a, b)
            for slot in range(first, last + 1):
                best = max(best, log.interval_max[slot])
        return best

    def slow_in(self, a: int, b: int) -> list[tuple[int, int]]:
        lo, hi = bisect_left(self.slow_t, a), bisect_right(self.slow_t, b)
        return self.slow[lo:hi]

    def wp_latencies(self, a: int, b: int) -> list[int]:
        """Latencies of the stores that hit a write-protected page, begun in [a, b]."""
        lo, hi = bisect_left(self.wp_t, a), bisect_right(self.wp_t, b)
        return [v for _, v in self.wp[lo:hi]]

    def ops_per_s(self, a: int, b: int) -> float:
        """Operations completed per second in [a, b], all writers (interval-weighted)."""
        if b <= a:
            return 0.0
        total = 0.0
        for log in self.logs:
            first, last = self._slots(log, a, b)
            for slot in range(first, last + 1):
                s0 = log.start_ns + slot * log.interval_ns
                overlap = min(b, s0 + log.interval_ns) - max(a, s0)
                if overlap > 0:
                    total += log.interval_ops[slot] * overlap / log.interval_ns
        return total * 1e9 / (b - a)

    def series(self, a: int, b: int) -> tuple[list[int], list[int], list[int]]:
        """(interval start times, ops, longest stall) per 1 ms interval in [a, b], summed (ops)
        and maximised (stall) over writers whose intervals are aligned to the first writer."""
        if not self.logs:
            return [], [], []
        ref = self.logs[0]
        step = ref.interval_ns
        first = max(0, (a - ref.start_ns) // step)
        last = max(first, (b - ref.start_ns) // step)
        n = last - first + 1
        ops, stall = [0] * n, [0] * n
        for log in self.logs:
            for slot in range(len(log.interval_ops)):
                t = log.start_ns + slot * log.interval_ns
                i = (t - ref.start_ns) // step - first
                if 0 <= i < n:
                    ops[i] += log.interval_ops[slot]
                    stall[i] = max(stall[i], log.interval_max[slot])
        return [ref.start_ns + (first + i) * step for i in range(n)], ops, stall

    @staticmethod
    def _slots(log: WriterLog, a: int, b: int) -> tuple[int, int]:
        n = len(log.interval_ops)
        first = max(0, (a - log.start_ns) // log.interval_ns)
        last = min(n - 1, (b - log.start_ns) // log.interval_ns)
        return first, last
