"""The escape audit: who could change the object where write-protect cannot see it, looked for
at T (and by `doctor --shm`). Pure /proc reading; no trio.

Two kinds of escape are looked for:
- **writable openers**: a process that holds the object open for writing (an fd with O_WRONLY
  or O_RDWR on its inode) but does not map it writable can `write()` into it, and no page
  table, so no write-protect, sees that;
- **hidden mappers**: a process we cannot see in /proc (another PID namespace: a container
  that shares /dev/shm) maps the object, so no agent tracks it. The kernel still counts its
  page-table entries: for a sample of the object's pages we compare the kernel's map count
  (/proc/kpagecount, by the PFN our own read-only mapping of the page gives) with the entries
  for that PFN we find in the page tables of every process we can see. More in the kernel
  means someone we cannot see maps it.

A false alarm would refuse good snapshots under --strict, so the comparison is conservative:
only pages in small folios are compared (a large folio's per-page map count depends on the
kernel's configuration and on PMD vs PTE mapping; hugetlbfs is never compared), and a page
counts as evidence only if it shows the excess in CHECK_ROUNDS rounds, each with a fresh look
at /proc and, after the first, with the kernel's count read three times around two counts of
ours (a visible process that maps and unmaps meanwhile cannot keep that up), and while a
mapping may be in teardown (gone from /proc, still in the counts: a process exiting, or one that
mapped the object earlier in the audit and no longer does) suspects are not evidence (measured
with tests/system/measure_escapes.py, see docs/tracking.md). Where we cannot decide, the result
says "not checked" and why.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from uffdsnap.procfs import (
    PF_KTHREAD,
    Mapping,
    ObjectId,
    SharedObject,
    all_pids,
    process_label,
    process_running,
    read_maps,
)

SAMPLE_PAGES = 512  # pages compared per audit: evenly spread strides, first data page of each
CHECK_ROUNDS = 6  # an excess must show in this many rounds, each with a fresh look at /proc
# (the first a quick pass over every sampled page, the others careful, over its suspects only)
WINDOW = 512  # entries of a /proc array file read in one go (4 KiB)
SETTLE_S = 1.0  # how long suspects may be looked at again (a mapper's teardown may explain them)
MADV_POPULATE_READ = 22  # (Linux 5.14) fault pages in for reading; an error, never SIGBUS
PF_EXITING = 0x4  # /proc/PID/stat flags: in exit(), its memory possibly not torn down yet

PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1
# /proc/kpageflags bits of pages that belong to a large folio or a huge page
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_HUGE, KPF_THP = 15, 16, 17, 22
LARGE_FOLIO_FLAGS = (1 << KPF_COMPOUND_HEAD | 1 << KPF_COMPOUND_TAIL | 1 << KPF_HUGE
                     | 1 << KPF_THP)


# ---- pure parsing ---------------------------------------------------------------------------


def fdinfo_fields(text: str) -> dict[str, str]:
    """/proc/PID/fdinfo/N as {field: value} (the fields this module needs: flags, ino)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def opened_for_writing(flags_octal: str) -> bool:
    """Whether fdinfo's `flags` (octal) give write access (O_WRONLY or O_RDWR)."""
    return int(flags_octal, 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def pagemap_pfn(entry: int) -> int | None:
    """The PFN of a /proc/PID/pagemap entry; None if the page is not present (or the PFN is
    hidden from us: without CAP_SYS_ADMIN the kernel reports 0)."""
    if not entry & PM_PRESENT:
        return None
    return entry & PM_PFN_MASK or None


def large_folio(kpageflags: int) -> bool:
    return bool(kpageflags & LARGE_FOLIO_FLAGS)


def sample_offsets(fd: int, size: int, page_size: int, limit: int = SAMPLE_PAGES) -> list[int]:
    """Up to `limit` offsets of pages that hold data, spread over the object: the object is
    cut into `limit` equal strides and the first data page of each is taken (SEEK_DATA), so a
    region written by one process alone is sampled in proportion to its size, and holes (whose
    reading would allocate pages) never are."""
    pages = size // page_size
    strides = min(limit, pages)
    out: list[int] = []
    for i in range(strides):
        lo, hi = i * pages // strides * page_size, (i + 1) * pages // strides * page_size
        try:
            data = os.lseek(fd, lo, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after lo
                break
            raise
        if data < hi:
            out.append(data - data % page_size)
    return out


# ---- one look at /proc ------------------------------------------------------------------------


@dataclass
class ProcView:
    """What one look at /proc found about the object: every mapping of it (shared or private:
    a private mapping maps the same page until it is copied), who holds it open for writing,
    and which processes we could not read."""

    mappings: dict[int, list[Mapping]] = field(default_factory=dict)
    writable_fds: set[int] = field(default_factory=set)
    unreadable: set[int] = field(default_factory=set)
    # exiting, memory not yet torn down: its mappings are gone from /proc, not yet from the
    # kernel's map counts (for as long as the teardown takes, seconds on a busy machine)
    exiting: set[int] = field(default_factory=set)

    def writable_mappers(self) -> set[int]:
        return {pid for pid, maps in self.mappings.items()
                if any(m.shared and m.writable for m in maps)}


def look(obj: ObjectId) -> ProcView:
    """Every process's mappings and fds of `obj`, in one pass over /proc. A process that exits
    while we look is passed over (it can write nothing more); one we may not read is counted
    as unreadable."""
    view = ProcView()
    needle = f" {obj.major:02x}:{obj.minor:02x} {obj.inode} ".encode()
    for pid in all_pids():
        try:
            maps = _maps_of(pid, obj, needle)
            if maps:
                view.mappings[pid] = maps
            elif maps is None:
                view.exiting.add(pid)
            if _holds_writable(pid, obj):
                view.writable_fds.add(pid)
        except PermissionError:
            view.unreadable.add(pid)
        except (ProcessLookupError, FileNotFoundError):
            continue
        except OSError as e:
            if e.errno not in (errno.ESRCH, errno.ENOENT):
                raise
    return view


def _maps_of(pid: int, obj: ObjectId, needle: bytes) -> list[Mapping] | None:
    """`pid`'s mappings of `obj`; None if it is exiting and its memory may still be mapped."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        raw = f.read()
    if raw and needle not in raw:
        return []
    if not raw:
        state, flags = _state_and_flags(pid)
        if flags & PF_KTHREAD or state in ("Z", "X"):
            return []
        if flags & PF_EXITING:
            return None
    return [m for m in read_maps(pid) if m.object_id == obj]  # (empty: a zombie leader's view)


def _state_and_flags(pid: int) -> tuple[str, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[6])


def _holds_writable(pid: int, obj: ObjectId) -> bool:
    """Whether `pid` has an fd open for writing on `obj` (fdinfo's inode and flags first: no
    stat of unrelated files, some of which may sit on a hung network file system)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("/"):
                continue  # a socket, pipe or anon_inode
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                info = fdinfo_fields(f.read())
            if info.get("ino", str(obj.inode)) != str(obj.inode):
                continue
            if not opened_for_writing(info.get("flags", "0")):
                continue
            if ObjectId.from_stat(os.stat(f"/proc/{pid}/fd/{name}")) == obj:
                return True
        except FileNotFoundError:  # closed while we looked
            continue
    return False


# ---- hidden mappers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HiddenCheck:
    """The map-count comparison: `checked` False means we could not decide (`reason`)."""

    checked: bool
    reason: str = ""
    pages_compared: int = 0
    pages_skipped_large: int = 0
    pages_with_excess: int = 0
    example: tuple[int, int, int] | None = None  # (offset, kernel's count, ours)

    def finding(self) -> str | None:
        if not self.pages_with_excess or self.example is None:
            return None
        off, kernel, ours = self.example
        return (f"hidden mapper: {self.pages_with_excess} of {self.pages_compared} sampled pages "
                f"are mapped more often than the processes we can see account for (offset "
                f"{off:#x}: the kernel counts {kernel} mappings, we found {ours}); a process we "
                "cannot see (another PID namespace?) maps the object")

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "reason": self.reason,
                "pages_compared": self.pages_compared,
                "pages_skipped_large": self.pages_skipped_large,
                "pages_with_excess": self.pages_with_excess,
                "example": list(self.example) if self.example else None}


class _KernelPages:
    """/proc/kpagecount and /proc/kpageflags, read by PFN (root only)."""

    def __init__(self) -> None:
        self.count = os.open("/proc/kpagecount", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.flags = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.count)
            raise

    def close(self) -> None:
        os.close(self.count)
        os.close(self.flags)

    def mapcounts(self, pfns: Iterable[int]) -> dict[int, int]:
        return read_entries(self.count, pfns)

    def large(self, pfns: Iterable[int]) -> set[int]:
        return {pfn for pfn, flags in read_entries(self.flags, pfns).items()
                if large_folio(flags)}


def read_entries(fd: int, indexes: Iterable[int], window: int = WINDOW) -> dict[int, int]:
    """{index: u64 entry} of a /proc array file (pagemap, kpagecount, kpageflags), reading
    nearby indexes together: one pread for the wanted indexes within `window` entries of
    each other."""
    out: dict[int, int] = {}
    wanted = sorted(set(indexes))
    i = 0
    while i < len(wanted):
        first, j = wanted[i], i
        while j + 1 < len(wanted) and wanted[j + 1] - first < window:
            j += 1
        data = os.pread(fd, (wanted[j] - first + 1) * 8, first * 8)
        got = memoryview(data)[:len(data) // 8 * 8].cast("Q")
        for index in wanted[i:j + 1]:
            if index - first < len(got):  # (past the end of the file: no entry)
                out[index] = got[index - first]
        i = j + 1
    return out


class _Pagemaps:
    """Which sampled pages each process in a view maps, and to which PFN (pagemaps read in
    windows, once per round of comparisons)."""

    def __init__(self, view: ProcView, offsets: list[int]) -> None:
        self.entries: dict[int, list[int]] = {off: [] for off in offsets}
        for pid, maps in view.mappings.items():
            self._read(pid, maps, offsets)

    def _read(self, pid: int, maps: list[Mapping], offsets: list[int]) -> None:
        where = [(off, a) for m in maps for off in offsets
                 if (a := m.address_of(off)) is not None]
        if not where:
            return
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # gone: its entries are going too
        try:
            got = read_entries(fd, (a // mmap.PAGESIZE for _, a in where))
        except OSError:
            return
        finally:
            os.close(fd)
        for off, a in where:
            pfn = pagemap_pfn(got.get(a // mmap.PAGESIZE, 0))
            if pfn is not None:
                self.entries[off].append(pfn)

    def found(self, offset: int, pfn: int) -> int:
        """Page-table entries for `pfn` at `offset` in every mapping that covers it."""
        return self.entries[offset].count(pfn)


def compare_counts(pages: dict[int, int], view: ProcView,
                   mapcounts: Callable[[Iterable[int]], dict[int, int]], *, careful: bool = True
                   ) -> list[tuple[int, int, int]]:
    """(offset, kernel's count, ours) of each of `pages` ({offset: pfn}) the kernel maps more
    often than `view` accounts for. `careful`: the kernel's counts are read three times with
    ours read twice in between, and the smallest kernel count is held against our largest, so
    a visible mapping that comes and goes while we count must be absent at both our looks and
    present at all three of the kernel's to pass for a hidden one. Otherwise one quick pass
    (kernel after ours), whose suspects are looked at again carefully."""
    kernel = [mapcounts(pages.values())] if careful else []
    ours = [_Pagemaps(view, list(pages))]
    kernel.append(mapcounts(pages.values()))
    if careful:
        ours.append(_Pagemaps(view, list(pages)))
        kernel.append(mapcounts(pages.values()))
    excess = []
    for offset, pfn in sorted(pages.items()):
        counted = min(k.get(pfn, 0) for k in kernel)
        found = [o.found(offset, pfn) for o in ours]
        # (found 0: not even our own mapping maps `pfn` any more: the page was migrated or
        # reclaimed, and the PFN may belong to another page now; no evidence either way)
        if min(found) >= 1 and counted > max(found):
            excess.append((offset, counted, max(found)))
    return excess


def hidden_mappers(view: ProcView, pfns: dict[int, int], kernel: _KernelPages,
                   rescan: Callable[[], ProcView], rounds: int = CHECK_ROUNDS,
                   settle_s: float = SETTLE_S) -> HiddenCheck:
    """Compare map counts for the sampled pages (`pfns`: offset -> PFN in our own mapping),
    keeping as evidence only pages that show an excess in every round. A mapping being torn
    down (munmap, exit) has left /proc before the kernel's counts: while a process exits, or
    one we saw mapping the object no longer does and lives on, suspects are looked at again
    (up to `settle_s` from the first round, the bound on all of it), and if that never
    settles we say we could not tell."""
    large = kernel.large(pfns.values())
    small = {off: pfn for off, pfn in pfns.items() if pfn not in large}
    skipped = len(pfns) - len(small)
    if not small:
        return HiddenCheck(False, "the sampled pages are all in large folios (THP or huge "
                                  "pages), whose map counts cannot be compared per page",
                           pages_skipped_large=skipped)
    suspects, seen = dict(small), set(view.mappings)
    excess: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + settle_s
    for round_ in itertools.count():
        if round_:
            view = rescan()
        unsettled = view.exiting | {p for p in seen - set(view.mappings) if process_running(p)}
        seen |= set(view.mappings)
        excess = compare_counts(suspects, view, kernel.mapcounts, careful=round_ > 0)
        suspects = {off: small[off] for off, _, _ in excess}
        if not suspects or (round_ + 1 >= rounds and not unsettled):
            break
        if time.monotonic() > deadline and unsettled:
            names = ", ".join(process_label(p) for p in sorted(unsettled)[:3])
            return HiddenCheck(False, f"processes were unmapping the object or exiting while we "
                                      f"compared ({names}): their teardown and a hidden mapper "
                                      "look the same", len(small), skipped)
        if time.monotonic() > deadline:
            return HiddenCheck(False, f"out of time ({settle_s:g} s) before {len(suspects)} "
                                      "suspect page(s) were looked at often enough",
                               len(small), skipped)
    return HiddenCheck(True, "", len(small), skipped, len(excess), excess[0] if excess else None)


# ---- the audit ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """What the audit found. `writable_openers` and `unreadable` name processes as
    `pid (comm)`."""

    writable_openers: tuple[str, ...]
    unreadable: tuple[str, ...]
    hidden: HiddenCheck
    writable_mappers: frozenset[int] = frozenset()  # as the audit's last look found them

    def findings(self) -> list[str]:
        """One line per escape found: what --strict refuses."""
        out = [f"writable opener: {who} holds the object open for writing without mapping it "
               "(its write() calls would not be tracked)" for who in self.writable_openers]
        hidden = self.hidden.finding()
        if hidden and self.unreadable:
            hidden += f" (or one of the {len(self.unreadable)} we may not inspect does)"
        return [*out, hidden] if hidden else out

    def notes(self) -> list[str]:
        """What the audit could not look at, and why: reported, not refused (a sandbox's
        PID 1 is unreadable even to root; hugetlbfs pages cannot be compared)."""
        out = []
        if self.unreadable:
            more = ", ..." if len(self.unreadable) > 3 else ""
            out.append(f"not audited: {len(self.unreadable)} process(es) we may not inspect "
                       f"({', '.join(self.unreadable[:3])}{more})")
        if not self.hidden.checked:
            out.append(f"hidden mappers not checked: {self.hidden.reason}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"writable_openers": list(self.writable_openers),
                "unreadable": list(self.unreadable), "hidden_mappers": self.hidden.to_json(),
                "findings": self.findings(), "notes": self.notes()}


def audit(obj: SharedObject, ignore: Iterable[int] = (), sample_pages: int = SAMPLE_PAGES,
          budget_s: float = SETTLE_S) -> Audit:
    """Look for escapes of `obj` now. `ignore`: pids whose fds are ours to trust (this process
    and our agents); every process's mappings count, ours included. `budget_s`: how long the
    comparison may look at suspect pages again (writers may be waiting on us)."""
    ignored = {os.getpid(), *ignore}
    if obj.hugetlb:
        view = look(obj.object_id)
        return _audit(view, ignored, HiddenCheck(
            False, "hugetlbfs: a huge page's map count cannot be compared per page"))
    try:
        kernel = _KernelPages()
    except PermissionError:
        view = look(obj.object_id)
        return _audit(view, ignored, HiddenCheck(False, "needs CAP_SYS_ADMIN (root) to read "
                                                        "/proc/kpagecount"))
    try:
        offsets = sample_offsets(obj.fd, obj.size, obj.page_size, sample_pages)
        if not offsets:
            return _audit(look(obj.object_id), ignored,
                          HiddenCheck(False, "no page of the object holds data"))
        with _OwnMapping(obj) as own:
            pfns = own.populate(offsets)
            view = look(obj.object_id)  # (after our mapping exists: it counts too)
            if not pfns:
                hidden = HiddenCheck(False, "no page of the object is in memory")
            else:
                hidden = hidden_mappers(view, pfns, kernel, lambda: look(obj.object_id),
                                        settle_s=budget_s)
    finally:
        kernel.close()
    return _audit(view, ignored, hidden)


def _audit(view: ProcView, ignored: set[int], hidden: HiddenCheck) -> Audit:
    mappers = view.writable_mappers()
    openers = sorted(view.writable_fds - mappers - ignored)
    return Audit(tuple(process_label(p) for p in openers),
                 tuple(process_label(p) for p in sorted(view.unreadable - ignored)), hidden,
                 frozenset(mappers))


class _OwnMapping:
    """A read-only shared mapping of the object in this process, to learn the PFNs of sampled
    pages. Read-only: it can never write or fault on write-protect; pages are brought in with
    MADV_POPULATE_READ, which reports a page gone past the end as an error, not SIGBUS."""

    def __init__(self, obj: SharedObject) -> None:
        self.obj = obj
        self.map: mmap.mmap | None = None
        self.start = 0

    def __enter__(self) -> _OwnMapping:
        before = _own_mapping_starts(self.obj.object_id)
        self.map = mmap.mmap(self.obj.fd, self.obj.size, mmap.MAP_SHARED, mmap.PROT_READ)
        new = _own_mapping_starts(self.obj.object_id) - before
        if len(new) != 1:
            self.map.close()
            raise RuntimeError("cannot tell our own mapping of the object apart")
        self.start = new.pop()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.map is not None:
            self.map.close()

    def populate(self, offsets: list[int]) -> dict[int, int]:
        """Fault each page in (reading) and return {offset: PFN} of those present."""
        assert self.map is not None
        populated = []
        for off in offsets:
            try:
                self.map.madvise(MADV_POPULATE_READ, off, self.obj.page_size)
                populated.append(off)
            except OSError:
                continue  # the object shrank, or memory is short: not sampled
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = read_entries(fd, ((self.start + off) // mmap.PAGESIZE for off in populated))
        finally:
            os.close(fd)
        return {off: pfn for off in populated
                if (pfn := pagemap_pfn(got.get((self.start + off) // mmap.PAGESIZE, 0)))}


def _own_mapping_starts(obj: ObjectId) -> set[int]:
    return {m.start for m in read_maps(os.getpid()) if m.object_id == obj and m.offset == 0}
