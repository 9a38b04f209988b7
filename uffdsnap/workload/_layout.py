"""Where everything is in a workload object, and which page each step fills (pure arithmetic).

The Python writer, the checker and the tests derive every address and expected word from here,
so a layout change is made in one place (and in uffdsnap/native/src/workload.h, the native
writer's copy, which the tests hold to this one byte for byte). docs/workload.md has the design.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = int.from_bytes(b"UFSNAPWL", "little")
VERSION = 1
STAMP_TAG = 0xA5
STEP_BITS = 40
STEP_MAX = (1 << STEP_BITS) - 1
WRITER_BITS = 16
MAX_WRITERS = 252  # counter entries fit a 4 KiB page: 8 + 2 * 252 words

# Header words (page 0). The stop word is control, not state: the checker ignores it.
H_MAGIC, H_VERSION, H_NWRITERS, H_DATA_PAGES, H_PAGE_SIZE, H_STOP = range(6)
HEADER_WORDS = 6
HEADER_BYTES = 8 * HEADER_WORDS
# Counter page words. Entry j of the observation vector is the pair (value, step) at C_OBS + 2j.
C_SEQ, C_IMPL, C_PID, C_OBS = 0, 1, 2, 8
IMPLS = {0: "unknown", 1: "c", 2: "python"}
IMPL_PYTHON = 2


def multiplier(index: int, data_pages: int) -> int:
    """A_i: odd, so k -> k*A_i + B_i mod D visits every page once in any D consecutive steps."""
    return ((((2 * index + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 32 | 1) \
        & (data_pages - 1)


def addend(index: int, data_pages: int) -> int:
    """B_i: the page of step 0 (a step that never happens; it only offsets the sequence)."""
    return ((((index + 1) * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF) >> 32) & (data_pages - 1)


def stamp(index: int, step: int) -> int:
    """The u64 word writer `index` fills its data page with at step `step` (step >= 1)."""
    return STAMP_TAG << 56 | index << STEP_BITS | step


def decode_stamp(word: int) -> tuple[int, int] | None:
    """(writer, step) of a stamp word, or None if the word is not a stamp."""
    if word >> 56 != STAMP_TAG:
        return None
    return (word >> STEP_BITS) & ((1 << WRITER_BITS) - 1), word & STEP_MAX


def page_for_step(index: int, step: int, data_pages: int) -> int:
    """The data page writer `index` fills at step `step`."""
    return (step * multiplier(index, data_pages) + addend(index, data_pages)) & (data_pages - 1)


def last_step(index: int, page: int, seq: int, data_pages: int) -> int:
    """The last step <= seq at which writer `index` filled `page`; 0 if none did (O(1)).

    Steps choosing `page` are exactly those k = (page - B_i) * A_i^-1 (mod D), one in every D.
    """
    mask = data_pages - 1
    inverse = pow(multiplier(index, data_pages), -1, data_pages) if data_pages > 1 else 0
    residue = ((page - addend(index, data_pages)) * inverse) & mask
    step = seq - ((seq - residue) & mask)
    return step if step > 0 else 0


def max_writers(page_size: int) -> int:
    """How many writers' observation entries fit one counter page (capped at MAX_WRITERS)."""
    return min(MAX_WRITERS, (page_size // 8 - C_OBS) // 2)


@dataclass(frozen=True)
class Layout:
    """Where everything is in a workload object. All offsets are byte offsets into the object."""

    nwriters: int
    data_pages: int
    page_size: int = 4096

    def __post_init__(self) -> None:
        ps, d, n = self.page_size, self.data_pages, self.nwriters
        if ps < 4096 or ps & (ps - 1):
            raise ValueError(f"page_size {ps} is not a power of two >= 4096")
        if d < 1 or d & (d - 1):
            raise ValueError(f"data_pages {d} is not a power of two >= 1")
        if not 1 <= n <= max_writers(ps):
            raise ValueError(f"nwriters {n} is not in 1..{max_writers(ps)}")

    @property
    def words_per_page(self) -> int:
        return self.page_size // 8

    @property
    def region_size(self) -> int:
        """Bytes per writer: one counter page and D data pages."""
        return (1 + self.data_pages) * self.page_size

    @property
    def size(self) -> int:
        """Bytes in the object: the header page and every writer's region."""
        return self.page_size + self.nwriters * self.region_size

    @property
    def stop_offset(self) -> int:
        return 8 * H_STOP

    def region_offset(self, index: int) -> int:
        return self.page_size + index * self.region_size

    def counter_offset(self, index: int) -> int:
        return self.region_offset(index)

    def data_offset(self, index: int, page: int) -> int:
        return self.region_offset(index) + (1 + page) * self.page_size

    def obs_offset(self, index: int, other: int) -> int:
        """Offset of the value word of writer `index`'s observation of writer `other`."""
        return self.counter_offset(index) + 8 * (C_OBS + 2 * other)

    def locate(self, offset: int) -> str:
        """Human name of the page holding `offset` ("header", "writer 2 counter", ...)."""
        if offset < self.page_size:
            return "header"
        index, rest = divmod(offset - self.page_size, self.region_size)
        if index >= self.nwriters:
            return "past the end"
        page = rest // self.page_size
        return f"writer {index} counter" if page == 0 else f"writer {index} data page {page - 1}"

    def header_bytes(self) -> bytes:
        return struct.pack(f"<{HEADER_WORDS}Q", MAGIC, VERSION, self.nwriters, self.data_pages,
                           self.page_size, 0)

    @classmethod
    def from_header(cls, header: bytes | bytearray | memoryview) -> Layout:
        """Parse the header; ValueError (with the reason) if it is not a workload header."""
        if len(header) < HEADER_BYTES:
            raise ValueError(f"header too short ({len(header)} bytes)")
        words = struct.unpack_from(f"<{HEADER_WORDS}Q", header)
        if words[H_MAGIC] != MAGIC:
            raise ValueError(f"bad magic {words[H_MAGIC]:#x} (not a workload object)")
        if words[H_VERSION] != VERSION:
            raise ValueError(f"unsupported workload version {words[H_VERSION]}")
        return cls(words[H_NWRITERS], words[H_DATA_PAGES], words[H_PAGE_SIZE])
