"""Reading images: verify, restore and info, each trusting nothing it reads.

The manifest is loaded (and validated) by the format module; the image's bytes are read at most
IO_PIECE at a time, so memory stays bounded for objects of any size.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from uffdsnap.errors import UserError
from uffdsnap.image._files import (
    IO_PIECE,
    check_replaceable,
    create_temp,
    data_regions,
    fsync_dir,
    nonzero_outside,
    nonzero_runs,
    pieces,
    place,
    pwrite_all,
    range_checksum,
    unlink_quiet,
)
from uffdsnap.image._format import (
    MANIFEST_SUFFIX,
    CorruptImage,
    ImageError,
    Manifest,
    load_manifest,
    manifest_path,
)

MAX_BAD_LISTED = 1000  # verify counts every bad extent but lists at most this many offsets


def _open_image(image_path: str) -> tuple[Manifest, int, os.stat_result]:
    """Load the manifest of `image_path` and open the image read-only."""
    mpath = manifest_path(image_path)
    if not os.path.lexists(mpath):
        raise _no_manifest(image_path)
    manifest = load_manifest(mpath)
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
    return manifest, fd, st


def _no_manifest(image_path: str) -> ImageError:
    """The error for a path with no manifest beside it, with a hint at the likely mistake."""
    mpath = manifest_path(image_path)
    if image_path.endswith(MANIFEST_SUFFIX) and os.path.exists(image_path[:-5]):
        return ImageError(f"{image_path} is a manifest; pass the image, {image_path[:-5]}")
    if not os.path.lexists(image_path):
        return ImageError(f"{image_path}: no such image (and no manifest {mpath})")
    return ImageError(f"{image_path}: not a uffdsnap image: no manifest {mpath} beside it "
                      "(copy OUT.img.json along with OUT.img)")


@dataclass
class VerifyReport:
    """What verify found. `ok` only if size, every checksum, and every gap are right."""

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

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "ok": self.ok, "object_size": self.object_size,
                "image_size": self.image_size, "extents": self.extents,
                "bytes_checked": self.bytes_checked, "bad_extents": self.bad_extents,
                "bad_extent_count": self.bad_extent_count,
                "nonzero_outside": self.nonzero_outside, "problem": self.problem}


def verify(image_path: str) -> VerifyReport:
    """Check an image against its manifest, reading at most IO_PIECE bytes at a time.

    Raises ImageError when there is nothing sound to check (no/malformed manifest, no image);
    a readable image whose bytes disagree comes back as a report with ok=False.
    """
    manifest, fd, st = _open_image(image_path)
    try:
        size = manifest.object.size
        report = VerifyReport(image=image_path, ok=False, object_size=size,
                              image_size=st.st_size, extents=len(manifest.extents))
        if st.st_size != size:
            how = "truncated" if st.st_size < size else "has extra bytes"
            report.problem = (f"image is {st.st_size} bytes but the object was {size}: "
                              f"the image {how}")
            return report
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
                              "every extent (the object had zeros there)")
        report.ok = report.problem is None
        return report
    finally:
        os.close(fd)


@dataclass
class RestoreReport:
    """What restore wrote."""

    image: str
    to: str
    size: int
    data_bytes: int  # nonzero bytes actually written; the rest is holes
    replaced: bool  # an existing file was overwritten in place (--force)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "to": self.to, "size": self.size,
                "data_bytes": self.data_bytes, "replaced": self.replaced}


def restore(image_path: str, to: str, *, force: bool = False) -> RestoreReport:
    """Verify the image, then write its exact bytes to `to`, sparse, and fsync.

    A new `to` appears only when complete (temporary name, rename). An existing `to` is only
    replaced with `force`, and then in place (same inode, so /proc/PID/fd/N of a memfd works):
    it is emptied and resized to the object, so do not restore into memory processes are using.
    """
    dst_st = _restore_target(image_path, to, force)  # cheap refusals before a long verify
    report = verify(image_path)
    if not report.ok:
        raise CorruptImage(f"{image_path}: refusing to restore a corrupt image: {report.problem}")
    manifest, src, _ = _open_image(image_path)
    size = manifest.object.size
    tmp: str | None = None
    dst = -1
    try:
        if dst_st is not None:
            try:
                dst = os.open(to, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as e:
                raise UserError(f"{to}: cannot open for writing: {e.strerror or e}") from None
            now = os.fstat(dst)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (dst_st.st_dev,
                                                                             dst_st.st_ino):
                raise UserError(f"{to}: replaced by something else meanwhile; refusing")
            os.ftruncate(dst, 0)  # drop old contents: what is not written below reads as zero
        else:
            tmp, dst = create_temp(to)
        os.ftruncate(dst, size)
        data_bytes = 0
        buf = bytearray(IO_PIECE)
        for a, b in data_regions(src, 0, size):
            for pos, piece in pieces(src, a, b, buf):
                for x, y in nonzero_runs(buf, 0, len(piece)):
                    pwrite_all(dst, piece[x:y], pos + x)
                    data_bytes += y - x
        os.fsync(dst)
        if tmp is not None:
            place(tmp, to, overwrite=False)
            tmp = None
            fsync_dir(os.path.dirname(os.path.abspath(to)))
        return RestoreReport(image=image_path, to=to, size=size, data_bytes=data_bytes,
                             replaced=dst_st is not None)
    finally:
        os.close(src)
        if dst >= 0:
            os.close(dst)
        unlink_quiet(tmp)


def _restore_target(image_path: str, to: str, force: bool) -> os.stat_result | None:
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
    for own, what in ((image_path, "image"), (manifest_path(image_path), "manifest")):
        try:
            same = os.path.samefile(to, own)
        except OSError:
            same = False
        if same:
            raise UserError(f"{to} is the {what} itself; restore to another file")
    return st


def info(image_path: str) -> dict[str, Any]:
    """Summary of an image from its manifest, plus whether the image file is there and its size.

    Does not read the image's bytes (that is what verify is for).
    """
    mpath = manifest_path(image_path)
    if not os.path.lexists(mpath):
        raise _no_manifest(image_path)
    manifest = load_manifest(mpath)
    try:
        st: os.stat_result | None = os.stat(image_path)
    except OSError:
        st = None
    d = manifest.to_dict()
    extents = d.pop("extents")
    d.update({
        "image": image_path,
        "manifest": mpath,
        "image_exists": st is not None,
        "image_size": st.st_size if st else None,
        "image_allocated": st.st_blocks * 512 if st else None,
        "extents": len(extents),
        "extent_bytes": manifest.extent_bytes,
    })
    return d
