"""An agent's record of the faults it forwarded, for the service-time histogram it reports."""

from __future__ import annotations

from uffdsnap.stats import LatencyHistogram


class FaultLog:
    """Pending faults by offset (first time seen) and the service-time histogram."""

    def __init__(self) -> None:
        self.pending: dict[int, int] = {}
        self.hist = LatencyHistogram()
        self.faults = 0

    def seen(self, offset: int, now: int) -> None:
        """Record a fault; a duplicate keeps the time of the first one pending on its page."""
        self.faults += 1
        self.pending.setdefault(offset, now)

    def served(self, ranges: tuple[tuple[int, int], ...], page_size: int, now: int) -> None:
        if not self.pending:
            return
        for off, length in ranges:
            if length // page_size <= len(self.pending):
                for page in range(off, off + length, page_size):
                    t0 = self.pending.pop(page, None)
                    if t0 is not None:
                        self.hist.record(now - t0)
            else:
                for page in [p for p in self.pending if off <= p < off + length]:
                    self.hist.record(now - self.pending.pop(page))

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]
