"""compact: a chain's state at its last T, written as one full image with its own manifest.

A chain costs every reader all its links, and losing one link loses every later state; a
compacted image stands alone. Its bytes are what restore writes (the same pieces, see
_reader.chain_pieces); its extents are recomputed over those bytes, page by page, so zero pages
become holes; it is published through ImageWriter (temporary, fsync, no-clobber rename), so an
existing file is never touched unless `force`, and then only replaced whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from uffdsnap.image._chain import Link, load_chain
from uffdsnap.image._files import IO_PIECE, check_replaceable, nonzero_runs, write_nonzero
from uffdsnap.image._format import CorruptImage, ExtentHash, manifest_path, manifest_sha256
from uffdsnap.image._reader import ChainSources, chain_pieces, check_outside_chain, verify_chain
from uffdsnap.image._writer import COALESCE_LIMIT, ImageWriter


@dataclass
class CompactReport:
    """What compact published."""

    image: str
    out: str
    size: int
    links: int  # images merged (1: a full image, copied)
    extents: int
    data_bytes: int  # nonzero bytes written; the rest is holes
    manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "out": self.out, "size": self.size, "links": self.links,
                "extents": self.extents, "data_bytes": self.data_bytes,
                "manifest_sha256": self.manifest_sha256}


def compact(image_path: str, out: str, *, force: bool = False) -> CompactReport:
    """Verify `image_path`'s chain, then publish its state at its T as the full image `out`
    (T, processes and stats of `image_path`'s manifest, plus stats.compacted_from: the chain,
    root first). `force` replaces an existing regular file `out` (never one of the chain's)."""
    if force:
        for path in (out, manifest_path(out)):
            check_replaceable(path)
    chain = load_chain(image_path)
    for path in (out, manifest_path(out)):
        check_outside_chain(path, chain)
    obj = chain[-1].manifest.object
    with ImageWriter(out, obj.size, obj.page_size, overwrite=force) as writer:
        report, idents = verify_chain(chain)
        if not report.ok:
            raise CorruptImage(f"{image_path}: refusing to compact a corrupt chain: "
                               f"{report.problem}")
        with ChainSources(chain, idents) as sources:
            data_bytes = _copy(chain, sources, writer)
        manifest = writer.publish(_fields(chain))
    return CompactReport(image=image_path, out=out, size=obj.size, links=len(chain),
                         extents=len(manifest.extents), data_bytes=data_bytes,
                         manifest_sha256=manifest_sha256(out))


def _copy(chain: list[Link], sources: ChainSources, writer: ImageWriter) -> int:
    """Write the chain's bytes into the writer's image and record an extent per run of
    nonzero pages; returns the bytes written."""
    page_size = writer.page_size
    runs = _Runs(writer)
    buf = bytearray(IO_PIECE)
    written = 0
    for pos, piece in chain_pieces(chain, sources, buf, align=page_size):
        written += write_nonzero(writer.fd, pos, buf, len(piece))
        for a, b in _page_runs(buf, len(piece), page_size):
            runs.add(pos + a, piece[a:b])
    runs.flush()
    return written


def _page_runs(buf: bytearray, n: int, page_size: int) -> Iterator[tuple[int, int]]:
    """Runs of buf[:n] made of pages that are not all zero (a piece starts on a page). Pages
    larger than a piece cannot be judged within one: they are all taken as data."""
    if page_size > IO_PIECE:
        if n:
            yield 0, n
        return
    pending: tuple[int, int] | None = None
    for a, b in nonzero_runs(buf, 0, n):
        a, b = a - a % page_size, min(n, -(-b // page_size) * page_size)
        if pending and a <= pending[1]:
            pending = (pending[0], b)
            continue
        if pending:
            yield pending
        pending = (a, b)
    if pending:
        yield pending


class _Runs:
    """Touching data becomes one extent of about COALESCE_LIMIT (ImageWriter keeps extents of
    that size apart), cut only at page boundaries."""

    def __init__(self, writer: ImageWriter):
        self.writer = writer
        self.cap = max(COALESCE_LIMIT, writer.page_size)
        self.start = self.end = -1
        self.hash = ExtentHash()

    def add(self, offset: int, data: memoryview) -> None:
        if self.start >= 0 and (offset != self.end or (self.end - self.start >= self.cap
                                                       and self._at_page_end())):
            self.flush()
        if self.start < 0:
            self.start = self.end = offset
            self.hash = ExtentHash()
        self.hash.update(data)
        self.end += len(data)

    def _at_page_end(self) -> bool:
        return self.end % self.writer.page_size == 0 or self.end == self.writer.size

    def flush(self) -> None:
        if self.start >= 0:
            self.writer.record_extent(self.start, self.end - self.start, self.hash.checksum())
            self.start = self.end = -1


def _fields(chain: list[Link]) -> dict[str, Any]:
    """The compacted image's manifest fields: the last link's, and where they came from."""
    last = chain[-1].manifest
    obj = last.object
    return {
        "object": {"source": obj.source, "kind": obj.kind, "dev": obj.dev, "inode": obj.inode},
        "snapshot_time": last.snapshot_unix_ns,
        "processes": [dict(p) for p in last.processes],
        "stats": {**last.stats, "compacted_from": [
            {"image": os.path.abspath(link.image), "manifest_sha256": link.manifest_sha256,
             "snapshot_unix_ns": link.manifest.snapshot_unix_ns} for link in chain]},
    }
