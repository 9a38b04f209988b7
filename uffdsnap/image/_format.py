"""The manifest: what an image holds, and the one place its rules live.

Readers, the writer, and any future producer of images (a receiver of a snapshot stream, a delta
against a parent) build, encode and check manifests only through this module, so a file one of
them writes is always a file the others accept. Every manifest read is treated as hostile: each
field is checked for type, range and consistency, and a flaw is one line of ImageError. No file
I/O beyond reading the manifest itself. The fields are documented in docs/image-format.md.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import xxhash

from uffdsnap import __version__
from uffdsnap.errors import SnapshotFailed, UserError

FORMAT = "uffdsnap-image"
FORMAT_VERSION = 1  # a full image: bytes outside every extent are zeros
DELTA_FORMAT_VERSION = 2  # a delta: bytes outside every extent are the parent's (see ParentRef)
MANIFEST_SUFFIX = ".json"
CHECKSUM_ALGO = "xxh3_64"

MAX_MANIFEST_BYTES = 256 << 20  # ~3.5 M extents; larger files are refused before parsing
MAX_PROCESSES = 1 << 16
MAX_OFFSET = (1 << 63) - 1  # off_t
MAX_UNIX_NS = 253402300800 * 10**9  # year 10000: what ISO 8601 (and datetime) can express
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 30

_CHECKSUM_RE = re.compile(r"xxh3_64:[0-9a-f]{16}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
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


class ExtentHash:
    """extent_checksum of bytes that arrive in pieces (read through a buffer, or off a stream)."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def checksum(self) -> str:
        return f"{CHECKSUM_ALGO}:{self._h.hexdigest()}"


def iso8601_utc(unix_ns: int) -> str:
    """T as an ISO 8601 UTC string with nanoseconds, e.g. 2025-01-02T03:04:05.000000123Z."""
    secs, ns = divmod(unix_ns, 10**9)
    dt = datetime.datetime.fromtimestamp(secs, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"



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
class ParentRef:
    """A delta's parent: the image it applies to, named as its producer gave it (a relative
    path is relative to the delta's own directory), the sha256 of that image's manifest file
    bytes, and the parent's T (earlier than the delta's)."""

    image: str
    manifest_sha256: str
    snapshot_unix_ns: int

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "manifest_sha256": self.manifest_sha256,
                "snapshot_unix_ns": self.snapshot_unix_ns}


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
    parent: ParentRef | None = None  # set exactly when format_version is DELTA_FORMAT_VERSION

    @property
    def is_delta(self) -> bool:
        return self.parent is not None

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
            **({"parent": self.parent.to_dict()} if self.parent else {}),
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
        version = _version(d, where)
        top = _fields(d, where, required={"format", "format_version", "created_by", "object",
                                          "snapshot_time", "processes", "stats", "extents"}
                      | ({"parent"} if version == DELTA_FORMAT_VERSION else set()))
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

        parent = _parent(top["parent"], unix_ns, where) if "parent" in top else None

        raw_extents = top["extents"]
        if type(raw_extents) is not list:
            raise ImageError(f"{where}: extents must be a list, not {_kind(raw_extents)}")
        extents = _extents(raw_extents, size, page_size, where)
        return cls(object=info, snapshot_unix_ns=unix_ns, processes=processes,
                   extents=extents, stats=stats, created_by_tool=tool,
                   created_by_version=tool_version, format_version=version, parent=parent)


def _version(d: Any, where: str) -> int:
    """The manifest's format_version, once it is known to be ours and one we read; a version 1
    manifest naming a parent is refused here (an old reader would take the delta as full)."""
    top = _fields(d, where, required={"format", "format_version"}, extra_ok=True)
    if top["format"] != FORMAT:
        raise ImageError(f"{where}: not a uffdsnap image manifest "
                         f"(format is {_show(top['format'])}, expected {FORMAT!r})")
    version = top["format_version"]
    if type(version) is not int or version not in (FORMAT_VERSION, DELTA_FORMAT_VERSION):
        raise ImageError(f"{where}: unsupported format_version {_show(version)} "
                         f"(this uffdsnap reads versions {FORMAT_VERSION} and "
                         f"{DELTA_FORMAT_VERSION})")
    if version == FORMAT_VERSION and "parent" in d:
        raise ImageError(f"{where}: a format_version {FORMAT_VERSION} (full) image cannot name "
                         f"a parent; deltas are version {DELTA_FORMAT_VERSION}")
    return version


def _parent(value: Any, unix_ns: int, where: str) -> ParentRef:
    p = _fields(value, f"{where}: parent", required={"image", "manifest_sha256",
                                                      "snapshot_unix_ns"})
    image = _text(p["image"], f"{where}: parent.image", 4096)
    if not image:
        raise ImageError(f"{where}: parent.image is empty")
    digest = p["manifest_sha256"]
    if type(digest) is not str or not _SHA256_RE.fullmatch(digest):
        raise ImageError(f"{where}: parent.manifest_sha256 must be 64 lowercase hex digits, "
                         f"not {_show(digest)}")
    t = _int(p["snapshot_unix_ns"], f"{where}: parent.snapshot_unix_ns", 0, MAX_UNIX_NS - 1)
    if t >= unix_ns:
        raise ImageError(f"{where}: parent.snapshot_unix_ns {t} is not earlier than this "
                         f"image's T ({unix_ns})")
    return ParentRef(image, digest, t)


def load_manifest(path: str) -> Manifest:
    """Read and validate the manifest file at `path`; ImageError (one line) if it is not sound."""
    return load_manifest_hashed(path)[0]


def load_manifest_hashed(path: str) -> tuple[Manifest, str]:
    """load_manifest, plus the sha256 (hex) of the very bytes it validated (what a delta's
    parent.manifest_sha256 names)."""
    raw = _read_manifest_bytes(path)
    return _parse_manifest(raw, path), hashlib.sha256(raw).hexdigest()


def manifest_sha256(image_path: str) -> str:
    """Hex sha256 of the manifest file beside `image_path` (what a delta records of its parent);
    ImageError (one line) if it cannot be read."""
    return hashlib.sha256(_read_manifest_bytes(manifest_path(image_path))).hexdigest()


def _read_manifest_bytes(path: str) -> bytes:
    """The manifest file's bytes: a regular file, at most MAX_MANIFEST_BYTES."""
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
    return raw


def _parse_manifest(raw: bytes, path: str) -> Manifest:
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
# Rules for producers: checked as they go, so publishing never writes what readers refuse


CALLER_FIELDS = frozenset({"object", "snapshot_time", "processes", "stats", "parent"})


def check_geometry(size: int, page_size: int) -> None:
    """ValueError unless an object of `size` bytes with `page_size` pages can be an image."""
    if type(size) is not int or not 0 <= size <= MAX_OFFSET:
        raise ValueError(f"size must be an integer in [0, {MAX_OFFSET}], not {size!r}")
    if (type(page_size) is not int or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
            or page_size & (page_size - 1)):
        raise ValueError(f"page_size must be a power of two in [{MIN_PAGE_SIZE}, "
                         f"{MAX_PAGE_SIZE}], not {page_size!r}")


def check_range(offset: int, length: int, size: int, page_size: int) -> None:
    """ValueError unless [offset, +length) starts on a page and ends inside the object."""
    if offset < 0 or offset % page_size or offset + length > size:
        raise ValueError(f"range [{offset}, +{length}) is not page-aligned inside the "
                         f"object (size {size}, page size {page_size})")


def check_extent(offset: int, length: int, checksum: str, size: int, page_size: int) -> None:
    """ValueError unless the extent is one a manifest may list (as _extents checks on load)."""
    check_range(offset, length, size, page_size)
    if length <= 0 or (length % page_size and offset + length != size):
        raise ValueError(f"extent length {length} must be whole pages (or reach the end)")
    if not _CHECKSUM_RE.fullmatch(checksum):
        raise ValueError(f"checksum {checksum!r} is not from extent_checksum()")


def build_manifest(fields: dict[str, Any], size: int, page_size: int,
                   extents: list[Extent]) -> Manifest:
    """The caller's fields (CALLER_FIELDS, see ImageWriter.publish) + ours, validated exactly as
    load_manifest will validate the file; ValueError (one line) if they are not sound."""
    unknown = sorted(fields.keys() - CALLER_FIELDS)
    if unknown:
        raise ValueError(f"publish: unknown manifest field {unknown[0]!r}")
    try:
        obj = dict(fields.get("object") or {})
        for key, mine in (("size", size), ("page_size", page_size)):
            if obj.setdefault(key, mine) != mine:
                raise ValueError(f"object.{key} {obj[key]!r} != the writer's {mine}")
        obj.setdefault("dev", None)
        obj.setdefault("inode", None)
        when = fields.get("snapshot_time")
        unix_ns = when.get("unix_ns") if isinstance(when, dict) else when
        iso = iso8601_utc(unix_ns) if type(unix_ns) is int and unix_ns >= 0 else None
        parent = fields.get("parent")
        if isinstance(parent, ParentRef):
            parent = parent.to_dict()
        d = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if parent is None else DELTA_FORMAT_VERSION,
            "created_by": {"tool": "uffdsnap", "version": __version__},
            "object": obj,
            "snapshot_time": {"unix_ns": unix_ns, "iso8601": iso},
            **({"parent": parent} if parent is not None else {}),
            "processes": [dict(p) for p in fields.get("processes", [])],
            "stats": dict(fields.get("stats", {})),
            "extents": [e.to_dict() for e in extents],
        }
        # round-trip through JSON so publish can never write what load_manifest refuses
        data = json.loads(_dumps(d), object_pairs_hook=_no_dup_keys)
        return Manifest.from_dict(data, where="publish")
    except (ImageError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"publish: invalid manifest fields: {e}") from None


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest file's bytes; SnapshotFailed if readers would refuse a file that large."""
    text = manifest.to_json().encode("ascii")
    if len(text) > MAX_MANIFEST_BYTES:  # never publish what load_manifest refuses
        raise SnapshotFailed(f"manifest would be {len(text) >> 20} MiB, over the "
                             f"{MAX_MANIFEST_BYTES >> 20} MiB limit readers accept")
    return text
