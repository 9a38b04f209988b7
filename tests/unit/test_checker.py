"""The consistency checker, pure: the workload's step arithmetic and the checker's verdicts on
simulated images (no processes; tests/system/test_workload.py runs real writers)."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffdsnap import workload as wl

PS = 4096
D = 64
_names = itertools.count()


def simulate(nwriters: int, data_pages: int, steps: list[int], page_size: int = PS) -> bytearray:
    """An object image after writer i did steps[i] steps, run by the real PythonWriter code,
    interleaved round-robin (so every observation is of a real earlier state)."""
    layout = wl.Layout(nwriters, data_pages, page_size)
    buf = bytearray(layout.size)
    buf[:wl.HEADER_BYTES] = layout.header_bytes()
    ws = [wl.PythonWriter.from_buffer(buf, i) for i in range(nwriters)]
    for w, n in zip(ws, steps, strict=True):
        if n:
            w.mark()
    for _ in range(max(steps, default=0)):
        for w, n in zip(ws, steps, strict=True):
            if w.seq < n:
                w.step()
    for w in ws:
        w.close()
    return buf


def put(buf: bytearray, offset: int, word: int) -> None:
    struct.pack_into("<Q", buf, offset, word)


def fill(buf: bytearray, offset: int, word: int, nwords: int) -> None:
    buf[offset:offset + 8 * nwords] = word.to_bytes(8, "little") * nwords


# --- pure step/page arithmetic ----------------------------------------------------------------

@given(st.integers(0, 0xFFFF), st.integers(0, wl.STEP_MAX))
def test_stamp_round_trips(index: int, step: int) -> None:
    word = wl.stamp(index, step)
    assert word < 1 << 64
    assert wl.decode_stamp(word) == (index, step)


def test_decode_rejects_non_stamps() -> None:
    assert wl.decode_stamp(0) is None
    assert wl.decode_stamp(0x1234) is None
    assert wl.describe_word(0) == "0"
    assert wl.describe_word(wl.stamp(3, 17)) == "w3#17"


@pytest.mark.parametrize("d", [2, 4, 64, 1024])
@pytest.mark.parametrize("index", [0, 1, 5, 251])
def test_any_d_consecutive_steps_visit_every_page_once(index: int, d: int) -> None:
    assert wl.multiplier(index, d) % 2 == 1
    for first in (1, 7, d + 3):
        pages = [wl.page_for_step(index, k, d) for k in range(first, first + d)]
        assert sorted(pages) == list(range(d))


@given(st.integers(0, 251), st.sampled_from([1, 2, 8, 64, 4096]), st.integers(0, 10_000),
       st.data())
def test_last_step_matches_brute_force(index: int, d: int, seq: int, data: st.DataObject) -> None:
    page = data.draw(st.integers(0, d - 1))
    brute = max((k for k in range(max(1, seq - 2 * d), seq + 1)
                 if wl.page_for_step(index, k, d) == page), default=0)
    assert wl.last_step(index, page, seq, d) == brute


def test_layout_offsets_and_header() -> None:
    lay = wl.Layout(3, 8)
    assert lay.region_size == 9 * PS
    assert lay.size == PS + 3 * 9 * PS
    assert lay.counter_offset(0) == PS
    assert lay.data_offset(0, 0) == 2 * PS
    assert lay.counter_offset(2) == PS + 2 * 9 * PS
    assert lay.data_offset(2, 7) == lay.size - PS
    assert lay.obs_offset(1, 2) == lay.counter_offset(1) + 8 * (wl.C_OBS + 4)
    assert lay.locate(0) == "header"
    assert lay.locate(lay.data_offset(1, 5) + 100) == "writer 1 data page 5"
    assert lay.locate(lay.counter_offset(2)) == "writer 2 counter"
    assert wl.Layout.from_header(lay.header_bytes()) == lay
    assert lay.header_bytes()[:8] == b"UFSNAPWL"


@pytest.mark.parametrize("args", [(0, 8), (3, 6), (3, 0), (253, 8), (2, 8, 1000), (2, 8, 2048)])
def test_layout_rejects_bad_shapes(args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        wl.Layout(*args)


def test_max_writers_fill_a_counter_page() -> None:
    assert wl.max_writers(4096) == 252
    lay = wl.Layout(252, 1)
    assert lay.obs_offset(0, 251) + 16 == lay.counter_offset(0) + PS


# --- the checker on simulated images ----------------------------------------------------------

def test_simulated_image_is_consistent() -> None:
    steps = [0, 1, 63, 64, 65, 300]
    result = wl.check_image(simulate(6, 64, steps))
    assert result.ok, result.summary()
    assert result.seqs == steps
    assert all(w.phase == "idle" for w in result.writers)
    assert [w.impl for w in result.writers] == ["unknown"] + ["python"] * 5
    assert result.summary().startswith("consistent: 6 writers at seqs 0..300")
    json.dumps(result.to_dict())


def test_single_page_regions() -> None:
    assert wl.check_image(simulate(2, 1, [5, 9])).ok


def test_image_types_accepted() -> None:
    buf = simulate(2, 8, [10, 20])
    for image in (bytes(buf), buf, memoryview(buf)):
        assert wl.check_image(image).ok


def inflight(buf: bytearray, layout: wl.Layout, i: int, words: int, entries: int) -> None:
    """Put writer i mid-way through its next step: `words` of its page stamped, `entries`
    counter entries written (value, then tag)."""
    seq = struct.unpack_from("<Q", buf, layout.counter_offset(i))[0]
    k = seq + 1
    off = layout.data_offset(i, wl.page_for_step(i, k, layout.data_pages))
    fill(buf, off, wl.stamp(i, k), words)
    for j in range(entries):
        value = struct.unpack_from("<Q", buf, layout.counter_offset(j))[0]
        put(buf, layout.obs_offset(i, j), value)
        put(buf, layout.obs_offset(i, j) + 8, k)


@pytest.mark.parametrize("seq", [0, 1, 70])
@pytest.mark.parametrize("words,entries,phase", [(1, 0, "filling"), (300, 0, "filling"),
                                                 (512, 0, "publishing"), (512, 2, "publishing"),
                                                 (512, 3, "publishing")])
def test_step_in_flight_is_accepted(seq: int, words: int, entries: int, phase: str) -> None:
    buf = simulate(3, 64, [40, seq, 90])
    layout = wl.Layout(3, 64)
    inflight(buf, layout, 1, words, entries)
    result = wl.check_image(buf)
    assert result.ok, result.summary()
    w = result.writers[1]
    assert (w.seq, w.phase, w.inflight_words, w.inflight_entries) == (seq, phase, words, entries)


def test_boundary_entry_may_hold_its_new_value() -> None:
    """Value is written before tag: the first untagged entry may already hold the new value."""
    buf = simulate(3, 64, [40, 50, 90])
    layout = wl.Layout(3, 64)
    inflight(buf, layout, 1, 512, 1)
    put(buf, layout.obs_offset(1, 1), 50)  # own seq, as step 51 reads it; tag still 50
    assert wl.check_image(buf).ok


def violations(buf: bytes | bytearray) -> list[wl.Violation]:
    result = wl.check_image(buf)
    assert not result.ok
    assert result.summary().startswith("INCONSISTENT")
    json.dumps(result.to_dict())
    return list(result.violations)


def test_stale_data_page_is_detected() -> None:
    buf = simulate(3, 64, [100, 200, 300])
    layout = wl.Layout(3, 64)
    p = 10 if wl.page_for_step(2, 301, 64) != 10 else 11
    k = wl.last_step(2, p, 300, 64)
    fill(buf, layout.data_offset(2, p), wl.stamp(2, k - 64), 512)
    [v] = violations(buf)
    assert (v.kind, v.writer, v.page, v.offset) == ("data", 2, p, layout.data_offset(2, p))
    assert v.expected.startswith(f"w2#{k} x512")
    assert v.found == f"w2#{k - 64} x512"
    assert str(v).startswith(f"data: writer 2 data page {p} @")


def test_newer_and_zero_and_garbage_pages_are_detected() -> None:
    buf = simulate(2, 64, [100, 200])
    layout = wl.Layout(2, 64)
    skip = wl.page_for_step(1, 201, 64)
    pages = [p for p in range(64) if p != skip][:3]
    fill(buf, layout.data_offset(1, pages[0]), wl.stamp(1, 250), 512)   # from the future
    fill(buf, layout.data_offset(1, pages[1]), 0, 512)                   # lost
    put(buf, layout.data_offset(1, pages[2]) + 8 * 77, 0xDEADBEEF)       # one bad word
    found = {(v.kind, v.page): v for v in violations(buf)}
    assert set(found) == {("data", p) for p in pages}
    assert found[("data", pages[0])].found == "w1#250 x512"
    assert found[("data", pages[2])].found == "w1#168 x77, 0x00000000deadbeef x1, w1#168 x434" \
        .replace("168", str(wl.last_step(1, pages[2], 200, 64)))


def test_torn_page_that_is_not_a_prefix_is_detected() -> None:
    buf = simulate(2, 64, [100, 200])
    layout = wl.Layout(2, 64)
    p = wl.page_for_step(0, 101, 64)
    off = layout.data_offset(0, p)
    fill(buf, off + 8 * 256, wl.stamp(0, 101), 256)  # new stamp in the back half only
    [v] = violations(buf)
    assert (v.kind, v.writer, v.page) == ("torn", 0, p)
    assert v.expected.startswith("a prefix of w0#101")
    assert v.found == f"w0#{wl.last_step(0, p, 100, 64)} x256, w0#101 x256"


def test_torn_page_of_a_step_after_next_is_detected() -> None:
    buf = simulate(2, 64, [100, 200])
    layout = wl.Layout(2, 64)
    p = wl.page_for_step(0, 102, 64)
    fill(buf, layout.data_offset(0, p), wl.stamp(0, 102), 10)
    assert [v.kind for v in violations(buf)] == ["data"]


def test_counter_ahead_of_other_writer_is_a_cross_violation() -> None:
    buf = simulate(3, 64, [100, 200, 300])
    layout = wl.Layout(3, 64)
    put(buf, layout.obs_offset(2, 0), 105)  # writer 2 claims it saw writer 0 at 105 > 100
    [v] = violations(buf)
    assert (v.kind, v.writer, v.offset) == ("cross", 2, layout.obs_offset(2, 0))
    assert v.expected == "obs[0] <= 100 (writer 0's seq in the image)"
    assert v.found.startswith("obs[0] = 105")


def test_counter_tags_out_of_order_are_detected() -> None:
    buf = simulate(3, 64, [100, 200, 300])
    layout = wl.Layout(3, 64)
    inflight(buf, layout, 1, 512, 0)
    put(buf, layout.obs_offset(1, 2) + 8, 201)  # last entry tagged 201 but the first not
    assert [v.kind for v in violations(buf)] == ["counter"]


def test_counter_advanced_before_its_data_is_detected() -> None:
    buf = simulate(3, 64, [100, 200, 300])
    layout = wl.Layout(3, 64)
    inflight(buf, layout, 1, 100, 2)  # entries of step 201 written, its page only partly
    [v] = violations(buf)
    assert v.kind == "counter" and "100/512 words" in v.found


def test_own_entry_must_match_own_seq() -> None:
    buf = simulate(2, 64, [100, 200])
    layout = wl.Layout(2, 64)
    put(buf, layout.obs_offset(1, 1), 150)
    [v] = violations(buf)
    assert (v.kind, v.writer) == ("counter", 1)
    assert v.expected == "obs[1] in [199]"


def test_whole_counter_page_from_the_past_is_detected() -> None:
    """A counter page copied before its data pages: the data is newer than the seq says."""
    old = simulate(2, 64, [100, 150])
    new = simulate(2, 64, [130, 150])
    layout = wl.Layout(2, 64)
    start, end = layout.counter_offset(0), layout.data_offset(0, 0)
    new[start:end] = old[start:end]
    kinds = {v.kind for v in violations(new)}
    assert "data" in kinds


_FUZZ_IMAGE = bytes(simulate(3, 16, [40, 17, 5]))
_FUZZ_LAYOUT = wl.Layout(3, 16)


@given(st.integers(wl.Layout(3, 16).page_size, len(_FUZZ_IMAGE) - 1), st.integers(1, 255))
def test_any_flipped_data_byte_is_caught(offset: int, xor: int) -> None:
    """Random damage never crashes the checker; outside the in-flight page, any changed data
    byte is a violation."""
    buf = bytearray(_FUZZ_IMAGE)
    buf[offset] ^= xor
    result = wl.check_image(buf)
    where = _FUZZ_LAYOUT.locate(offset)
    if "data page" in where:
        writer, page = int(where.split()[1]), int(where.split()[-1])
        seq = result.seqs[writer]
        if page != wl.page_for_step(writer, seq + 1, 16):
            assert not result.ok and {v.kind for v in result.violations} == {"data"}


def test_garbage_seq_is_a_violation_not_a_crash() -> None:
    buf = simulate(2, 8, [3, 4])
    put(buf, wl.Layout(2, 8).counter_offset(1), 1 << 63)
    result = wl.check_image(buf)
    assert not result.ok
    assert result.writers[1].phase == "invalid"


def test_describe_page() -> None:
    page = bytearray(PS)
    fill(page, 0, wl.stamp(1, 9), 100)
    fill(page, 8 * 100, wl.stamp(1, 2), 411)
    assert wl.describe_page(bytes(page)) == "w1#9 x100, w1#2 x411, 0 x1"
    noisy = bytes(range(256)) * 16
    assert wl.describe_page(noisy).endswith("(508 more words)")
    assert wl.describe_page(bytes(2 << 20)) == "0 x262144"


def test_bad_header_and_short_image() -> None:
    assert [v.kind for v in violations(b"")] == ["header"]
    assert [v.kind for v in violations(bytes(PS * 4))] == ["header"]
    buf = simulate(2, 8, [3, 4])
    assert [v.kind for v in violations(buf[:-PS])] == ["size"]


def test_violations_are_capped_but_counted() -> None:
    buf = simulate(2, 64, [200, 200])
    layout = wl.Layout(2, 64)
    for p in range(64):
        fill(buf, layout.data_offset(0, p), 0, 512)
    result = wl.check_image(buf, max_violations=5)
    assert len(result.violations) == 5
    assert result.violation_count == 64
    assert result.kinds == {"data": 63, "torn": 1}  # step 201's page is judged as torn
    assert "64 violations (63 data, 1 torn)" in result.summary()


def test_check_file(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(simulate(2, 8, [30, 40]))
    assert wl.check_file(img).ok
    (tmp_path / "empty.img").write_bytes(b"")
    assert not wl.check_file(tmp_path / "empty.img").ok


