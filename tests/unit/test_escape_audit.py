"""The escape audit's pure parts: /proc formats, sampling, the array-file reader, how findings
and notes are worded and rendered (snapshot summary lines, doctor rows)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from uffdsnap import escapes
from uffdsnap.cli.commands.snapshot import escape_lines
from uffdsnap.coordinator._escapes import EscapeAuditor
from uffdsnap.doctor import INFO, USEFUL, escape_checks
from uffdsnap.escapes import Audit, HiddenCheck


def test_fdinfo_fields() -> None:
    text = "pos:\t0\nflags:\t0100002\nmnt_id:\t24\nino:\t3\n"
    assert escapes.fdinfo_fields(text) == {"pos": "0", "flags": "0100002", "mnt_id": "24",
                                           "ino": "3"}


@pytest.mark.parametrize("flags,writable", [
    ("0100000", False),  # O_RDONLY|O_LARGEFILE
    ("0100001", True),  # O_WRONLY
    ("02100002", True),  # O_RDWR|O_CLOEXEC|O_LARGEFILE
    ("010000000", False),  # O_PATH
    ("0", False),
])
def test_opened_for_writing(flags: str, writable: bool) -> None:
    assert escapes.opened_for_writing(flags) is writable


def test_pagemap_pfn() -> None:
    assert escapes.pagemap_pfn(escapes.PM_PRESENT | 1 << 61 | 0x11C03F) == 0x11C03F
    assert escapes.pagemap_pfn(1 << 61 | 0x11C03F) is None  # not present
    assert escapes.pagemap_pfn(escapes.PM_PRESENT) is None  # PFN hidden (no CAP_SYS_ADMIN)
    assert escapes.pagemap_pfn(1 << 62) is None  # swapped


def test_large_folio() -> None:
    assert not escapes.large_folio(0x4838)  # a small shmem page, as kpageflags showed it
    assert escapes.large_folio(0x240C838)  # a THP head
    assert escapes.large_folio(0x2414838)  # a THP tail
    assert escapes.large_folio(1 << escapes.KPF_HUGE)


def test_read_entries_windows_and_end(tmp_path: Path) -> None:
    path = tmp_path / "array"
    path.write_bytes(struct.pack("<2000Q", *range(1000, 3000)))
    fd = os.open(path, os.O_RDONLY)
    try:
        want = [0, 5, 511, 512, 1999, 2000, 5000]
        got = escapes.read_entries(fd, want, window=16)
    finally:
        os.close(fd)
    assert got == {0: 1000, 5: 1005, 511: 1511, 512: 1512, 1999: 2999}  # none past the end


def test_sample_offsets_spread_over_data_only() -> None:
    fd = os.memfd_create("escapes-test")
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        os.ftruncate(fd, 64 * page)
        for p in (3, 40, 41, 63):
            os.pwrite(fd, b"x", p * page)
        assert escapes.sample_offsets(fd, 64 * page, page, 4) == [3 * page, 40 * page,
                                                                  63 * page]
        assert escapes.sample_offsets(fd, 64 * page, page, 64) == [3 * page, 40 * page,
                                                                   41 * page, 63 * page]
        assert escapes.sample_offsets(fd, 0, page, 64) == []
    finally:
        os.close(fd)


def _audit(openers: tuple[str, ...] = (), unreadable: tuple[str, ...] = (),
           hidden: HiddenCheck | None = None) -> Audit:
    return Audit(openers, unreadable, hidden or HiddenCheck(True, pages_compared=512))


def test_findings_and_notes() -> None:
    assert _audit().findings() == [] and _audit().notes() == []
    hidden = HiddenCheck(True, pages_compared=512, pages_with_excess=7,
                         example=(0x3000, 3, 2))
    found = _audit(("12 (sleep)",), ("1 (init)",), hidden)
    assert found.findings() == [
        "writable opener: 12 (sleep) holds the object open for writing without mapping it "
        "(its write() calls would not be tracked)",
        "hidden mapper: 7 of 512 sampled pages are mapped more often than the processes we "
        "can see account for (offset 0x3000: the kernel counts 3 mappings, we found 2); a "
        "process we cannot see (another PID namespace?) maps the object (or one of the 1 we "
        "may not inspect does)"]
    assert found.notes() == ["not audited: 1 process(es) we may not inspect (1 (init))"]
    unchecked = _audit(hidden=HiddenCheck(False, "hugetlbfs: why"))
    assert unchecked.findings() == []
    assert unchecked.notes() == ["hidden mappers not checked: hugetlbfs: why"]
    many = _audit(unreadable=("1 (a)", "2 (b)", "3 (c)", "4 (d)"))
    assert many.notes() == ["not audited: 4 process(es) we may not inspect (1 (a), 2 (b), "
                            "3 (c), ...)"]


def test_summary_lines_nested_and_flattened() -> None:
    nested = {"escapes": {"findings": ["writable opener: 12 (sleep) x"],
                          "notes": ["hidden mappers not checked: y"]}}
    flat = {"escapes_findings_text": "writable opener: 12 (sleep) x",
            "escapes_notes_text": "hidden mappers not checked: y"}
    want = ["  warning      writable opener: 12 (sleep) x",
            "  audit        hidden mappers not checked: y"]
    assert escape_lines(nested) == want
    assert escape_lines(flat) == want
    assert escape_lines({"escapes_findings_text": "", "escapes_notes_text": ""}) == []
    assert escape_lines({}) == []


def test_doctor_rows() -> None:
    clean = {c.name: c for c in escape_checks(_audit())}
    assert clean["writable openers"].ok and clean["hidden mappers"].ok
    assert "not audited" not in clean
    hidden = HiddenCheck(True, pages_compared=512, pages_with_excess=1, example=(0, 2, 1))
    rows = {c.name: c for c in escape_checks(_audit(("12 (sleep)",), ("1 (init)",), hidden))}
    assert not rows["writable openers"].ok and rows["writable openers"].level == USEFUL
    assert "12 (sleep)" in rows["writable openers"].detail and rows["writable openers"].fix
    assert not rows["hidden mappers"].ok and rows["hidden mappers"].fix
    assert rows["not audited"].level == INFO and "1 (init)" in rows["not audited"].detail
    unchecked = {c.name: c for c in escape_checks(_audit(hidden=HiddenCheck(False, "why")))}
    assert unchecked["hidden mappers"].level == INFO
    assert unchecked["hidden mappers"].detail == "not checked: why"


def test_a_run_that_was_not_audited_says_so() -> None:
    report = EscapeAuditor().report(7)
    assert report["audited"] is False and report["findings"] == []
    assert report["notes"]
