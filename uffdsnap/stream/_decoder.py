"""The receiving end of a stream as a pure state machine (h11's shape, like uffdsnap.protocol):
bytes in, validated records out. It never touches a socket or a file.

Besides each record's own rules (uffdsnap.stream._records) it holds the stream's: HEADER first
and once, END last, every page of the object covered exactly once by PAGES or HOLE before END,
END's tally and digest equal to what arrived, and nothing after END. Anything else raises
StreamError, and the decoder stays failed.
"""

from __future__ import annotations

import enum

import xxhash

from uffdsnap.stream._coverage import Coverage
from uffdsnap.stream._records import (
    DIGEST_ALGO,
    RECORD_HEADER,
    Abort,
    End,
    Hole,
    Kind,
    Pages,
    Record,
    StreamError,
    StreamHeader,
    decode_payload,
    parse_record_header,
)


class Phase(enum.Enum):
    HEADER = "header"  # waiting for HEADER
    BODY = "body"  # PAGES and HOLE records, until END
    DONE = "done"  # END (or ABORT) seen: only the end of the input may follow
    FAILED = "failed"


class StreamDecoder:
    """Feed bytes with `receive_data` (b"" = the input ended), take records with
    `next_record` until it returns None (it needs more bytes). Every record it returns is
    valid on its own and in its place in the stream."""

    def __init__(self) -> None:
        self.phase = Phase.HEADER
        self.header: StreamHeader | None = None
        self.records = 0  # records returned
        self.pages = 0  # pages received in PAGES records
        self.holes = 0  # HOLE records
        self.data_bytes = 0  # bytes of PAGES data, inflated
        self.wire_bytes = 0  # bytes consumed, record headers included
        self.compressed = 0  # PAGES records that came compressed
        self._buf = bytearray()
        self._eof = False
        self._coverage: Coverage | None = None
        self._digest = xxhash.xxh3_128()
        self._error: StreamError | None = None
        self._covered = 0

    # ---- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """More of the stream; an empty `data` says it ended (EOF)."""
        if self._eof:
            raise ValueError("data after the end of the input")
        if not data:
            self._eof = True
        else:
            self._buf += data

    def wanted(self) -> int:
        """How many more bytes would complete the record in progress (at least 1): a reader can
        size its reads by it."""
        if len(self._buf) < RECORD_HEADER.size:
            return RECORD_HEADER.size - len(self._buf)
        length = RECORD_HEADER.unpack_from(self._buf)[3]
        return max(1, RECORD_HEADER.size + length - len(self._buf))

    # ---- output -----------------------------------------------------------------------------

    def next_record(self) -> Record | None:
        """The next complete record, None if more bytes are needed; StreamError if the stream
        breaks a rule (or ended early)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except StreamError as e:
            self.phase = Phase.FAILED
            self._error = e
            self._buf.clear()
            if self._coverage is not None:
                self._coverage.close()
            raise self._error from None

    def _next(self) -> Record | None:
        if self.phase == Phase.DONE:
            if self._buf:
                raise StreamError(f"{len(self._buf)} bytes after the stream's last record")
            return None
        if len(self._buf) < RECORD_HEADER.size:
            if self._eof:
                self._ended_early()
            return None
        try:
            kind, flags, length, offset = parse_record_header(self._buf[:RECORD_HEADER.size],
                                                              self.header)
            self._check_order(kind)
            total = RECORD_HEADER.size + length
            if len(self._buf) < total:
                if self._eof:
                    raise StreamError(f"the stream ended inside a {kind.name} record "
                                      f"({len(self._buf)} of its {total} bytes arrived)")
                return None
            with memoryview(self._buf) as view:  # one copy of the payload, none of the rest
                payload = bytes(view[RECORD_HEADER.size:total])
            record = decode_payload(kind, flags, offset, payload, self.header)
            self._account(record)
        except StreamError as e:
            raise StreamError(f"record {self.records + 1}: {e}") from None
        if not isinstance(record, End):  # END carries the digest of everything before it
            with memoryview(self._buf) as view:
                self._digest.update(view[:total])
        del self._buf[:total]
        self.wire_bytes += total
        self.records += 1
        return record

    def _ended_early(self) -> None:
        if self._buf:
            raise StreamError(f"the stream ended inside the header of record {self.records + 1} "
                              f"({len(self._buf)} of its {RECORD_HEADER.size} bytes)")
        if self.phase == Phase.HEADER:
            raise StreamError("the stream ended before its HEADER")
        raise StreamError(f"the stream ended before its END record (after {self.progress()})")

    def _check_order(self, kind: Kind) -> None:
        if kind == Kind.ABORT:
            return
        if self.phase == Phase.HEADER and kind != Kind.HEADER:
            raise StreamError(f"{kind.name} before the HEADER (a stream starts with one)")
        if self.phase == Phase.BODY and kind == Kind.HEADER:
            raise StreamError("a second HEADER")

    def _account(self, record: Record) -> None:
        """Move the stream's state on by one valid record; StreamError if, in its place, it is
        not."""
        if isinstance(record, StreamHeader):
            self.header = record
            self._coverage = Coverage(record.npages)
            self.phase = Phase.BODY
        elif isinstance(record, Pages):
            self._cover("PAGES", record.offset, len(record.data))
            self.pages += self._npages(len(record.data))
            self.data_bytes += len(record.data)
            self.compressed += record.compressed
        elif isinstance(record, Hole):
            self._cover("HOLE", record.offset, record.length)
            self.holes += 1
        elif isinstance(record, End):
            self._check_end(record)
            self.phase = Phase.DONE
        elif isinstance(record, Abort):
            self.phase = Phase.DONE
            if self._coverage is not None:
                self._coverage.close()

    def _npages(self, length: int) -> int:
        assert self.header is not None
        return -(-length // self.header.page_size)

    def _cover(self, what: str, offset: int, length: int) -> None:
        assert self.header is not None and self._coverage is not None
        ps = self.header.page_size
        clash = self._coverage.cover(offset // ps, self._npages(length))
        self._covered = self._coverage.covered
        if clash is not None:
            raise StreamError(f"{what} at offset {offset:#x}: the page at {clash * ps:#x} was "
                              "already sent (each page comes once, in PAGES or HOLE)")

    def _check_end(self, end: End) -> None:
        assert self.header is not None and self._coverage is not None
        missing = self._coverage.first_missing()
        if missing is not None:
            left = self._coverage.npages - self._coverage.covered
            raise StreamError(f"END before all the object was sent: {left} pages never came "
                              f"(the first at offset {missing * self.header.page_size:#x})")
        if (end.pages, end.bytes) != (self.pages, self.data_bytes):
            raise StreamError(f"END says {end.pages} pages ({end.bytes} bytes) were sent, "
                              f"{self.pages} ({self.data_bytes} bytes) arrived")
        digest = f"{DIGEST_ALGO}:{self._digest.hexdigest()}"
        if end.digest != digest:
            raise StreamError(f"END: checksum mismatch: the sender's digest {end.digest}, the "
                              f"stream's {digest}")
        self._coverage.close()

    def progress(self) -> str:
        """How far the stream got, for messages: records, and pages covered of the object."""
        pages = "" if self.header is None else \
            f", {self._covered} of {self.header.npages} pages covered"
        return f"{self.records} records{pages}"

    @property
    def done(self) -> bool:
        return self.phase == Phase.DONE
