"""Write tracking's bookkeeping (coordinator/_tracking.py), without processes: when a snapshot
may be a delta, and what the record holds after each outcome."""

from __future__ import annotations

from uffdsnap.coordinator._tracking import Parent, WriteTracking, count, mark, merge, runs

PS = 4096


def _tracking(npages: int = 16) -> WriteTracking:
    t = WriteTracking(npages, PS)
    t.start()
    return t


def _published(t: WriteTracking, plan, kept: set, name: str = "/x/a.img", when: int = 1) -> None:
    t.end(plan, bytearray(t.npages), released_kept=kept, published=Parent(name, "0" * 64, when))


def test_first_snapshot_is_full_then_deltas() -> None:
    t = _tracking()
    plan = t.begin()
    t.decide(plan, True, [("a", "pid 1 (a)")], [""], "")
    assert not plan.delta and "no parent" in plan.full_reason
    _published(t, plan, {"a"})
    t.record(3 * PS, PS)
    plan = t.begin()
    assert count(plan.dirty) == 1 and count(t.carry) == 0  # the record restarts at begin
    t.decide(plan, True, [("a", "pid 1 (a)")], [""], "")
    assert plan.delta and plan.full_reason == ""


def test_every_gap_forces_a_full_image_with_its_reason() -> None:
    cases = {
        "newcomer": ([("a", "pid 1 (a)"), ("b", "pid 2 (b)")], [""] * 2, "",
                     "pid 2 (b) joined since the previous snapshot"),
        "agent gap": ([("a", "pid 1 (a)")], ["pid 1 mapped the object at 0x1000 anew"], "",
                      "mapped the object at 0x1000 anew"),
        "elsewhere": ([("a", "pid 1 (a)")], [""], "unix:/r.sock",
                      "published as a local file, this one goes streamed to unix:/r.sock"),
    }
    for name, (members, gaps, location, why) in cases.items():
        t = _tracking()
        _published(t, t.begin(), {"a"})
        plan = t.begin()
        t.decide(plan, True, members, gaps, location)
        assert not plan.delta and why in plan.full_reason, (name, plan.full_reason)


def test_lost_agent_and_failed_snapshot_are_gaps_until_a_full_image() -> None:
    t = _tracking()
    _published(t, t.begin(), {"a"})
    t.agent_left("a", "pid 1 (a)", process_alive=True)
    plan = t.begin()
    t.decide(plan, True, [], [], "")
    assert "agent of pid 1 (a) was lost" in plan.full_reason
    _published(t, plan, {"b"})  # a full image published: the chain starts again
    assert t.gap == ""
    plan = t.begin()
    t.end(plan, None, released_kept=None, published=None, failure="disk full")
    plan = t.begin()
    t.decide(plan, True, [("b", "pid 2 (b)")], [""], "")
    assert "previous snapshot failed (disk full)" in plan.full_reason


def test_an_agent_whose_process_exited_leaves_no_gap() -> None:
    t = _tracking()
    _published(t, t.begin(), {"a", "b"})
    t.agent_left("a", "pid 1 (a)", process_alive=False)
    plan = t.begin()
    t.decide(plan, True, [("b", "pid 2 (b)")], [""], "")
    assert plan.delta


def test_unpublished_run_keeps_its_pages_for_the_next_delta() -> None:
    t = _tracking()
    _published(t, t.begin(), {"a"})
    t.record(2 * PS, PS)
    plan = t.begin()
    written = bytearray(t.npages)
    written[5] = 1  # served after its T
    t.end(plan, written, released_kept={"a"}, published=None, failure="copy failed")
    assert list(runs(t.carry)) == [(2, 3), (5, 6)]


def test_not_requested_is_full_without_reason_and_parent_reference() -> None:
    t = _tracking()
    plan = t.begin()
    t.decide(plan, False, [], [], "")
    assert not plan.delta and plan.full_reason == ""
    local = Parent("/srv/snaps/a.img", "0" * 64, 5)
    assert local.reference("/srv/snaps/b.img")["image"] == "a.img"
    assert local.reference("/srv/other/b.img")["image"] == "../snaps/a.img"
    assert Parent("snapshot-1.img", "0" * 64, 5, "unix:/r").reference()["image"] == \
        "snapshot-1.img"


def test_page_maps() -> None:
    pages = bytearray(10)
    mark(pages, 0, 1, PS)  # a partial page counts whole
    mark(pages, 3 * PS, 2 * PS, PS)
    mark(pages, 9 * PS, 100 * PS, PS)  # clipped to the map
    assert list(runs(pages)) == [(0, 1), (3, 5), (9, 10)]
    other = bytearray(10)
    other[1] = 1
    merge(pages, other)
    assert list(runs(pages)) == [(0, 2), (3, 5), (9, 10)] and count(pages) == 5


def test_delta_windows_cover_written_runs_and_optionally_the_gaps() -> None:
    from uffdsnap.coordinator._delta import delta_windows

    dirty = bytearray(10)
    dirty[2:5] = b"\x01" * 3
    dirty[9] = 1
    size = 9 * PS + 100  # the last page is partial
    assert list(delta_windows(dirty, PS, size, 2 * PS)) == [
        (2 * PS, 2 * PS, True), (4 * PS, PS, True), (9 * PS, 100, True)]
    with_gaps = list(delta_windows(dirty, PS, size, 2 * PS, gaps=True))
    assert with_gaps == [(0, 2 * PS, None), (2 * PS, 2 * PS, True), (4 * PS, PS, True),
                         (5 * PS, 4 * PS, None), (9 * PS, 100, True)]
    # together they cover the object exactly once
    assert sum(length for _, length, _ in with_gaps) == size


def test_pages_a_remove_event_named_are_kept_as_runs_and_looked_at_for_holes() -> None:
    """(The punch of a MADV_REMOVE comes after its event is read: the coordinator keeps the
    pages it named and looks for holes in them until the copy is over.)"""
    import os

    from uffdsnap.coordinator._removing import first_hole, page_runs
    from uffdsnap.native.fileops import punch_hole

    assert page_runs([], [5, 3, 4, 9]) == [(3, 6), (9, 10)]
    assert page_runs([(3, 6), (9, 10)], [6, 8, 2]) == [(2, 7), (8, 10)]
    fd = os.memfd_create("removing")
    try:
        os.ftruncate(fd, 4 * PS)
        os.pwrite(fd, b"\x01" * (4 * PS), 0)
        assert first_hole(fd, 0, 4 * PS) is None
        assert first_hole(fd, 4 * PS, 5 * PS) is None  # past the end: the size check's
        punch_hole(fd, 2 * PS, PS)  # (as MADV_REMOVE does)
        assert first_hole(fd, 0, 2 * PS) is None
        assert first_hole(fd, 0, 4 * PS) == 2 * PS
        assert first_hole(fd, 3 * PS, 4 * PS) is None
    finally:
        os.close(fd)
