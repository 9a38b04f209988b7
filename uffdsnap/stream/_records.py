"""One record of the migration stream: its 16-byte header, its payload, and every rule a single
record must obey on its own (kind, flags, lengths, alignment, the maps' fields). Pure: no I/O.

The rules that span records (order, coverage, counts, the digest) are the decoder's. Both the
decoder and the encoder go through this module, so the sender cannot emit a record the receiver
refuses without finding out first. docs/stream-format.md describes every field.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from uffdsnap.errors import SnapshotFailed
from uffdsnap.image import (
    DELTA_FORMAT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    MAX_OFFSET,
    MAX_PAGE_SIZE,
    MAX_UNIX_NS,
    MIN_PAGE_SIZE,
    ImageError,
    Manifest,
    iso8601_utc,
)

STREAM_FORMAT = "uffdsnap-stream"
STREAM_VERSION = 1
MAGIC = b"US"
RECORD_HEADER = struct.Struct(">2sBBIQ")  # magic, kind, flags, payload length, offset
RAW_LENGTH = struct.Struct(">I")  # leads a compressed payload: the data's length once inflated
HOLE_PAYLOAD = struct.Struct(">Q")

FLAG_ZSTD = 0x01  # the payload is compressed (PAGES only)

MAX_HEADER_PAYLOAD = 64 << 10
MAX_END_PAYLOAD = 64 << 20  # the processes list and stats; extents are the receiver's own
MAX_ABORT_PAYLOAD = 4096
MAX_PAGES_DATA = 4 << 20  # per PAGES record, or one page if pages are larger (hugetlbfs)
MAX_OBJECT_PAGES = 1 << 31  # the receiver's coverage bitmap is at most 256 MiB (8 TiB of 4 KiB)
MAX_NESTING = 32  # of the values in END's manifest fields (JSON encoders recurse)
MAX_REASON_CHARS = 1000  # of ABORT's reason and a reply's error, as shown

DIGEST_ALGO = "xxh3_128"
_DIGEST_RE = re.compile(r"xxh3_128:[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

OBJECT_FIELDS = frozenset({"source", "kind", "dev", "inode"})
HEADER_FIELDS = frozenset({"format", "version", "size", "page_size", "t_unix_ns", "object",
                           "parent"})
END_FIELDS = frozenset({"manifest", "pages", "bytes", "digest"})
MANIFEST_FIELDS = frozenset({"object", "snapshot_time", "processes", "stats", "parent"})
PARENT_FIELDS = frozenset({"image", "manifest_sha256", "snapshot_unix_ns"})


class Kind(enum.IntEnum):
    HEADER = 1
    PAGES = 2
    HOLE = 3
    END = 4
    ABORT = 5


class StreamError(SnapshotFailed):
    """A stream that cannot be published: malformed, hostile, incomplete, aborted or stalled.
    Nothing was published (exit 1, like a failed snapshot)."""


@dataclass(frozen=True)
class StreamHeader:
    """HEADER: the object's geometry and T, known before the first page arrives."""

    size: int
    page_size: int
    t_unix_ns: int
    object: dict[str, Any]  # source, kind, dev, inode: as ImageWriter.publish takes them
    # a delta's parent (image, manifest_sha256, snapshot_unix_ns: the manifest's field); then
    # PAGES are the delta's extents (zeros included) and HOLE is "as in the parent"
    parent: dict[str, Any] | None = None

    @property
    def npages(self) -> int:
        return -(-self.size // self.page_size)


@dataclass(frozen=True)
class Pages:
    """PAGES: the bytes of consecutive pages at `offset`, at T (inflated if sent compressed)."""

    offset: int
    data: bytes
    compressed: bool = False


@dataclass(frozen=True)
class Hole:
    """HOLE: [offset, offset+length) was all zeros at T; the receiver writes nothing."""

    offset: int
    length: int


@dataclass(frozen=True)
class End:
    """END: what only the sender knows of the manifest, and its tally of what it sent."""

    manifest: dict[str, Any]  # object, snapshot_time, processes, stats (ImageWriter.publish)
    pages: int  # pages sent in PAGES records
    bytes: int  # data bytes of PAGES records, inflated
    digest: str  # "xxh3_128:<hex>" of every byte of the stream before the END record


@dataclass(frozen=True)
class Abort:
    """ABORT: the sender failed; the receiver discards the stream."""

    reason: str


Record = StreamHeader | Pages | Hole | End | Abort


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Hostile text made safe for one line of a terminal: control characters escaped, short."""
    text = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def data_limit(page_size: int) -> int:
    """The most data one PAGES record may carry."""
    return max(MAX_PAGES_DATA, page_size)


def zstd_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND: the largest frame zstd makes of `n` bytes."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def payload_limit(kind: Kind, header: StreamHeader | None) -> int:
    """The longest payload a record of `kind` may declare, checked before it is read."""
    if kind == Kind.PAGES:
        limit = data_limit(header.page_size if header else MIN_PAGE_SIZE)
        return RAW_LENGTH.size + zstd_bound(limit)
    return {Kind.HEADER: MAX_HEADER_PAYLOAD, Kind.HOLE: HOLE_PAYLOAD.size,
            Kind.END: MAX_END_PAYLOAD, Kind.ABORT: MAX_ABORT_PAYLOAD}[kind]


def parse_record_header(raw: bytes | bytearray | memoryview,
                        header: StreamHeader | None) -> tuple[Kind, int, int, int]:
    """(kind, flags, payload length, offset) of a 16-byte record header; StreamError unless
    the magic, kind, flags and length are ones this version knows and allows."""
    magic, kind, flags, length, offset = RECORD_HEADER.unpack(raw)
    if magic != MAGIC:
        raise StreamError(f"bad magic {bytes(magic)!r} (not a uffdsnap stream, or out of step)")
    try:
        kind = Kind(kind)
    except ValueError:
        raise StreamError(f"unknown record kind {kind}") from None
    if flags & ~FLAG_ZSTD:
        raise StreamError(f"{kind.name}: unknown flags {flags:#04x}")
    if flags & FLAG_ZSTD and kind != Kind.PAGES:
        raise StreamError(f"{kind.name}: only PAGES records may be compressed")
    if kind in (Kind.HEADER, Kind.END, Kind.ABORT) and offset:
        raise StreamError(f"{kind.name}: offset must be 0, not {offset}")
    if length > payload_limit(kind, header):
        raise StreamError(f"{kind.name}: payload of {length} bytes is over the limit of "
                          f"{payload_limit(kind, header)}")
    if kind == Kind.HOLE and length != HOLE_PAYLOAD.size:
        raise StreamError(f"HOLE: payload must be {HOLE_PAYLOAD.size} bytes, not {length}")
    return kind, flags, length, offset


def pack_record(kind: Kind, payload: bytes | bytearray | memoryview, offset: int = 0,
                flags: int = 0) -> bytes:
    """Header and payload as one bytes object (the payload copied once, whatever it is)."""
    header = RECORD_HEADER.pack(MAGIC, kind, flags, memoryview(payload).nbytes, offset)
    return b"".join((header, payload))


def check_span(what: str, offset: int, length: int, header: StreamHeader) -> None:
    """StreamError unless [offset, +length) is whole pages inside the object (the object's last
    page may be partial: a span may end exactly at its size)."""
    ps, size = header.page_size, header.size
    if length <= 0:
        raise StreamError(f"{what} at offset {offset:#x}: empty")
    if offset % ps:
        raise StreamError(f"{what} at offset {offset:#x}: not a multiple of the page size {ps}")
    if offset >= size or length > size - offset:
        raise StreamError(f"{what} [{offset:#x}, +{length:#x}) runs past the object's end "
                          f"({size:#x})")
    if length % ps and offset + length != size:
        raise StreamError(f"{what} at offset {offset:#x}: length {length:#x} is not whole "
                          f"pages of {ps} (only the object's last page may be partial)")


# ---- payloads --------------------------------------------------------------------------------


def decode_payload(kind: Kind, flags: int, offset: int, payload: bytes,
                   header: StreamHeader | None) -> Record:
    """The record a payload holds, every field checked (against `header` once it is known)."""
    if kind == Kind.HEADER:
        return decode_header(payload)
    if kind == Kind.ABORT:
        return Abort(one_line(payload.decode("utf-8", errors="replace")))
    assert header is not None  # the decoder allows nothing but HEADER and ABORT before one
    if kind == Kind.HOLE:
        (length,) = HOLE_PAYLOAD.unpack(payload)
        check_span("HOLE", offset, length, header)
        return Hole(offset, length)
    if kind == Kind.PAGES:
        compressed = bool(flags & FLAG_ZSTD)
        data = inflate(payload, offset, header) if compressed else payload
        check_span("PAGES", offset, len(data), header)
        if len(data) > data_limit(header.page_size):
            raise StreamError(f"PAGES at offset {offset:#x}: {len(data)} bytes, over the limit "
                              f"of {data_limit(header.page_size)}")
        return Pages(offset, data, compressed)
    return decode_end(payload, header)


def inflate(payload: bytes, offset: int, header: StreamHeader) -> bytes:
    """A compressed PAGES payload (u32 length, then one zstd frame that declares the same
    length) inflated, never to more than that length."""
    import zstandard  # only streams that use compression pay for the import

    what = f"PAGES at offset {offset:#x} (compressed)"
    if len(payload) < RAW_LENGTH.size:
        raise StreamError(f"{what}: payload too short for its length field")
    (raw_length,) = RAW_LENGTH.unpack_from(payload)
    check_span("PAGES", offset, raw_length, header)  # before anything is inflated
    if raw_length > data_limit(header.page_size):
        raise StreamError(f"{what}: {raw_length} bytes once inflated, over the limit of "
                          f"{data_limit(header.page_size)}")
    frame = payload[RAW_LENGTH.size:]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise StreamError(f"{what}: not a zstd frame") from None
    if declared != raw_length:
        said = "no size" if declared < 0 else f"{declared} bytes"
        raise StreamError(f"{what}: the zstd frame declares {said}, the record {raw_length}")
    inflater = zstandard.ZstdDecompressor().decompressobj()
    try:  # zstd refuses to produce more than the frame declares, so this stays bounded
        data = inflater.decompress(frame)
    except zstandard.ZstdError as e:
        raise StreamError(f"{what}: corrupt zstd data ({one_line(str(e), 80)})") from None
    if not inflater.eof:
        raise StreamError(f"{what}: the zstd frame is truncated")
    if inflater.unused_data:
        raise StreamError(f"{what}: {len(inflater.unused_data)} bytes after the zstd frame")
    if len(data) != raw_length:
        raise StreamError(f"{what}: inflated to {len(data)} bytes, not {raw_length}")
    return data


def decode_header(payload: bytes) -> StreamHeader:
    d = _map(_unpack(payload, "HEADER"), "HEADER", HEADER_FIELDS)
    if d["format"] != STREAM_FORMAT:
        raise StreamError(f"HEADER: not a uffdsnap stream (format {_show(d['format'])})")
    version = d["version"]
    if type(version) is not int or version != STREAM_VERSION:
        raise StreamError(f"HEADER: unsupported stream version {_show(version)} (this uffdsnap "
                          f"reads version {STREAM_VERSION})")
    size = _int(d["size"], "HEADER: size", 0, MAX_OFFSET)
    page_size = _int(d["page_size"], "HEADER: page_size", MIN_PAGE_SIZE, MAX_PAGE_SIZE)
    if page_size & (page_size - 1):
        raise StreamError(f"HEADER: page_size {page_size} is not a power of two")
    t = _int(d["t_unix_ns"], "HEADER: t_unix_ns", 0, MAX_UNIX_NS - 1)
    obj = _map(d["object"], "HEADER: object", OBJECT_FIELDS)
    parent = d["parent"]
    if parent is not None:
        parent = dict(_map(parent, "HEADER: parent", PARENT_FIELDS))
    header = StreamHeader(size, page_size, t, dict(obj), parent)
    if header.npages > MAX_OBJECT_PAGES:
        raise StreamError(f"HEADER: an object of {header.npages} pages is more than this "
                          f"receiver takes ({MAX_OBJECT_PAGES})")
    check_manifest_fields({"object": obj, "snapshot_time": t}, header, "HEADER")
    return header


def decode_end(payload: bytes, header: StreamHeader) -> End:
    d = _map(_unpack(payload, "END"), "END", END_FIELDS)
    pages = _int(d["pages"], "END: pages", 0, MAX_OBJECT_PAGES)
    nbytes = _int(d["bytes"], "END: bytes", 0, MAX_OFFSET)
    digest = d["digest"]
    if type(digest) is not str or not _DIGEST_RE.fullmatch(digest):
        raise StreamError(f"END: digest must look like 'xxh3_128:<32 hex digits>', not "
                          f"{_show(digest)}")
    fields = d["manifest"]
    check_manifest_fields(fields, header, "END: manifest")
    return End(dict(fields), pages, nbytes, digest)


def check_manifest_fields(fields: Any, header: StreamHeader, where: str) -> None:
    """StreamError unless `fields` (as ImageWriter.publish takes them) describe the header's
    object at the header's T and are what the image's own rules accept in a manifest."""
    d = _map(fields, where, MANIFEST_FIELDS - {"processes", "stats", "parent"},
             optional=frozenset({"processes", "stats", "parent"}))
    if d["object"] != header.object:
        raise StreamError(f"{where}: object differs from the HEADER's")
    if d.get("parent", header.parent) != header.parent:
        raise StreamError(f"{where}: parent differs from the HEADER's")
    when = d["snapshot_time"]
    unix_ns = when.get("unix_ns") if type(when) is dict and set(when) == {"unix_ns"} else when
    if type(unix_ns) is not int or unix_ns != header.t_unix_ns:
        raise StreamError(f"{where}: snapshot_time {_show(when)} is not the HEADER's T "
                          f"({header.t_unix_ns})")
    processes, stats = d.get("processes", []), d.get("stats", {})
    if _depth(processes) > MAX_NESTING or _depth(stats) > MAX_NESTING:
        raise StreamError(f"{where}: values nested more than {MAX_NESTING} deep")
    try:
        json.dumps([processes, stats], allow_nan=False)
    except (TypeError, ValueError):
        raise StreamError(f"{where}: processes and stats must be JSON values (no binary, "
                          "extension types, NaN or infinity)") from None
    if type(processes) is not list:
        raise StreamError(f"{where}: processes must be a list")
    probe = {  # the image's own rules check every field a manifest will hold
        "format": FORMAT,
        "format_version": FORMAT_VERSION if header.parent is None else DELTA_FORMAT_VERSION,
        "created_by": {"tool": "uffdsnap", "version": "0"},
        "object": {"size": header.size, "page_size": header.page_size, **header.object},
        "snapshot_time": {"unix_ns": header.t_unix_ns,
                          "iso8601": iso8601_utc(header.t_unix_ns)},
        **({"parent": header.parent} if header.parent is not None else {}),
        "processes": processes, "stats": stats, "extents": []}
    try:
        Manifest.from_dict(probe, where=where)
    except ImageError as e:
        raise StreamError(str(e)) from None


def _no_dup_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in a map")
    return d


def _unpack(payload: bytes, where: str) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True,
                               object_pairs_hook=_no_dup_keys)
    except Exception as e:  # msgpack raises many unrelated types for garbage
        why = str(e) if isinstance(e, ValueError) and "duplicate" in str(e) else \
            type(e).__name__
        raise StreamError(f"{where}: payload is not one msgpack map ({one_line(why, 80)})"
                          ) from None


def _map(value: Any, where: str, required: frozenset[str],
         optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if type(value) is not dict:
        raise StreamError(f"{where} must be a map, not {_show(value)}")
    if any(type(k) is not str for k in value):
        raise StreamError(f"{where}: map keys must be text")
    missing = sorted(required - value.keys())
    if missing:
        raise StreamError(f"{where}: missing field {missing[0]!r}")
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        raise StreamError(f"{where}: unknown field {_show(unknown[0])}")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise StreamError(f"{where} must be an integer in [{lo}, {hi}], not {_show(value)}")
    return value


def _show(value: Any) -> str:
    return one_line(repr(value), 60)


def _depth(value: Any) -> int:
    """How deeply lists and maps nest in `value` (iteratively: the value is hostile)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, level = todo.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, level)
            if level > MAX_NESTING:
                return level
            todo.extend((x, level + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


# ---- the receiver's one-line reply -----------------------------------------------------------

MAX_REPLY = 4096


@dataclass(frozen=True)
class Reply:
    """What the receiver answered after END: published (with the manifest's sha256) or not."""

    ok: bool
    manifest_sha256: str = ""
    error: str = ""
    image: str = ""  # the published image's name in its directory (a later delta's parent)


_IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9._+-]{1,255}")


def encode_reply(reply: Reply) -> bytes:
    if reply.ok:
        name = f" {reply.image}" if _IMAGE_NAME_RE.fullmatch(reply.image) else ""
        return f"ok {reply.manifest_sha256}{name}\n".encode("ascii")
    return f"error: {one_line(reply.error)}\n".encode()


def decode_reply(line: bytes) -> Reply:
    """A reply line (with its newline); StreamError if it is neither `ok SHA256 [NAME]` nor
    `error: REASON`."""
    if not line.endswith(b"\n") or len(line) > MAX_REPLY:
        raise StreamError("the receiver's reply is not one line")
    text = line[:-1].decode("utf-8", errors="replace")
    sha, _, name = text[3:].partition(" ")
    if text.startswith("ok ") and _SHA256_RE.fullmatch(sha) and (
            not name or _IMAGE_NAME_RE.fullmatch(name)):
        return Reply(True, manifest_sha256=sha, image=name)
    if text.startswith("error: "):
        return Reply(False, error=one_line(text[7:]))
    raise StreamError(f"the receiver's reply is not understood: {_show(text)}")
