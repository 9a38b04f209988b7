"""ImageWriter: fill an image from any number of threads, then publish it atomically.

It knows files, not snapshots: the coordinator fills one from its scan and fault handling, and
any other producer of the same image (a receiver of a snapshot stream, a tool merging images) can
fill one the same way: write bytes, record extents with their checksums, publish with the fields
only the caller knows. The manifest's rules come from the format module.
"""

from __future__ import annotations

import hashlib
import os
import threading
from types import TracebackType
from typing import Any

from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.image._files import (
    IO_PIECE,
    create_temp,
    fsync_dir,
    nonzero_outside,
    nonzero_runs,
    place,
    pread_exact,
    pwrite_all,
    range_checksum,
    unlink_quiet,
)
from uffdsnap.image._format import (
    Extent,
    Manifest,
    build_manifest,
    check_extent,
    check_geometry,
    check_range,
    encode_manifest,
    extent_checksum,
    manifest_path,
)

COALESCE_LIMIT = 1 << 20  # publish merges touching small extents into extents up to this size


class ImageWriter:
    """Fill an image from several threads, then publish it atomically with its manifest.

    Thread-safe: `write` and `read` are a single pwrite/pread each on a shared fd (no file
    position), `record_extent` appends under a lock. Each object byte should be written once
    (a page is saved once, at its content at T): zero blocks are skipped to keep the image
    sparse, so writing zeros over earlier nonzero data would not clear it.
    Use as a context manager: leaving the block without `publish` removes every temporary file.
    """

    def __init__(self, path: str, size: int, page_size: int, *, overwrite: bool = False):
        check_geometry(size, page_size)
        self.path = path
        self.size = size
        self.page_size = page_size
        self.overwrite = overwrite
        self._lock = threading.Lock()
        self._extents: list[tuple[int, int, str]] = []
        self._state = "open"  # open -> published | aborted
        if "\0" in path:
            raise UserError(f"{path!r}: a file name cannot contain a NUL byte")
        if os.path.isdir(path):
            raise UserError(f"{path} is a directory; give the image a file name")
        for p in (path, manifest_path(path)):
            if not overwrite and os.path.lexists(p):
                raise UserError(f"{p} already exists; refusing to overwrite it")
        self._tmp: str | None
        self._tmp, self.fd = create_temp(path)
        self._manifest_tmp: str | None = None
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            self.abort()
            raise UserError(f"{path}: cannot size the image to {size} bytes: "
                            f"{e.strerror or e}") from None

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._state != "published":
            self.abort()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store object bytes at `offset` (page-aligned); all-zero blocks are left as holes.
        (The coordinator writes through its native core by the same rule, snapcore.c `store`,
        into `fd`; this is for writers in Python.)

        Stop every writing thread before publish/abort: after abort the fd number is closed and
        may be reused by another file.
        """
        if self._state != "open":
            raise ValueError(f"image writer is {self._state}")
        buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        check_range(offset, len(buf), self.size, self.page_size)
        mv = memoryview(buf)
        try:
            for a, b in nonzero_runs(buf, 0, len(buf)):
                pwrite_all(self.fd, mv[a:b], offset + a)
        except OSError as e:
            raise OSError(e.errno, f"writing image {self.path} at offset {offset}: "
                          f"{e.strerror or e}") from None

    def record_extent(self, offset: int, length: int, checksum: str) -> None:
        """Note that [offset, offset+length) was saved with `checksum` (of extent_checksum)."""
        check_extent(offset, length, checksum, self.size, self.page_size)
        with self._lock:
            if self._state != "open":
                raise ValueError(f"image writer is {self._state}")
            self._extents.append((offset, length, checksum))

    def publish(self, manifest_fields: dict[str, Any]) -> Manifest:
        """Finish: merge extents, fsync, write the manifest, then give both their final names.

        `manifest_fields` carries what only the caller knows:
          object: {source: str, kind: str, dev: int|None, inode: int|None}
          snapshot_time: T in Unix nanoseconds (int, or {"unix_ns": int})
          processes: list of {pid, comm, mode, mappings, ...}   (optional, default [])
          stats: dict of JSON values                             (optional, default {})
          parent: {image, manifest_sha256, snapshot_unix_ns} or a ParentRef (optional):
                  makes this a delta (format_version 2) of that image, whose manifest
                  hashes to manifest_sha256 (image.manifest_sha256); bytes outside every
                  extent then mean "as in the parent", so record zero ranges saved too
        Raises SnapshotFailed if the image does not hold what was recorded (a page saved twice
        with different contents, or data outside every extent); nothing is published then.
        """
        raw = self._begin_publishing()
        try:
            manifest, text = self._finish(manifest_fields, raw)
            self._place(text)
        except BaseException:
            with self._lock:
                self._state = "open"
            self.abort()
            raise
        with self._lock:
            self._state = "published"
        self._close()
        return manifest

    def _place(self, text: bytes) -> None:
        """Write the manifest `text`, then give manifest and image their final names."""
        self._manifest_tmp, mfd = create_temp(manifest_path(self.path))
        try:
            pwrite_all(mfd, memoryview(text), 0)
            os.fsync(mfd)
        finally:
            os.close(mfd)
        final_manifest = manifest_path(self.path)
        place(self._manifest_tmp, final_manifest, self.overwrite)
        self._manifest_tmp = None
        try:
            assert self._tmp is not None
            place(self._tmp, self.path, self.overwrite)
        except BaseException:
            unlink_quiet(final_manifest)  # it describes an image that never appeared
            raise
        self._tmp = None
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def _close(self) -> None:
        os.close(self.fd)

    def _begin_publishing(self) -> list[tuple[int, int, str]]:
        """From now on no more writes: the extents recorded."""
        with self._lock:
            if self._state != "open":
                raise ValueError(f"image writer is {self._state}")
            self._state = "publishing"
            return sorted(self._extents)

    def _finish(self, manifest_fields: dict[str, Any],
                raw: list[tuple[int, int, str]]) -> tuple[Manifest, bytes]:
        """Publishing's first half: the manifest (and its file's bytes, whose sha256 is kept
        in `manifest_sha256`) over a durable image."""
        manifest = self._build_manifest(manifest_fields, self._normalize(raw))
        text = encode_manifest(manifest)
        os.fsync(self.fd)
        self.manifest_sha256 = hashlib.sha256(text).hexdigest()
        return manifest, text

    def abort(self) -> None:
        """Remove the temporary files; an existing image under the final name is never touched."""
        with self._lock:
            if self._state in ("published", "aborted"):
                return
            self._state = "aborted"
        try:
            os.close(self.fd)
        except OSError:
            pass
        unlink_quiet(self._tmp)
        unlink_quiet(self._manifest_tmp)
        self._tmp = self._manifest_tmp = None

    def _normalize(self, raw: list[tuple[int, int, str]]) -> list[Extent]:
        """Sorted, disjoint extents: overlaps are collapsed, runs of small touching ones merged.

        Whenever recorded checksums are replaced by one over a merged range, each recorded one
        is first checked against the image, so the manifest still vouches for what was copied.
        """
        buf = bytearray(IO_PIECE)
        # 1. collapse duplicates and overlaps into their union
        clusters: list[tuple[int, list[tuple[int, int, str]]]] = []  # (end, members)
        for rec in raw:
            if clusters and rec[0] < clusters[-1][0]:
                end, members = clusters[-1]
                members.append(rec)
                clusters[-1] = (max(end, rec[0] + rec[1]), members)
            else:
                clusters.append((rec[0] + rec[1], [rec]))
        disjoint: list[Extent] = []
        for end, members in clusters:
            if len(set(members)) == 1:
                disjoint.append(Extent(*members[0]))
                continue
            for off, length, checksum in sorted(set(members)):
                if range_checksum(self.fd, off, length, buf) != checksum:
                    raise SnapshotFailed(
                        f"offset {off} (length {length}) was saved more than once with "
                        "different contents; the snapshot is not consistent")
            start = members[0][0]
            disjoint.append(Extent(start, end - start,
                                   range_checksum(self.fd, start, end - start, buf)))
        # 2. merge runs of touching small extents (single-page faults) up to COALESCE_LIMIT
        out: list[Extent] = []
        run: list[Extent] = []

        def flush() -> None:
            if len(run) > 1:
                out.append(self._merge_run(run, buf))
            else:
                out.extend(run)
            run.clear()

        for e in disjoint:
            small = e.length < COALESCE_LIMIT
            if (run and small and e.offset == run[-1].end
                    and e.end - run[0].offset <= COALESCE_LIMIT):
                run.append(e)
                continue
            flush()
            if small:
                run.append(e)
            else:
                out.append(e)
        flush()
        return out

    def _merge_run(self, run: list[Extent], buf: bytearray) -> Extent:
        start, end = run[0].offset, run[-1].end
        data = memoryview(buf)[: end - start]  # end - start <= COALESCE_LIMIT <= IO_PIECE
        pread_exact(self.fd, data, start)
        for e in run:
            if extent_checksum(data[e.offset - start: e.end - start]) != e.checksum:
                raise SnapshotFailed(f"image bytes at offset {e.offset} (length {e.length}) "
                                     "changed after they were saved; not publishing")
        return Extent(start, end - start, extent_checksum(data))

    def _build_manifest(self, fields: dict[str, Any], extents: list[Extent]) -> Manifest:
        """The format's manifest for these extents, once the image is known to hold nothing
        outside them (a reader's verify would fail on such bytes)."""
        manifest = build_manifest(fields, self.size, self.page_size, extents)
        bad = nonzero_outside(self.fd, manifest.extents, self.size, bytearray(IO_PIECE), 1)
        if bad:
            raise SnapshotFailed(f"the image has data at offset {bad[0]} outside every recorded "
                                 "extent; not publishing")
        return manifest
