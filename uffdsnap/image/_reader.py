"""Reading images: verify, restore and info, each trusting nothing it reads.

Each follows the image's chain (a delta's parents down to a full image, see _chain); manifests
are loaded and validated by the format module; the images' bytes are read at most IO_PIECE at a
time, so memory stays bounded for objects of any size.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from uffdsnap.errors import UserError
from uffdsnap.image._chain import Link, load_chain, segments, walk_chain
from uffdsnap.image._files import (
    IO_PIECE,
    check_replaceable,
    create_temp,
    data_regions,
    fsync_dir,
    nonzero_outside,
    pieces,
    place,
    range_checksum,
    unlink_quiet,
    write_nonzero,
)
from uffdsnap.image._format import (
    CorruptImage,
    ImageError,
    manifest_path,
)

MAX_BAD_LISTED = 1000  # verify counts every bad extent but lists at most this many offsets


def _open_image(image_path: str) -> tuple[int, os.stat_result]:
    """Open an image (whose manifest was found) read-only: a regular file, or ImageError."""
    try:
        # O_NONBLOCK: a FIFO given as the image must not hang us (no effect on files)
        fd = os.open(image_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{image_path}: image not found (its manifest exists)") from None
    except OSError as e:
        raise ImageError(f"{image_path}: cannot open image: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError(f"{image_path}: not a regular file")
    return fd, st


@dataclass
class VerifyReport:
    """What verify found. `ok` only if, for every link of the chain, size, every checksum, and
    every gap are right. The per-image fields describe the image asked about; `chain` lists
    every link, root first, and `bytes_checked` counts them all."""

    image: str
    ok: bool
    object_size: int
    image_size: int
    extents: int
    bytes_checked: int = 0
    bad_extents: list[int] = field(default_factory=list)  # offsets, at most MAX_BAD_LISTED
    bad_extent_count: int = 0
    nonzero_outside: list[int] = field(default_factory=list)  # first nonzero byte per gap
    problem: str | None = None  # the first problem, one line
    chain: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "ok": self.ok, "object_size": self.object_size,
                "image_size": self.image_size, "extents": self.extents,
                "bytes_checked": self.bytes_checked, "bad_extents": self.bad_extents,
                "bad_extent_count": self.bad_extent_count,
                "nonzero_outside": self.nonzero_outside, "problem": self.problem,
                "chain": self.chain}


Identity = tuple[int, int]  # (st_dev, st_ino) of an image file as verified


def verify(image_path: str) -> VerifyReport:
    """Check an image, and every image of its chain, against its manifest, reading at most
    IO_PIECE bytes at a time.

    Raises ImageError when there is nothing sound to check (no/malformed manifest, no image, a
    broken chain: see _chain); a readable image whose bytes disagree comes back as a report
    with ok=False.
    """
    return verify_chain(load_chain(image_path))[0]


def verify_chain(chain: list[Link]) -> tuple[VerifyReport, list[Identity]]:
    """verify of a loaded chain (root first); also which files were verified, so that what
    is read afterwards can be checked to be them."""
    reports, idents = [], []
    for link in chain:
        report, ident = _verify_image(link)
        reports.append(report)
        idents.append(ident)
    top = reports[-1]
    top.chain = [{**link.to_dict(), "ok": r.ok, "problem": r.problem,
                  "bytes_checked": r.bytes_checked}
                 for link, r in zip(chain, reports, strict=True)]
    top.bytes_checked = sum(r.bytes_checked for r in reports)
    for link, r in zip(reversed(chain[:-1]), reversed(reports[:-1]), strict=True):
        if top.ok and not r.ok:
            top.ok = False
            top.problem = f"its parent {link.image}: {r.problem}"
    return top, idents


def _verify_image(link: Link) -> tuple[VerifyReport, Identity]:
    """One image against its own manifest: size, extents' checksums, zeros between them."""
    manifest = link.manifest
    fd, st = _open_image(link.image)
    try:
        size = manifest.object.size
        report = VerifyReport(image=link.image, ok=False, object_size=size,
                              image_size=st.st_size, extents=len(manifest.extents))
        if st.st_size != size:
            how = "truncated" if st.st_size < size else "has extra bytes"
            report.problem = (f"image is {st.st_size} bytes but the object was {size}: "
                              f"the image {how}")
            return report, (st.st_dev, st.st_ino)
        buf = bytearray(IO_PIECE)
        for e in manifest.extents:
            report.bytes_checked += e.length
            if range_checksum(fd, e.offset, e.length, buf) != e.checksum:
                report.bad_extent_count += 1
                if len(report.bad_extents) < MAX_BAD_LISTED:
                    report.bad_extents.append(e.offset)
        report.nonzero_outside = nonzero_outside(fd, manifest.extents, size, buf,
                                                  MAX_BAD_LISTED)
        if report.bad_extents:
            first = report.bad_extents[0]
            length = next(e.length for e in manifest.extents if e.offset == first)
            more = report.bad_extent_count - 1
            report.problem = (f"checksum mismatch in extent at offset {first} (length {length})"
                              + (f", and {more} more bad extent(s)" if more else ""))
        elif report.nonzero_outside:
            report.problem = (f"nonzero byte at offset {report.nonzero_outside[0]}, outside "
                              "every extent (the image has zeros there)")
        report.ok = report.problem is None
        return report, (st.st_dev, st.st_ino)
    finally:
        os.close(fd)


class ChainSources:
    """The images of a verified chain, opened on demand (at most MAX_OPEN at once: a chain
    may have more links than a process may have files), each checked to be the file that was
    verified."""

    MAX_OPEN = 64

    def __init__(self, chain: list[Link], idents: list[Identity]):
        self.chain = chain
        self.idents = idents
        self._open: dict[int, int] = {}  # link index -> fd, least recently used first

    def __enter__(self) -> ChainSources:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def fd(self, index: int) -> int:
        fd = self._open.pop(index, None)
        if fd is None:
            if len(self._open) >= self.MAX_OPEN:
                os.close(self._open.pop(next(iter(self._open))))
            fd, st = _open_image(self.chain[index].image)
            if (st.st_dev, st.st_ino) != self.idents[index] or \
                    st.st_size != self.chain[index].manifest.object.size:
                os.close(fd)
                raise ImageError(f"{self.chain[index].image}: replaced while it was read; "
                                 "refusing")
        self._open[index] = fd
        return fd


def chain_pieces(chain: list[Link], sources: ChainSources, buf: bytearray,
                 align: int = 1) -> Iterator[tuple[int, memoryview]]:
    """The object's bytes at the chain's last T, as (offset, view of `buf`) pieces; what is
    not yielded is zeros. Holes of each image are skipped; with `align`, the regions read are
    widened to multiples of it (pages), never past the range a link supplies."""
    for start, end, index in segments(chain):
        fd = sources.fd(index)
        for a, b in _aligned(data_regions(fd, start, end), start, end, align):
            yield from pieces(fd, a, b, buf)


def _aligned(regions: Iterator[tuple[int, int]], start: int, end: int,
             align: int) -> Iterator[tuple[int, int]]:
    pending: tuple[int, int] | None = None
    for a, b in regions:
        a, b = max(start, a - a % align), min(end, -(-b // align) * align)
        if pending and a <= pending[1]:
            pending = (pending[0], max(pending[1], b))
            continue
        if pending:
            yield pending
        pending = (a, b)
    if pending:
        yield pending


def check_outside_chain(path: str, chain: list[Link]) -> None:
    """UserError if `path` is an image or a manifest of the chain (writing it would destroy
    what is being read)."""
    for i, link in enumerate(chain):
        for own, what in ((link.image, "image"), (manifest_path(link.image), "manifest")):
            try:
                same = os.path.samefile(path, own)
            except OSError:
                same = False
            if same and i == len(chain) - 1:
                raise UserError(f"{path} is the {what} itself; write to another file")
            if same:
                raise UserError(f"{path} is the {what} of {link.image}, a parent in the "
                                "chain; write to another file")


@dataclass
class RestoreReport:
    """What restore wrote."""

    image: str
    to: str
    size: int
    data_bytes: int  # nonzero bytes actually written; the rest is holes
    replaced: bool  # an existing file was overwritten in place (--force)
    links: int = 1  # images in the chain that was followed

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "to": self.to, "size": self.size,
                "data_bytes": self.data_bytes, "replaced": self.replaced, "links": self.links}


def restore(image_path: str, to: str, *, force: bool = False) -> RestoreReport:
    """Verify the image's whole chain, then write the object's exact bytes at its T to `to`,
    sparse, and fsync.

    A new `to` appears only when complete (temporary name, rename). An existing `to` is only
    replaced with `force`, and then in place (same inode, so /proc/PID/fd/N of a memfd works):
    it is emptied and resized to the object, so do not restore into memory processes are using.
    """
    dst_st = _restore_target(to, force)  # cheap refusals before a long verify
    chain = load_chain(image_path)
    check_outside_chain(to, chain)
    report, idents = verify_chain(chain)
    if not report.ok:
        raise CorruptImage(f"{image_path}: refusing to restore a corrupt image: {report.problem}")
    size = chain[-1].manifest.object.size
    tmp: str | None = None
    dst = -1
    try:
        with ChainSources(chain, idents) as sources:
            if dst_st is not None:
                dst = _open_in_place(to, dst_st)
            else:
                tmp, dst = create_temp(to)
            os.ftruncate(dst, size)
            data_bytes = 0
            buf = bytearray(IO_PIECE)
            for pos, piece in chain_pieces(chain, sources, buf):
                data_bytes += write_nonzero(dst, pos, buf, len(piece))
        os.fsync(dst)
        if tmp is not None:
            place(tmp, to, overwrite=False)
            tmp = None
            fsync_dir(os.path.dirname(os.path.abspath(to)))
        return RestoreReport(image=image_path, to=to, size=size, data_bytes=data_bytes,
                             replaced=dst_st is not None, links=len(chain))
    finally:
        if dst >= 0:
            os.close(dst)
        unlink_quiet(tmp)


def _open_in_place(to: str, dst_st: os.stat_result) -> int:
    """Open the existing `to` (never through a symlink), check it is still the file that was
    checked, and empty it: what is not written then reads as zero."""
    try:
        dst = os.open(to, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise UserError(f"{to}: cannot open for writing: {e.strerror or e}") from None
    now = os.fstat(dst)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (dst_st.st_dev,
                                                                     dst_st.st_ino):
        os.close(dst)
        raise UserError(f"{to}: replaced by something else meanwhile; refusing")
    os.ftruncate(dst, 0)
    return dst


def _restore_target(to: str, force: bool) -> os.stat_result | None:
    """stat of an existing `to` that may be overwritten, None if it does not exist; else refuse."""
    try:
        st = os.lstat(to)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{to}: {e.strerror or e}") from None
    if not force:
        raise UserError(f"{to} already exists (use --force to overwrite it)")
    check_replaceable(to)  # a regular file, not a link to one
    return st


def info(image_path: str) -> dict[str, Any]:
    """Summary of an image from its manifest, plus whether the image file is there and its
    size, and its chain (root first) as far as it can be followed (`chain_problem` says why
    not, if it cannot).

    Does not read the images' bytes (that is what verify is for).
    """
    links: list[Link] = []
    problem = None
    try:
        for link in walk_chain(image_path):
            links.append(link)
    except ImageError as e:
        if not links:
            raise
        problem = str(e)
    manifest = links[0].manifest
    try:
        st: os.stat_result | None = os.stat(image_path)
    except OSError:
        st = None
    d = manifest.to_dict()
    extents = d.pop("extents")
    d.update({
        "image": image_path,
        "manifest": manifest_path(image_path),
        "manifest_sha256": links[0].manifest_sha256,
        "kind": links[0].kind,
        "image_exists": st is not None,
        "image_size": st.st_size if st else None,
        "image_allocated": st.st_blocks * 512 if st else None,
        "extents": len(extents),
        "extent_bytes": manifest.extent_bytes,
        "chain": [link.to_dict() for link in reversed(links)],
        "chain_problem": problem,
    })
    return d
