"""The image sink: a raw, sparse copy of the object at instant T, plus a JSON manifest beside it.

`OUT.img` holds byte X of the object at file offset X; `OUT.img.json` says what was saved
(extents with xxh3 checksums), when (T), from whom (processes) and how (stats). Both appear under
their final names only once complete, so a reader that sees `OUT.img` may trust it is whole.
Everything that reads or writes that pair lives here: the writer the coordinator fills, the
manifest validator (which treats every manifest as hostile), verify, restore and info.
The format is documented field by field in docs/image-format.md.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import xxhash

from uffdsnap import __version__
from uffdsnap.errors import SnapshotFailed, UserError

FORMAT = "uffdsnap-image"
FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".json"
CHECKSUM_ALGO = "xxh3_64"

IO_PIECE = 4 << 20  # largest read verify/restore/publish ever hold in memory at once
ZERO_BLOCK = 4096  # granularity of sparseness: all-zero blocks of this size are never written
COALESCE_LIMIT = 1 << 20  # publish merges touching small extents into extents up to this size
MAX_MANIFEST_BYTES = 256 << 20  # ~3.5 M extents; larger files are refused before parsing
MAX_PROCESSES = 1 << 16
MAX_OFFSET = (1 << 63) - 1  # off_t
MAX_UNIX_NS = 253402300800 * 10**9  # year 10000: what ISO 8601 (and datetime) can express
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 30
MAX_BAD_LISTED = 1000  # verify counts every bad extent but lists at most this many offsets

_ZEROS = bytes(ZERO_BLOCK)
_CHECKSUM_RE = re.compile(r"xxh3_64:[0-9a-f]{16}")
_PRINTABLE_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f]*")  # no control characters (terminal safety)


class ImageError(UserError):
    """An image or manifest that cannot be read or trusted: missing, malformed, hostile."""


class CorruptImage(ImageError):
    """A well-formed image whose bytes do not match its manifest (exit 1, like a failed verify)."""

    exit_code = 1


def manifest_path(image_path: str) -> str:
    """Where the manifest of `image_path` lives: right beside it, `OUT.img.json`."""
    return image_path + MANIFEST_SUFFIX


def extent_checksum(data: bytes | bytearray | memoryview) -> str:
    """Checksum of one extent's bytes as written in the manifest: "xxh3_64:<16 hex digits>"."""
    return f"{CHECKSUM_ALGO}:{xxhash.xxh3_64_hexdigest(data)}"


def iso8601_utc(unix_ns: int) -> str:
    """T as an ISO 8601 UTC string with nanoseconds, e.g. 2025-01-02T03:04:05.000000123Z."""
    secs, ns = divmod(unix_ns, 10**9)
    dt = datetime.datetime.fromtimestamp(secs, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class Extent:
    """A byte range of the image that was saved, with the checksum of its bytes."""

    offset: int
    length: int
    checksum: str

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "checksum": self.checksum}


@dataclass(frozen=True)
class ObjectInfo:
    """The shared-memory object the image is a copy of."""

    size: int
    page_size: int
    source: str
    kind: str
    dev: int | None = None
    inode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "page_size": self.page_size, "source": self.source,
                "kind": self.kind, "dev": self.dev, "inode": self.inode}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Build one only through `from_dict` / `load_manifest`."""

    object: ObjectInfo
    snapshot_unix_ns: int
    processes: tuple[dict[str, Any], ...]
    extents: tuple[Extent, ...]
    stats: dict[str, Any]
    created_by_tool: str
    created_by_version: str
    format_version: int = FORMAT_VERSION

    @property
    def snapshot_iso8601(self) -> str:
        return iso8601_utc(self.snapshot_unix_ns)

    @property
    def extent_bytes(self) -> int:
        return sum(e.length for e in self.extents)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "created_by": {"tool": self.created_by_tool, "version": self.created_by_version},
            "object": self.object.to_dict(),
            "snapshot_time": {"unix_ns": self.snapshot_unix_ns,
                              "iso8601": self.snapshot_iso8601},
            "processes": [dict(p) for p in self.processes],
            "stats": dict(self.stats),
            "extents": [e.to_dict() for e in self.extents],
        }

    def to_json(self) -> str:
        """The manifest file's text: readable at the top, one extent per line below."""
        d = self.to_dict()
        extents = d.pop("extents")
        lines = ["{"]
        for key, value in d.items():
            lines.append(f"  {json.dumps(key)}: {_dumps(value)},")
        lines.append('  "extents": [')
        lines.extend(f"    {_dumps(e)}," for e in extents)
        if extents:
            lines[-1] = lines[-1].rstrip(",")
        lines.append("  ]")
        lines.append("}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        """Validate every field of a parsed manifest; raise ImageError (one line) on any flaw."""
        top = _fields(d, where, required={"format", "format_version", "created_by", "object",
                                          "snapshot_time", "processes", "stats", "extents"})
        if top["format"] != FORMAT:
            raise ImageError(f"{where}: not a uffdsnap image manifest "
                             f"(format is {_show(top['format'])}, expected {FORMAT!r})")
        version = top["format_version"]
        if type(version) is not int or version != FORMAT_VERSION:
            raise ImageError(f"{where}: unsupported format_version {_show(version)} "
                             f"(this uffdsnap reads version {FORMAT_VERSION})")
        created = _fields(top["created_by"], f"{where}: created_by", required={"tool", "version"})
        tool = _text(created["tool"], f"{where}: created_by.tool", 64)
        tool_version = _text(created["version"], f"{where}: created_by.version", 64)

        obj = _fields(top["object"], f"{where}: object",
                      required={"size", "page_size", "source", "kind", "dev", "inode"})
        size = _int(obj["size"], f"{where}: object.size", 0, MAX_OFFSET)
        page_size = _int(obj["page_size"], f"{where}: object.page_size",
                         MIN_PAGE_SIZE, MAX_PAGE_SIZE)
        if page_size & (page_size - 1):
            raise ImageError(f"{where}: object.page_size {page_size} is not a power of two")
        info = ObjectInfo(
            size=size, page_size=page_size,
            source=_text(obj["source"], f"{where}: object.source", 4096),
            kind=_text(obj["kind"], f"{where}: object.kind", 64),
            dev=_opt_int(obj["dev"], f"{where}: object.dev", 0, (1 << 64) - 1),
            inode=_opt_int(obj["inode"], f"{where}: object.inode", 0, (1 << 64) - 1),
        )

        snap = _fields(top["snapshot_time"], f"{where}: snapshot_time",
                       required={"unix_ns", "iso8601"})
        unix_ns = _int(snap["unix_ns"], f"{where}: snapshot_time.unix_ns", 0, MAX_UNIX_NS - 1)
        iso = _text(snap["iso8601"], f"{where}: snapshot_time.iso8601", 64)
        if iso != iso8601_utc(unix_ns):
            raise ImageError(f"{where}: snapshot_time.iso8601 {iso!r} does not match unix_ns "
                             f"{unix_ns} ({iso8601_utc(unix_ns)})")

        procs = top["processes"]
        if type(procs) is not list or len(procs) > MAX_PROCESSES:
            raise ImageError(f"{where}: processes must be a list of at most {MAX_PROCESSES}")
        processes = tuple(_process(p, f"{where}: processes[{i}]") for i, p in enumerate(procs))

        stats = top["stats"]
        if type(stats) is not dict:
            raise ImageError(f"{where}: stats must be an object, not {_kind(stats)}")

        raw_extents = top["extents"]
        if type(raw_extents) is not list:
            raise ImageError(f"{where}: extents must be a list, not {_kind(raw_extents)}")
        extents = _extents(raw_extents, size, page_size, where)
        return cls(object=info, snapshot_unix_ns=unix_ns, processes=processes,
                   extents=extents, stats=stats, created_by_tool=tool,
                   created_by_version=tool_version, format_version=version)


def load_manifest(path: str) -> Manifest:
    """Read and validate the manifest file at `path`; ImageError (one line) if it is not sound."""
    try:
        # O_NONBLOCK: a FIFO planted as the manifest must not hang us (no effect on files)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageError(f"{path}: not a regular file")
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such manifest") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a manifest") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read manifest: {e.strerror or e}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ImageError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_no_dup_keys)
    except UnicodeDecodeError:
        raise ImageError(f"{path}: not a manifest (not UTF-8 text)") from None
    except RecursionError:
        raise ImageError(f"{path}: not a manifest (JSON nested too deeply)") from None
    except ValueError as e:
        raise ImageError(f"{path}: not a manifest (invalid JSON: {_one_line(str(e))})") from None
    return Manifest.from_dict(data, where=path)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=True)  # keeps our field order


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is too large")
    return value


def _no_dup_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Duplicate keys are ambiguous (readers disagree on which wins): refuse them."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return d


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A hostile value, shown safely in one short line."""
    return _one_line(repr(value), 60)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value), "?")


def _fields(d: Any, where: str, required: set[str], extra_ok: bool = False) -> dict[str, Any]:
    if type(d) is not dict:
        raise ImageError(f"{where} must be an object, not {_kind(d)}")
    missing = sorted(required - d.keys())
    if missing:
        raise ImageError(f"{where}: missing field {missing[0]!r}")
    if not extra_ok:
        unknown = sorted(d.keys() - required)
        if unknown:
            raise ImageError(f"{where}: unknown field {_show(unknown[0])}")
    return d


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if type(v) is not int:  # bool is an int subclass, floats are not offsets: both rejected
        raise ImageError(f"{where} must be an integer, not {_kind(v)}")
    if not lo <= v <= hi:
        raise ImageError(f"{where} = {_show(v)} is out of range [{lo}, {hi}]")
    return v


def _opt_int(v: Any, where: str, lo: int, hi: int) -> int | None:
    return None if v is None else _int(v, where, lo, hi)


def _text(v: Any, where: str, max_len: int) -> str:
    if type(v) is not str:
        raise ImageError(f"{where} must be a string, not {_kind(v)}")
    if len(v) > max_len:
        raise ImageError(f"{where} is longer than {max_len} characters")
    if not _PRINTABLE_RE.fullmatch(v):
        raise ImageError(f"{where} contains control characters")
    return v


def _process(value: Any, where: str) -> dict[str, Any]:
    p = _fields(value, where, required={"pid", "comm", "mode", "mappings"}, extra_ok=True)
    _int(p["pid"], f"{where}.pid", 1, (1 << 31) - 1)
    _text(p["comm"], f"{where}.comm", 256)
    _text(p["mode"], f"{where}.mode", 64)
    _int(p["mappings"], f"{where}.mappings", 0, (1 << 31) - 1)
    return p


def _extents(raw: list[Any], size: int, page_size: int, where: str) -> tuple[Extent, ...]:
    out: list[Extent] = []
    prev_end = 0
    for i, e in enumerate(raw):
        w = f"{where}: extents[{i}]"
        _fields(e, w, required={"offset", "length", "checksum"})
        off = _int(e["offset"], f"{w}.offset", 0, MAX_OFFSET)
        length = _int(e["length"], f"{w}.length", 1, MAX_OFFSET)
        checksum = e["checksum"]
        if type(checksum) is not str or not _CHECKSUM_RE.fullmatch(checksum):
            raise ImageError(f"{w}.checksum must look like 'xxh3_64:<16 hex digits>', "
                             f"not {_show(checksum)}")
        end = off + length
        if end > size:
            raise ImageError(f"{w} (offset {off}, length {length}) runs past the object's end "
                             f"({size})")
        if off % page_size:
            raise ImageError(f"{w}.offset {off} is not a multiple of the page size {page_size}")
        if length % page_size and end != size:
            raise ImageError(f"{w}.length {length} is not a multiple of the page size "
                             f"{page_size} (only the object's last extent may be partial)")
        if off < prev_end:
            raise ImageError(f"{w} (offset {off}) overlaps or precedes the previous extent "
                             f"(which ends at {prev_end}); extents must be sorted and disjoint")
        out.append(Extent(off, length, checksum))
        prev_end = end
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Low-level I/O shared by writer, verify and restore


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data = data[n:]
        offset += n


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`; the file is known to be long enough, so EOF means truncation."""
    while view:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise ImageError(f"image ended early at offset {offset} (truncated while reading?)")
        view = view[n:]
        offset += n


def _pieces(fd: int, start: int, end: int, buf: bytearray) -> Iterator[tuple[int, memoryview]]:
    """Read [start, end) through `buf` in pieces; each yielded view is valid until the next."""
    mv = memoryview(buf)
    pos = start
    while pos < end:
        n = min(len(buf), end - pos)
        _pread_exact(fd, mv[:n], pos)
        yield pos, mv[:n]
        pos += n


def _data_regions(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Ranges within [start, end) that may hold data; holes are skipped with SEEK_DATA/HOLE."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here to EOF
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _nonzero_runs(buf: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) within buf[start:end] made of blocks that are not all zero."""
    run_start = -1
    for i in range(start, end, ZERO_BLOCK):
        n = min(ZERO_BLOCK, end - i)
        zero = buf.startswith(_ZEROS if n == ZERO_BLOCK else _ZEROS[:n], i, i + n)
        if zero and run_start >= 0:
            yield run_start, i
            run_start = -1
        elif not zero and run_start < 0:
            run_start = i
    if run_start >= 0:
        yield run_start, end


def _first_nonzero(buf: bytes | bytearray, start: int, end: int) -> int | None:
    """Index of the first nonzero byte in buf[start:end], or None."""
    for a, b in _nonzero_runs(buf, start, end):
        block = bytes(buf[a:min(b, a + ZERO_BLOCK)])
        return a + len(block) - len(block.lstrip(b"\0"))
    return None


def _range_checksum(fd: int, offset: int, length: int, buf: bytearray) -> str:
    h = xxhash.xxh3_64()
    for _, piece in _pieces(fd, offset, offset + length, buf):
        h.update(piece)
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"


def _nonzero_outside(fd: int, extents: tuple[Extent, ...] | list[Extent], size: int,
                     buf: bytearray, limit: int) -> list[int]:
    """First nonzero byte of each gap between extents that has one (at most `limit` of them).

    Gaps are where the object had holes; the writer never writes zeros, so they are holes in the
    image too and cost one lseek each.
    """
    found: list[int] = []
    pos = 0
    for start, end in [(e.offset, e.end) for e in extents] + [(size, size)]:
        if start > pos:  # the gap [pos, start)
            for a, b in _data_regions(fd, pos, start):
                hit = _first_nonzero_in_file(fd, a, b, buf)
                if hit is not None:
                    found.append(hit)
                    break
            if len(found) >= limit:
                break
        pos = end
    return found


def _first_nonzero_in_file(fd: int, start: int, end: int, buf: bytearray) -> int | None:
    for pos, piece in _pieces(fd, start, end, buf):
        hit = _first_nonzero(buf, 0, len(piece))
        if hit is not None:
            return pos + hit
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(final: str, mode: int = 0o600) -> tuple[str, int]:
    """Create `.NAME.<random>.tmp` beside `final` with O_EXCL; UserError if that is impossible."""
    directory, name = os.path.split(os.path.abspath(final))
    for _ in range(16):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise UserError(f"{final}: directory {directory} does not exist") from None
        except PermissionError:
            raise UserError(f"{final}: cannot create files in {directory}: permission denied"
                            ) from None
        except OSError as e:
            raise UserError(f"{final}: cannot create a file in {directory}: "
                            f"{e.strerror or e}") from None
    raise UserError(f"{final}: could not find a free temporary name in {directory}")


def _place(tmp: str, final: str, overwrite: bool) -> None:
    """Give `tmp` its final name; without `overwrite`, never replace a file that exists."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic no-clobber, unlike a check followed by rename
    except FileExistsError:
        raise UserError(f"{final} already exists; refusing to overwrite it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(final):  # file system without hard links: best effort
            raise UserError(f"{final} already exists; refusing to overwrite it") from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def _unlink_quiet(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# Writer


class ImageWriter:
    """Fill an image from several threads, then publish it atomically with its manifest.

    Thread-safe: `write` and `read` are a single pwrite/pread each on a shared fd (no file
    position), `record_extent` appends under a lock. Each object byte should be written once
    (a page is saved once, at its content at T): zero blocks are skipped to keep the image
    sparse, so writing zeros over earlier nonzero data would not clear it.
    Use as a context manager: leaving the block without `publish` removes every temporary file.
    """

    def __init__(self, path: str, size: int, page_size: int, *, overwrite: bool = False):
        if type(size) is not int or not 0 <= size <= MAX_OFFSET:
            raise ValueError(f"size must be an integer in [0, {MAX_OFFSET}], not {size!r}")
        if (type(page_size) is not int or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
                or page_size & (page_size - 1)):
            raise ValueError(f"page_size must be a power of two in [{MIN_PAGE_SIZE}, "
                             f"{MAX_PAGE_SIZE}], not {page_size!r}")
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
        self._tmp, self.fd = _create_temp(path)
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

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset % self.page_size or offset + length > self.size:
            raise ValueError(f"range [{offset}, +{length}) is not page-aligned inside the "
                             f"object (size {self.size}, page size {self.page_size})")

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
        self._check_range(offset, len(buf))
        mv = memoryview(buf)
        try:
            for a, b in _nonzero_runs(buf, 0, len(buf)):
                _pwrite_all(self.fd, mv[a:b], offset + a)
        except OSError as e:
            raise OSError(e.errno, f"writing image {self.path} at offset {offset}: "
                          f"{e.strerror or e}") from None

    def record_extent(self, offset: int, length: int, checksum: str) -> None:
        """Note that [offset, offset+length) was saved with `checksum` (of extent_checksum)."""
        self._check_range(offset, length)
        if length <= 0 or (length % self.page_size and offset + length != self.size):
            raise ValueError(f"extent length {length} must be whole pages (or reach the end)")
        if not _CHECKSUM_RE.fullmatch(checksum):
            raise ValueError(f"checksum {checksum!r} is not from extent_checksum()")
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
        Raises SnapshotFailed if the image does not hold what was recorded (a page saved twice
        with different contents, or data outside every extent); nothing is published then.
        """
        with self._lock:
            if self._state != "open":
                raise ValueError(f"image writer is {self._state}")
            self._state = "publishing"
            raw = sorted(self._extents)
        try:
            manifest = self._build_manifest(manifest_fields, self._normalize(raw))
            text = manifest.to_json().encode("ascii")
            if len(text) > MAX_MANIFEST_BYTES:  # never publish what load_manifest refuses
                raise SnapshotFailed(f"manifest would be {len(text) >> 20} MiB, over the "
                                     f"{MAX_MANIFEST_BYTES >> 20} MiB limit readers accept")
            os.fsync(self.fd)
            self._manifest_tmp, mfd = _create_temp(manifest_path(self.path))
            try:
                _pwrite_all(mfd, memoryview(text), 0)
                os.fsync(mfd)
            finally:
                os.close(mfd)
            final_manifest = manifest_path(self.path)
            _place(self._manifest_tmp, final_manifest, self.overwrite)
            self._manifest_tmp = None
            try:
                assert self._tmp is not None
                _place(self._tmp, self.path, self.overwrite)
            except BaseException:
                _unlink_quiet(final_manifest)  # it describes an image that never appeared
                raise
            self._tmp = None
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            with self._lock:
                self._state = "open"
            self.abort()
            raise
        with self._lock:
            self._state = "published"
        os.close(self.fd)
        return manifest

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
        _unlink_quiet(self._tmp)
        _unlink_quiet(self._manifest_tmp)
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
                if _range_checksum(self.fd, off, length, buf) != checksum:
                    raise SnapshotFailed(
                        f"offset {off} (length {length}) was saved more than once with "
                        "different contents; the snapshot is not consistent")
            start = members[0][0]
            disjoint.append(Extent(start, end - start,
                                   _range_checksum(self.fd, start, end - start, buf)))
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
        _pread_exact(self.fd, data, start)
        for e in run:
            if extent_checksum(data[e.offset - start: e.end - start]) != e.checksum:
                raise SnapshotFailed(f"image bytes at offset {e.offset} (length {e.length}) "
                                     "changed after they were saved; not publishing")
        return Extent(start, end - start, extent_checksum(data))

    def _build_manifest(self, fields: dict[str, Any], extents: list[Extent]) -> Manifest:
        """Caller's fields + ours, validated exactly as load_manifest will validate the file."""
        unknown = sorted(fields.keys() - {"object", "snapshot_time", "processes", "stats"})
        if unknown:
            raise ValueError(f"publish: unknown manifest field {unknown[0]!r}")
        try:
            obj = dict(fields.get("object") or {})
            for key, mine in (("size", self.size), ("page_size", self.page_size)):
                if obj.setdefault(key, mine) != mine:
                    raise ValueError(f"object.{key} {obj[key]!r} != the writer's {mine}")
            obj.setdefault("dev", None)
            obj.setdefault("inode", None)
            when = fields.get("snapshot_time")
            unix_ns = when.get("unix_ns") if isinstance(when, dict) else when
            iso = iso8601_utc(unix_ns) if type(unix_ns) is int and unix_ns >= 0 else None
            d = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "created_by": {"tool": "uffdsnap", "version": __version__},
                "object": obj,
                "snapshot_time": {"unix_ns": unix_ns, "iso8601": iso},
                "processes": [dict(p) for p in fields.get("processes", [])],
                "stats": dict(fields.get("stats", {})),
                "extents": [e.to_dict() for e in extents],
            }
            # round-trip through JSON so publish can never write what load_manifest refuses
            data = json.loads(_dumps(d), object_pairs_hook=_no_dup_keys)
            manifest = Manifest.from_dict(data, where="publish")
        except (ImageError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"publish: invalid manifest fields: {e}") from None
        bad = _nonzero_outside(self.fd, manifest.extents, self.size, bytearray(IO_PIECE), 1)
        if bad:
            raise SnapshotFailed(f"the image has data at offset {bad[0]} outside every recorded "
                                 "extent; not publishing")
        return manifest


# --------------------------------------------------------------------------------------------
# Reading images: verify, restore, info


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
            if _range_checksum(fd, e.offset, e.length, buf) != e.checksum:
                report.bad_extent_count += 1
                if len(report.bad_extents) < MAX_BAD_LISTED:
                    report.bad_extents.append(e.offset)
        report.nonzero_outside = _nonzero_outside(fd, manifest.extents, size, buf,
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
                dst = os.open(to, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise UserError(f"{to}: cannot open for writing: {e.strerror or e}") from None
            if not stat.S_ISREG(os.fstat(dst).st_mode):
                raise UserError(f"{to}: not a regular file")
            os.ftruncate(dst, 0)  # drop old contents: what is not written below reads as zero
        else:
            tmp, dst = _create_temp(to)
        os.ftruncate(dst, size)
        data_bytes = 0
        buf = bytearray(IO_PIECE)
        for a, b in _data_regions(src, 0, size):
            for pos, piece in _pieces(src, a, b, buf):
                for x, y in _nonzero_runs(buf, 0, len(piece)):
                    _pwrite_all(dst, piece[x:y], pos + x)
                    data_bytes += y - x
        os.fsync(dst)
        if tmp is not None:
            _place(tmp, to, overwrite=False)
            tmp = None
            _fsync_dir(os.path.dirname(os.path.abspath(to)))
        return RestoreReport(image=image_path, to=to, size=size, data_bytes=data_bytes,
                             replaced=dst_st is not None)
    finally:
        os.close(src)
        if dst >= 0:
            os.close(dst)
        _unlink_quiet(tmp)


def _restore_target(image_path: str, to: str, force: bool) -> os.stat_result | None:
    """stat of an existing `to` that may be overwritten, None if it does not exist; else refuse."""
    try:
        st = os.stat(to)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{to}: {e.strerror or e}") from None
    if not force:
        raise UserError(f"{to} already exists (use --force to overwrite it)")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{to}: not a regular file")
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
