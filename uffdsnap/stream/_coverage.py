"""Which pages of the object a stream has covered, so a page sent twice, or never, is caught.

One bit per page in an anonymous mapping: the kernel hands out its zero pages only as they are
touched, so memory follows what the stream covered (at most 256 MiB, for 2^31 pages), never
what a hostile header declares. Pure: no I/O.
"""

from __future__ import annotations

import mmap

_PIECE_BITS = 1 << 23  # pages handled at a time (1 MiB of bitmap)


class Coverage:
    """A set of pages of an object of `npages`, filled by ranges that must not overlap."""

    def __init__(self, npages: int):
        if npages < 0:
            raise ValueError(f"npages must be >= 0, not {npages}")
        self.npages = npages
        self.covered = 0
        nbytes = (npages + 7) // 8
        self._bits = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE) if nbytes else None

    def close(self) -> None:
        if self._bits is not None:
            self._bits.close()
            self._bits = None

    def cover(self, first: int, count: int) -> int | None:
        """Add pages [first, first+count); if one of them is already in, return the first
        such page instead (the set is then left partly filled: the stream is dead anyway)."""
        if count <= 0 or first < 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, +{count}) are not inside [0, {self.npages})")
        assert self._bits is not None
        pos, end = first, first + count
        while pos < end:
            stop = min(end, (pos // _PIECE_BITS + 1) * _PIECE_BITS)  # one piece at a time
            lo, hi = pos // 8, (stop + 7) // 8
            word = int.from_bytes(self._bits[lo:hi], "little")
            mask = ((1 << (stop - pos)) - 1) << (pos - lo * 8)
            clash = word & mask
            if clash:
                return lo * 8 + (clash & -clash).bit_length() - 1
            self._bits[lo:hi] = (word | mask).to_bytes(hi - lo, "little")
            self.covered += stop - pos
            pos = stop
        return None

    def complete(self) -> bool:
        return self.covered == self.npages

    def first_missing(self) -> int | None:
        """The first page not covered yet, or None when every page is."""
        if self.complete():
            return None
        assert self._bits is not None
        nbytes = len(self._bits)
        for lo in range(0, nbytes, _PIECE_BITS // 8):
            piece = self._bits[lo:min(nbytes, lo + _PIECE_BITS // 8)]
            rest = piece.lstrip(b"\xff")
            if rest:
                at = lo + len(piece) - len(rest)
                byte = rest[0]
                return at * 8 + ((~byte & (byte + 1)).bit_length() - 1)
        raise AssertionError("coverage count and bitmap disagree")
