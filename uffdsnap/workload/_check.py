"""The checker: is an image the workload object as it was at one instant T? (docs/workload.md)

Pure: a buffer in, a verdict out; no files, no processes, no clock. Every test that claims a
snapshot is consistent rests on check_image(), so it is kept small enough to read in one sitting.

Writer i's step k observes every writer's seq, fills data page p(k) with stamp(i, k) front to
back, then publishes its observations (each tagged k) and finally seq = k. For each writer i
with published seq S in the image the rules are:

- data: each data page holds stamp(i, last step <= S that chose it), or zero if none did;
- in flight: except step S+1's page, which may hold a prefix of stamp(i, S+1) over that content
  (the writer was mid-fill at T); anything else there is "torn";
- counter: entry tags are S+1 for a prefix and S after it (entries being published at T); an
  entry tagged S+1 needs step S+1's page complete; i's entry for itself holds S-1 (S where it
  may already be published); with S = 0, unwritten entries are zero;
- cross: for every other writer j, obs_i[j] <= S_j: what i read of j before T cannot be ahead of
  j's state at T.

Every single-instant image passes (stores land in program order; seqs only grow), and a copy
that tears across a step of any writer fails one of them. Whole pages are compared with one
`bytes ==`; only a mismatching page is examined word by word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from uffdsnap.workload._layout import (
    C_IMPL,
    C_OBS,
    C_SEQ,
    HEADER_BYTES,
    IMPLS,
    STEP_MAX,
    Layout,
    decode_stamp,
    last_step,
    page_for_step,
    stamp,
)

# --- the verdict -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One proof that an image is not the object at a single instant."""

    kind: str  # "header" | "size" | "data" | "torn" | "counter" | "cross"
    writer: int | None
    page: int | None  # data page index within the writer's region; None for its counter page
    offset: int | None  # byte offset in the object of the offending page or word
    expected: str
    found: str

    def where(self) -> str:
        if self.writer is None:
            return self.kind
        place = "counter" if self.page is None else f"data page {self.page}"
        at = f" @{self.offset:#x}" if self.offset is not None else ""
        return f"writer {self.writer} {place}{at}"

    def __str__(self) -> str:
        return f"{self.kind}: {self.where()}: expected {self.expected}, found {self.found}"


@dataclass(frozen=True)
class WriterImage:
    """What the image says about one writer."""

    index: int
    seq: int
    impl: str
    phase: str  # "idle", "filling" (step seq+1's page partly stamped), "publishing", "invalid"
    inflight_words: int  # words of step seq+1's page already stamped
    inflight_entries: int  # counter entries already tagged with step seq+1


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one image; ok only when no violation was found."""

    ok: bool
    layout: Layout | None
    writers: tuple[WriterImage, ...]
    violations: tuple[Violation, ...]  # the first max_violations found
    violation_count: int
    pages_checked: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def seqs(self) -> list[int]:
        return [w.seq for w in self.writers]

    def summary(self) -> str:
        if self.ok:
            seqs = self.seqs
            inflight = sum(w.phase != "idle" for w in self.writers)
            return (f"consistent: {len(seqs)} writers at seqs {min(seqs)}..{max(seqs)} "
                    f"({inflight} caught mid-step), {self.pages_checked} pages checked")
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        return (f"INCONSISTENT: {self.violation_count} violations ({kinds}); "
                f"first: {self.violations[0]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "summary": self.summary(),
            "layout": None if self.layout is None else {
                "nwriters": self.layout.nwriters, "data_pages": self.layout.data_pages,
                "page_size": self.layout.page_size, "size": self.layout.size},
            "writers": [w.__dict__ for w in self.writers],
            "violation_count": self.violation_count,
            "violation_kinds": self.kinds,
            "violations": [{**v.__dict__, "text": str(v)} for v in self.violations],
            "pages_checked": self.pages_checked,
        }


class _Collector:
    """Counts every violation and keeps the first `limit` (an image torn everywhere would
    otherwise cost a description of every page)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.found: list[Violation] = []
        self.count = 0
        self.kinds: dict[str, int] = {}

    @property
    def keeping(self) -> bool:
        """Whether the next violation will be kept (worth describing in detail)."""
        return len(self.found) < self.limit

    def add(self, v: Violation) -> None:
        self.count += 1
        self.kinds[v.kind] = self.kinds.get(v.kind, 0) + 1
        if self.keeping:
            self.found.append(v)

    def verdict(self, layout: Layout | None, writers: tuple[WriterImage, ...] = (),
                pages: int = 0) -> CheckResult:
        return CheckResult(self.count == 0, layout, writers, tuple(self.found), self.count, pages,
                           dict(self.kinds))


# --- describing what was found ---------------------------------------------------------------

def describe_word(word: int) -> str:
    """A stamp as "w3#17", zero as "0", anything else in hex."""
    if word == 0:
        return "0"
    decoded = decode_stamp(word)
    return f"w{decoded[0]}#{decoded[1]}" if decoded else f"{word:#018x}"


def _run_length(page: bytes, start: int, word: int) -> int:
    """How many words from word index `start` on equal `word` (galloping byte compares, so a
    2 MiB page costs a few memcmps, not a Python loop over its words)."""
    total = len(page) // 8 - start
    pattern = word.to_bytes(8, "little")

    def same(n: int) -> bool:
        return page[8 * start:8 * (start + n)] == pattern * n

    good, step = 0, 1
    while good + step <= total and same(good + step):
        good, step = good + step, step * 2
    hi = min(good + step, total + 1)  # same(good) holds; same(hi) fails or hi is past the end
    while hi - good > 1:
        mid = (good + hi) // 2
        if same(mid):
            good = mid
        else:
            hi = mid
    return good


def describe_page(page: bytes) -> str:
    """Runs of equal words in a page, e.g. "w3#17 x512" or "w3#18 x100, w3#2 x412"."""
    q = memoryview(page).cast("Q")
    runs: list[str] = []
    start = 0
    while start < len(q):
        if len(runs) == 4:
            runs.append(f"... ({len(q) - start} more words)")
            break
        n = _run_length(page, start, q[start])
        runs.append(f"{describe_word(q[start])} x{n}")
        start += n
    return ", ".join(runs)


# --- the rules -------------------------------------------------------------------------------

def check_image(image: Any, *, max_violations: int = 100) -> CheckResult:
    """Check that `image` (any buffer: bytes, bytearray, mmap, memoryview) holds a workload
    object as it was at one instant. Never raises for bad content: everything is a Violation.

    Rules (docs/workload.md): per writer i with published seq S, each data page equals the
    stamp of the last step <= S that chose it (zero if none) except the page of step S+1, which
    may hold a prefix of stamp S+1 over the old stamp; the counter's entries are tagged S+1 for a
    prefix and S after it, and a tagged S+1 entry needs the S+1 page complete; i's entry for
    itself holds S-1 (or S where it may be in flight); and obs_i[j] <= S_j for every other j.
    """
    mv = memoryview(image).cast("B")
    out = _Collector(max_violations)
    try:
        layout = Layout.from_header(mv[:HEADER_BYTES])
    except ValueError as e:
        out.add(Violation("header", None, None, 0, "a workload header", str(e)))
        return out.verdict(None)
    if len(mv) < layout.size:
        out.add(Violation("size", None, None, None, f"{layout.size} bytes",
                          f"{len(mv)} bytes"))
        return out.verdict(layout)

    n = layout.nwriters
    q = mv[:layout.size].cast("Q")
    seqs = [q[layout.counter_offset(i) // 8 + C_SEQ] for i in range(n)]
    obs = [[q[layout.obs_offset(i, j) // 8] for j in range(n)] for i in range(n)]
    writers = tuple(_check_writer(mv, q, layout, i, seqs[i], obs[i], out) for i in range(n))
    _check_cross(layout, seqs, obs, out)
    return out.verdict(layout, writers, 1 + n * (1 + layout.data_pages))


def _check_writer(mv: memoryview, q: memoryview, layout: Layout, i: int, seq: int,
                  obs_i: list[int], out: _Collector) -> WriterImage:
    """Every rule about writer i alone (data, in flight, counter); what the image says of it."""
    impl = IMPLS.get(q[layout.counter_offset(i) // 8 + C_IMPL], "unknown")
    if seq >= STEP_MAX:
        out.add(Violation("counter", i, None, layout.counter_offset(i),
                          f"a seq below {STEP_MAX}", f"seq {seq}"))
        return WriterImage(i, seq, impl, "invalid", 0, 0)
    inflight_page = page_for_step(i, seq + 1, layout.data_pages)
    inflight_words = _check_data(mv, layout, i, seq, inflight_page, out)
    advanced = _check_counter(q, layout, i, seq, obs_i, inflight_page, inflight_words, out)
    words = layout.words_per_page
    if 0 < inflight_words < words:
        phase = "filling"
    elif inflight_words == words or advanced:
        phase = "publishing"
    else:
        phase = "idle"
    return WriterImage(i, seq, impl, phase, inflight_words, advanced)


def _check_data(mv: memoryview, layout: Layout, i: int, seq: int, inflight_page: int,
                out: _Collector) -> int:
    """Rules data and in flight for writer i at seq; return how many words of step seq+1's
    page are stamped already (0 if none, words_per_page if the fill is complete)."""
    ps, words = layout.page_size, layout.words_per_page
    zero = bytes(ps)
    new = stamp(i, seq + 1)
    inflight_words = 0
    for p in range(layout.data_pages):
        k = last_step(i, p, seq, layout.data_pages)
        expected = stamp(i, k).to_bytes(8, "little") * words if k else zero
        off = layout.data_offset(i, p)
        page = mv[off:off + ps].tobytes()
        if page == expected:
            continue
        old = describe_word(stamp(i, k) if k else 0)
        if p == inflight_page:
            split = _run_length(page, 0, new)
            if page[8 * split:] == expected[8 * split:]:
                inflight_words = split
                continue
            want = f"a prefix of {describe_word(new)} over {old} (step {seq + 1} in flight)"
            kind = "torn"
        else:
            want = f"{old} x{words} (last step <= {seq} to choose this page)"
            kind = "data"
        found = describe_page(page) if out.keeping else "(not described)"
        out.add(Violation(kind, i, p, off, want, found))
    return inflight_words


def _check_counter(q: memoryview, layout: Layout, i: int, seq: int, obs_i: list[int],
                   inflight_page: int, inflight_words: int, out: _Collector) -> int:
    """Rule counter for writer i at seq; return how many entries are tagged seq+1 already."""
    n, words = layout.nwriters, layout.words_per_page
    base = layout.counter_offset(i) // 8
    tags = [q[base + C_OBS + 2 * j + 1] for j in range(n)]
    advanced = 0
    while advanced < n and tags[advanced] == seq + 1:
        advanced += 1
    bad = next((j for j in range(advanced, n) if tags[j] != seq), None)
    if bad is not None:
        out.add(Violation("counter", i, None, layout.obs_offset(i, bad) + 8,
                          f"entry {bad} tagged {seq} or {seq + 1} (entries are written in "
                          f"order with the seq)", f"tag {tags[bad]}"))
    if advanced and inflight_words != words:
        out.add(Violation("counter", i, None, layout.counter_offset(i),
                          f"step {seq + 1}'s data page {inflight_page} complete, since "
                          f"{advanced} entries are tagged {seq + 1}",
                          f"{inflight_words}/{words} words stamped"))
    # Values: i's own entry is its seq before the step that wrote it; the entry being written at
    # T (the first untagged one) may hold either. Other writers' values are the cross rule's.
    prev = max(seq - 1, 0)
    for j, value in enumerate(obs_i):
        if j == i:
            allowed = {seq} if j < advanced else {prev, seq} if j == advanced else {prev}
        elif seq == 0 and j > advanced:
            allowed = {0}  # never written
        else:
            continue
        if value not in allowed:
            out.add(Violation("counter", i, None, layout.obs_offset(i, j),
                              f"obs[{j}] in {sorted(allowed)}", f"obs[{j}] = {value}"))
    return advanced


def _check_cross(layout: Layout, seqs: list[int], obs: list[list[int]],
                 out: _Collector) -> None:
    """Rule cross: nothing writer i saw of writer j before T can be ahead of j's state at T."""
    for i, seen in enumerate(obs):
        for j, value in enumerate(seen):
            if i != j and value > seqs[j]:
                out.add(Violation("cross", i, None, layout.obs_offset(i, j),
                                  f"obs[{j}] <= {seqs[j]} (writer {j}'s seq in the image)",
                                  f"obs[{j}] = {value}: writer {i}'s counter is newer than "
                                  f"writer {j}'s"))
