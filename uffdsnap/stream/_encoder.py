"""The sending end of a stream: records as bytes, made with as little work as a sender can do.

`Encoder` is what a sender calls as it saves pages (the coordinator: faulted pages as they are
saved, then the scan's windows); it checks each record with the receiver's own rules and keeps
the tally and the digest that END carries, so a sender's mistake is a ValueError here rather
than a refused stream after hours of copying. `encode_image` streams an image already on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import msgpack
import xxhash

from uffdsnap.image import CorruptImage, ExtentHash, load_manifest, manifest_path
from uffdsnap.stream._coverage import Coverage
from uffdsnap.stream._records import (
    DIGEST_ALGO,
    FLAG_ZSTD,
    HOLE_PAYLOAD,
    MAX_ABORT_PAYLOAD,
    RAW_LENGTH,
    STREAM_FORMAT,
    STREAM_VERSION,
    Kind,
    StreamError,
    StreamHeader,
    check_span,
    data_limit,
    decode_end,
    decode_header,
    pack_record,
    payload_limit,
)


class Encoder:
    """The bytes of one stream, a record per call; write them in the order of the calls.

    Not thread-safe: a sender with several threads encodes and writes under one lock (the
    digest in END covers the bytes in the order they were made). Each page of the object goes
    out exactly once, as PAGES or as HOLE, before `end`; misuse raises ValueError.
    """

    def __init__(self, *, level: int = 3):
        self.level = level  # zstd level of `pages(..., compress=True)`
        self.header_record: StreamHeader | None = None
        self.pages_sent = 0
        self.bytes_sent = 0  # PAGES data, before compression
        self.wire_bytes = 0  # everything made so far
        self._digest = xxhash.xxh3_128()
        self._coverage: Coverage | None = None
        self._compressor: Any = None
        self._ended = False

    def header(self, size: int, page_size: int, t_unix_ns: int, object_fields: dict[str, Any],
               parent: dict[str, Any] | None = None) -> bytes:
        """HEADER, first and once: geometry, T, and the object's fields for the manifest
        (source, kind, and dev and inode, which default to None)."""
        if self.header_record is not None or self._ended:
            raise ValueError("header() comes once, first")
        obj = {"dev": None, "inode": None, **object_fields}
        payload = _pack({"format": STREAM_FORMAT, "version": STREAM_VERSION, "size": size,
                         "page_size": page_size, "t_unix_ns": t_unix_ns, "object": obj,
                         "parent": parent})
        if len(payload) > payload_limit(Kind.HEADER, None):
            raise ValueError(f"header of {len(payload)} bytes is over the limit")
        self.header_record = _local(decode_header, payload)
        self._coverage = Coverage(self.header_record.npages)
        return self._emit(Kind.HEADER, payload)

    def pages(self, offset: int, data: bytes | bytearray | memoryview,
              compress: bool = False) -> bytes:
        """PAGES: consecutive pages at `offset` (whole pages, or up to the object's end), at
        most max(4 MiB, one page). With `compress`, zstd is used when it makes them smaller."""
        header = self._body("pages")
        raw = memoryview(data).cast("B")  # copied once, into the record
        _local(check_span, "PAGES", offset, len(raw), header)
        if len(raw) > data_limit(header.page_size):
            raise ValueError(f"PAGES of {len(raw)} bytes: at most "
                             f"{data_limit(header.page_size)} per record; split them")
        self._cover("PAGES", offset, len(raw))
        self.pages_sent += -(-len(raw) // header.page_size)
        self.bytes_sent += len(raw)
        if compress:
            frame = self._zstd().compress(raw)
            if RAW_LENGTH.size + len(frame) < len(raw):
                return self._emit(Kind.PAGES, RAW_LENGTH.pack(len(raw)) + frame, offset,
                                  FLAG_ZSTD)
        return self._emit(Kind.PAGES, raw, offset)

    def hole(self, offset: int, length: int) -> bytes:
        """HOLE: [offset, +length) was zeros at T (whole pages, or up to the object's end)."""
        header = self._body("hole")
        _local(check_span, "HOLE", offset, length, header)
        self._cover("HOLE", offset, length)
        return self._emit(Kind.HOLE, HOLE_PAYLOAD.pack(length), offset)

    def end(self, manifest_fields: dict[str, Any]) -> bytes:
        """END, last: the fields ImageWriter.publish takes (object and snapshot_time default
        to the header's; processes, stats), with the tally and digest of what was sent."""
        header = self._body("end")
        assert self._coverage is not None
        missing = self._coverage.first_missing()
        if missing is not None:
            raise ValueError(f"end() before every page was sent: "
                             f"{self._coverage.npages - self._coverage.covered} pages missing, "
                             f"the first at offset {missing * header.page_size:#x}")
        fields = {"object": header.object, "snapshot_time": header.t_unix_ns,
                  **manifest_fields}
        if isinstance(fields["object"], dict):
            fields["object"] = {"dev": None, "inode": None, **fields["object"]}
        payload = _pack({"manifest": fields, "pages": self.pages_sent,
                         "bytes": self.bytes_sent,
                         "digest": f"{DIGEST_ALGO}:{self._digest.hexdigest()}"})
        if len(payload) > payload_limit(Kind.END, header):
            raise ValueError(f"end record of {len(payload)} bytes is over the limit")
        _local(decode_end, payload, header)
        self._ended = True
        self._coverage.close()
        return self._emit(Kind.END, payload)

    def abort(self, reason: str) -> bytes:
        """ABORT: the sender failed; any time, even before the header."""
        self._ended = True
        text = reason.encode("utf-8")[:MAX_ABORT_PAYLOAD]
        return self._emit(Kind.ABORT, text.decode("utf-8", "ignore").encode("utf-8"))

    def _body(self, what: str) -> StreamHeader:
        if self.header_record is None or self._ended:
            raise ValueError(f"{what}() comes after header() and before end()")
        return self.header_record

    def _cover(self, what: str, offset: int, length: int) -> None:
        assert self.header_record is not None and self._coverage is not None
        ps = self.header_record.page_size
        clash = self._coverage.cover(offset // ps, -(-length // ps))
        if clash is not None:
            raise ValueError(f"{what} at offset {offset:#x}: page {clash * ps:#x} was already "
                             "sent")

    def _zstd(self) -> Any:
        if self._compressor is None:
            import zstandard

            self._compressor = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                                        write_content_size=True)
        return self._compressor

    def _emit(self, kind: Kind, payload: bytes | memoryview, offset: int = 0,
              flags: int = 0) -> bytes:
        record = pack_record(kind, payload, offset, flags)
        if kind != Kind.END:
            self._digest.update(record)
        self.wire_bytes += len(record)
        return record


def encode_image(path: str, *, compress: bool = False) -> Iterator[bytes]:
    """The stream of an image already published (OUT.img and its manifest): one PAGES record
    per extent (extents over the record limit in pieces), a HOLE for every gap. Received, it
    publishes the same image and manifest. CorruptImage if an extent does not match its
    checksum: a corrupt image is never forwarded."""
    manifest = load_manifest(manifest_path(path))
    obj = manifest.object
    enc = Encoder()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield enc.header(obj.size, obj.page_size, manifest.snapshot_unix_ns,
                         {"source": obj.source, "kind": obj.kind, "dev": obj.dev,
                          "inode": obj.inode},
                         manifest.parent.to_dict() if manifest.parent else None)
        limit = data_limit(obj.page_size)
        pos = 0
        for e in manifest.extents:
            if e.offset > pos:
                yield enc.hole(pos, e.offset - pos)
            h = ExtentHash()
            for piece in range(e.offset, e.end, limit):
                data = _pread_exact(fd, min(limit, e.end - piece), piece, path)
                h.update(data)
                yield enc.pages(piece, data, compress)
            if h.checksum() != e.checksum:
                raise CorruptImage(f"{path}: checksum mismatch in extent at offset {e.offset}; "
                                   "not streaming a corrupt image")
            pos = e.end
        if pos < obj.size:
            yield enc.hole(pos, obj.size - pos)
        yield enc.end({"processes": [dict(p) for p in manifest.processes],
                       "stats": dict(manifest.stats)})
    finally:
        os.close(fd)


def _pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    parts, got = [], 0
    while got < n:
        piece = os.pread(fd, n - got, offset + got)
        if not piece:
            raise CorruptImage(f"{path}: image ends early at offset {offset + got}")
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _pack(value: dict[str, Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _local(check: Any, *args: Any) -> Any:
    """Run one of the receiver's checks on what we are about to send: a failure is our bug."""
    try:
        return check(*args)
    except StreamError as e:
        raise ValueError(f"would send an invalid record: {e}") from None
