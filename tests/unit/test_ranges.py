"""Range arithmetic the agent's audit and tracker rely on (pure): a union of address ranges
answers "is [start, end) inside?" correctly, including across touching ranges, and fast enough
for a process with tens of thousands of mappings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from uffdsnap.tracker import Union, covered

RANGES = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)).map(
    lambda t: (t[0], t[0] + t[1])), max_size=20)


@given(RANGES, st.integers(0, 250), st.integers(1, 60))
def test_union_matches_brute_force(ranges: list[tuple[int, int]], start: int, n: int) -> None:
    inside = all(any(a <= x < b for a, b in ranges) for x in range(start, start + n))
    assert Union(ranges).covers(start, start + n) == inside
    assert covered(start, start + n, ranges) == inside


def test_touching_ranges_merge() -> None:
    u = Union([(20, 30), (10, 20), (40, 50)])
    assert u.covers(10, 30) and not u.covers(25, 45) and not u.covers(50, 51)


def test_tens_of_thousands_of_mappings() -> None:
    """65536 one-page mappings a page apart (the shape of tests/system's fragments helper):
    every one of them asked about once, in well under a second."""
    pages = [(i * 8192, i * 8192 + 4096) for i in range(65536)]
    u = Union(pages)
    assert all(u.covers(a, b) for a, b in pages)
    assert not u.covers(4096, 8192)
