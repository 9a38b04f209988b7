"""The migration stream's codec, pure: records, the stream's rules, the encoder, addresses, the
reply. No sockets, no files, no root."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from itertools import pairwise

import msgpack
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdsnap.errors import UserError
from uffdsnap.stream import (
    FLAG_ZSTD,
    MAX_OBJECT_PAGES,
    RECORD_HEADER,
    Abort,
    Coverage,
    Encoder,
    End,
    Hole,
    Kind,
    Pages,
    Phase,
    Reply,
    StreamDecoder,
    StreamError,
    StreamHeader,
    decode_reply,
    encode_reply,
    parse_address,
)

P = 4096
NPAGES = 40
SIZE = NPAGES * P + 100  # the last page is partial
T = 1_700_000_000_123_456_789
OBJ = {"source": "/dev/shm/test", "kind": "shm", "dev": 25, "inode": 1234}
FIELDS = {"processes": [{"pid": 4242, "comm": "writer", "mode": "attach", "mappings": 2}],
          "stats": {"faults": 2, "pause_ms": 0.25}}


def content(seed: int = 1) -> bytes:
    """An object: random pages, compressible pages, zero pages, a hole region, a partial end."""
    rnd = random.Random(seed)
    out = bytearray(SIZE)
    for page in range(NPAGES):
        if page < 12:
            out[page * P:(page + 1) * P] = rnd.randbytes(P)
        elif page < 20:
            out[page * P:(page + 1) * P] = bytes([page]) * P  # compresses well
    out[NPAGES * P:] = rnd.randbytes(100)
    return bytes(out)


def good_records(data: bytes | None = None, compress: bool = False) -> tuple[list[bytes], Encoder]:
    """A stream as a sender makes it: two faulted pages first, then the scan's windows around
    them, a hole, the partial last page, END."""
    data = content() if data is None else data
    enc = Encoder()
    recs = [enc.header(SIZE, P, T, OBJ)]
    recs.append(enc.pages(5 * P, data[5 * P:6 * P], compress))  # faults, ahead of the scan
    recs.append(enc.pages(14 * P, data[14 * P:15 * P], compress))
    recs.append(enc.pages(0, data[0:5 * P], compress))
    recs.append(enc.pages(6 * P, data[6 * P:14 * P], compress))
    recs.append(enc.pages(15 * P, data[15 * P:20 * P], compress))
    recs.append(enc.hole(20 * P, 20 * P))
    recs.append(enc.pages(NPAGES * P, data[NPAGES * P:], compress))
    recs.append(enc.end(FIELDS))
    return recs, enc


def decode_all(blob: bytes, chunk: int | None = None, eof: bool = True) -> list[object]:
    dec = StreamDecoder()
    out: list[object] = []
    step = chunk or max(len(blob), 1)
    for i in range(0, len(blob), step):
        dec.receive_data(blob[i:i + step])
        while (r := dec.next_record()) is not None:
            out.append(r)
    if eof:
        dec.receive_data(b"")
        assert dec.next_record() is None
    return out


def rec(kind: int, payload: bytes, offset: int = 0, flags: int = 0) -> bytes:
    """A record packed by hand: no encoder checks, so anything can be made."""
    return struct.pack(">2sBBIQ", b"US", kind, flags, len(payload), offset) + payload


def header_map(**changes: object) -> dict[str, object]:
    d: dict[str, object] = {"format": "uffdsnap-stream", "version": 1, "size": SIZE,
                            "page_size": P, "t_unix_ns": T, "object": dict(OBJ), "parent": None}
    d.update(changes)
    return d


def header_rec(**changes: object) -> bytes:
    return rec(1, msgpack.packb(header_map(**changes)))


def body(data: bytes | None = None) -> list[bytes]:
    """HEADER plus records that cover the whole object once (no END)."""
    return good_records(data)[0][:-1]


def end_rec(prefix: list[bytes], *, pages: int | None = None, nbytes: int | None = None,
            digest: str | None = None, **manifest: object) -> bytes:
    """END for `prefix`, right unless told otherwise."""
    dec = StreamDecoder()
    dec.receive_data(b"".join(prefix))
    while dec.next_record() is not None:
        pass
    fields: dict[str, object] = {"object": dict(OBJ), "snapshot_time": T, **FIELDS}
    fields.update(manifest)
    d = {"manifest": fields, "pages": dec.pages if pages is None else pages,
         "bytes": dec.data_bytes if nbytes is None else nbytes,
         "digest": digest or f"xxh3_128:{xxhash.xxh3_128_hexdigest(b''.join(prefix))}"}
    return rec(4, msgpack.packb(d))


def refused(blob: bytes, needle: str) -> str:
    with pytest.raises(StreamError) as info:
        decode_all(blob)
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 7, 16, 17, 4096])
def test_a_stream_decodes_to_what_was_encoded(compress: bool, chunk: int | None) -> None:
    data = content()
    recs, enc = good_records(data, compress)
    out = decode_all(b"".join(recs), chunk)
    assert [type(r) for r in out] == [StreamHeader, Pages, Pages, Pages, Pages, Pages, Hole,
                                      Pages, End]
    header = out[0]
    assert isinstance(header, StreamHeader)
    assert (header.size, header.page_size, header.t_unix_ns, header.object) == (SIZE, P, T, OBJ)
    image = bytearray(SIZE)
    for r in out:
        if isinstance(r, Pages):
            image[r.offset:r.offset + len(r.data)] = r.data
    assert bytes(image) == data
    end = out[-1]
    assert isinstance(end, End)
    assert (end.pages, end.bytes) == (enc.pages_sent, enc.bytes_sent) == (21, 20 * P + 100)
    assert end.manifest == {"object": OBJ, "snapshot_time": T, **FIELDS}
    compressed = [r for r in out if isinstance(r, Pages) and r.compressed]
    assert bool(compressed) == compress
    if compress:  # records of random bytes went raw, the others compressed
        assert sorted(r.offset for r in compressed) == [6 * P, 14 * P, 15 * P]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=60))
def test_any_chunking_gives_the_same_records(cuts: list[int]) -> None:
    blob = b"".join(good_records(compress=True)[0])
    dec = StreamDecoder()
    out, pos, i = [], 0, 0
    while pos < len(blob):
        n = cuts[i % len(cuts)]
        dec.receive_data(blob[pos:pos + n])
        pos, i = pos + n, i + 1
        while (r := dec.next_record()) is not None:
            out.append(r)
    assert out == decode_all(blob)
    assert dec.done and dec.wire_bytes == len(blob)


def test_record_headers_are_bytes_fixed_by_the_format() -> None:
    enc = Encoder()
    enc.header(SIZE, P, T, OBJ)
    assert enc.hole(P, 2 * P) == bytes.fromhex("5553 03 00 00000008 0000000000001000"
                                               "0000000000002000")
    page = enc.pages(0, b"\x01" * P)
    assert page[:16] == bytes.fromhex("5553 02 00 00001000 0000000000000000")
    assert RECORD_HEADER.size == 16
    squeezed = enc.pages(3 * P, bytes(P), compress=True)
    assert squeezed[:4] == bytes.fromhex("5553 02 01")
    assert squeezed[16:20] == struct.pack(">I", P)  # the inflated length leads the frame
    assert zstandard.frame_content_size(squeezed[20:]) == P
    assert Encoder().abort("disk full") == bytes.fromhex("5553 05 00 00000009 0000000000000000"
                                                         ) + b"disk full"


def test_an_empty_object_is_header_and_end() -> None:
    enc = Encoder()
    blob = enc.header(0, P, T, OBJ) + enc.end({})
    header, end = decode_all(blob)
    assert isinstance(header, StreamHeader) and header.npages == 0
    assert isinstance(end, End) and (end.pages, end.bytes) == (0, 0)


def test_abort_is_a_record_and_the_last() -> None:
    recs = body()
    out = decode_all(b"".join(recs[:3]) + Encoder().abort("snapshot failed: writer \x1b[31m"))
    assert isinstance(out[-1], Abort)
    assert out[-1].reason == "snapshot failed: writer \\x1b[31m"  # made safe to print
    refused(Encoder().abort("x") + header_rec(), "after the stream's last record")


# ---- truncation: at every record boundary, and inside every record --------------------------


def test_truncated_at_every_boundary_and_inside_every_record() -> None:
    recs, _ = good_records(compress=True)
    blob = b"".join(recs)
    bounds = [0]
    for r in recs:
        bounds.append(bounds[-1] + len(r))
    cuts = set()
    for start, end in pairwise(bounds):
        cuts |= {start, start + 1, start + 8, start + 15, start + 16, start + 17,
                 (start + end) // 2, end - 1}
    cuts = sorted(c for c in cuts if c < len(blob))
    assert len(cuts) > 60
    for cut in cuts:
        with pytest.raises(StreamError) as info:
            decode_all(blob[:cut])
        msg = str(info.value)
        if cut in bounds:
            assert "ended before its" in msg, (cut, msg)
        else:
            assert "ended inside" in msg, (cut, msg)
    assert len(decode_all(blob)) == len(recs)


# ---- hostile records ------------------------------------------------------------------------


def _pages(offset: int, data: bytes, flags: int = 0) -> bytes:
    return rec(2, data, offset, flags)


def _zpages(offset: int, frame: bytes, raw_length: int) -> bytes:
    return rec(2, struct.pack(">I", raw_length) + frame, offset, FLAG_ZSTD)


Z = zstandard.ZstdCompressor(write_checksum=True)
ZPAGE = Z.compress(b"\x07" * P)

HOSTILE: list[tuple[str, Callable[[], bytes], str]] = [
    ("bad magic", lambda: b"XS" + header_rec()[2:], "bad magic"),
    ("bad magic later", lambda: header_rec() + b"UT" + _pages(0, bytes(P))[2:], "bad magic"),
    ("kind 0", lambda: rec(0, b""), "unknown record kind 0"),
    ("kind 6", lambda: header_rec() + rec(6, b""), "unknown record kind 6"),
    ("unknown flag", lambda: header_rec() + _pages(0, bytes(P), flags=2), "unknown flags"),
    ("compressed hole", lambda: header_rec() + rec(3, bytes(8), 0, FLAG_ZSTD),
     "only PAGES records may be compressed"),
    ("header offset", lambda: rec(1, msgpack.packb(header_map()), offset=4096), "offset must"),
    ("oversized header", lambda: struct.pack(">2sBBIQ", b"US", 1, 0, 1 << 20, 0),
     "over the limit"),
    ("oversized pages", lambda: header_rec() + struct.pack(">2sBBIQ", b"US", 2, 0, 64 << 20, 0),
     "over the limit"),
    ("oversized end", lambda: header_rec() + struct.pack(">2sBBIQ", b"US", 4, 0, 1 << 30, 0),
     "over the limit"),
    ("oversized abort", lambda: struct.pack(">2sBBIQ", b"US", 5, 0, 5000, 0), "over the limit"),
    ("hole payload 7", lambda: header_rec() + rec(3, bytes(7)), "must be 8 bytes"),
    ("pages first", lambda: _pages(0, bytes(P)), "before the HEADER"),
    ("hole first", lambda: rec(3, struct.pack(">Q", P)), "before the HEADER"),
    ("end first", lambda: rec(4, msgpack.packb({})), "before the HEADER"),
    ("second header", lambda: header_rec() + header_rec(), "a second HEADER"),
    # HEADER's fields
    ("header not msgpack", lambda: rec(1, b"\xc1garbage"), "not one msgpack map"),
    ("header trailing", lambda: rec(1, msgpack.packb(header_map()) + b"\x00"),
     "not one msgpack map"),
    ("header a list", lambda: rec(1, msgpack.packb([1, 2])), "must be a map"),
    ("header dup key", lambda: rec(1, b"\x82\xa6format\x01\xa6format\x02"), "duplicate"),
    ("header bytes key", lambda: rec(1, msgpack.packb({b"format": 1}, use_bin_type=True)),
     "keys must be text"),
    ("header missing", lambda: rec(1, msgpack.packb({k: v for k, v in header_map().items()
                                                     if k != "t_unix_ns"})), "missing field"),
    ("header unknown", lambda: header_rec(extra=1), "unknown field"),
    ("wrong format", lambda: header_rec(format="uffdsnap-image"), "not a uffdsnap stream"),
    ("version 2", lambda: header_rec(version=2), "unsupported stream version 2"),
    ("version text", lambda: header_rec(version="1"), "unsupported stream version"),
    ("size negative", lambda: header_rec(size=-1), "HEADER: size"),
    ("size float", lambda: header_rec(size=4096.0), "HEADER: size"),
    ("size bool", lambda: header_rec(size=True), "HEADER: size"),
    ("page size 3000", lambda: header_rec(page_size=3000), "HEADER: page_size"),
    ("page size 12288", lambda: header_rec(page_size=12288), "not a power of two"),
    ("page size 2^31", lambda: header_rec(page_size=1 << 31), "HEADER: page_size"),
    ("t negative", lambda: header_rec(t_unix_ns=-5), "t_unix_ns"),
    ("t float", lambda: header_rec(t_unix_ns=1.5e18), "t_unix_ns"),
    ("object missing", lambda: header_rec(object={"source": "x", "kind": "shm", "dev": None}),
     "missing field 'inode'"),
    ("object extra", lambda: header_rec(object={**OBJ, "size": SIZE}), "unknown field"),
    ("object control", lambda: header_rec(object={**OBJ, "source": "/dev/shm/\x1b[2J"}),
     "control characters"),
    ("object dev text", lambda: header_rec(object={**OBJ, "dev": "25"}), "object.dev"),
    ("parent", lambda: header_rec(parent={"name": "a.img", "manifest_sha256": "0" * 64}),
     "HEADER: parent: missing field 'image'"),
    ("parent later", lambda: header_rec(parent={"image": "a.img", "manifest_sha256": "0" * 64,
                                                "snapshot_unix_ns": T}), "not earlier"),
    ("too many pages", lambda: header_rec(size=(MAX_OBJECT_PAGES + 1) * P),
     "more than this receiver takes"),
    # PAGES
    ("pages unaligned", lambda: header_rec() + _pages(100, bytes(P)), "not a multiple"),
    ("pages past end", lambda: header_rec() + _pages(NPAGES * P, bytes(P)), "past the object"),
    ("pages beyond", lambda: header_rec() + _pages(1 << 40, bytes(P)), "past the object"),
    ("pages offset 2^64-4096", lambda: header_rec() + _pages((1 << 64) - P, bytes(P)),
     "past the object"),
    ("pages partial inside", lambda: header_rec() + _pages(0, bytes(P + 1)), "not whole pages"),
    ("pages empty", lambda: header_rec() + _pages(0, b""), "empty"),
    ("page repeated", lambda: header_rec() + _pages(P, b"\x01" * P) + _pages(P, b"\x01" * P),
     "already sent"),
    ("pages overlap", lambda: header_rec() + _pages(P, b"\x01" * P) + _pages(0, bytes(4 * P)),
     "the page at 0x1000 was already sent"),
    ("hole over pages", lambda: header_rec() + _pages(3 * P, b"\x01" * P)
     + rec(3, struct.pack(">Q", 8 * P), 0), "the page at 0x3000 was already sent"),
    ("pages over hole", lambda: header_rec() + rec(3, struct.pack(">Q", SIZE), 0)
     + _pages(NPAGES * P, b"\x01" * 100), "already sent"),
    ("pages over limit", lambda: rec(1, msgpack.packb(header_map(size=64 << 20)))
     + _pages(0, bytes(4 << 20) + bytes(P)), "over the limit"),
    # HOLE
    ("hole empty", lambda: header_rec() + rec(3, struct.pack(">Q", 0), 0), "empty"),
    ("hole unaligned", lambda: header_rec() + rec(3, struct.pack(">Q", P), 10), "multiple"),
    ("hole partial", lambda: header_rec() + rec(3, struct.pack(">Q", P + 5), 0), "whole pages"),
    ("hole past end", lambda: header_rec() + rec(3, struct.pack(">Q", SIZE + 1), 0), "past"),
    ("hole 2^64-1", lambda: header_rec() + rec(3, struct.pack(">Q", (1 << 64) - 1), P), "past"),
    # compressed PAGES
    ("zstd short", lambda: header_rec() + rec(2, b"\x00\x01", 0, FLAG_ZSTD), "too short"),
    ("zstd garbage", lambda: header_rec() + _zpages(0, b"this is not zstd at all", P),
     "not a zstd frame"),
    ("zstd truncated", lambda: header_rec() + _zpages(0, ZPAGE[:-6], P), "zstd"),
    ("zstd other size", lambda: header_rec() + _zpages(0, ZPAGE, 2 * P), "declares 4096"),
    ("zstd no size", lambda: header_rec()
     + _zpages(0, zstandard.ZstdCompressor(write_content_size=False).compress(bytes(P)), P),
     "declares no size"),
    ("zstd trailing", lambda: header_rec() + _zpages(0, ZPAGE + b"junk", P), "after the zstd"),
    ("zstd two frames", lambda: header_rec() + _zpages(0, ZPAGE + ZPAGE, P), "after the zstd"),
    ("zstd corrupt", lambda: header_rec()
     + _zpages(0, ZPAGE[:-1] + bytes([ZPAGE[-1] ^ 0xFF]), P), "corrupt zstd"),
    ("zstd bomb", lambda: rec(1, msgpack.packb(header_map(size=1 << 40)))
     + _zpages(0, Z.compress(bytes(8 << 20)), 8 << 20), "over the limit"),
    ("zstd unaligned", lambda: header_rec()
     + _zpages(0, Z.compress(bytes(P + 1)), P + 1), "not whole pages"),
    # END
    ("end too early", lambda: b"".join(body()[:4]) + end_rec(body()[:4]),
     "END before all the object was sent"),
    ("end pages", lambda: b"".join(body()) + end_rec(body(), pages=3), "END says 3 pages"),
    ("end bytes", lambda: b"".join(body()) + end_rec(body(), nbytes=1), "END says"),
    ("end digest", lambda: b"".join(body()) + end_rec(body(), digest="xxh3_128:" + "0" * 32),
     "checksum mismatch"),
    ("end digest form", lambda: b"".join(body()) + end_rec(body(), digest="md5:00"),
     "END: digest must look like"),
    ("end object", lambda: b"".join(body()) + end_rec(body(), object={**OBJ, "inode": 9}),
     "object differs"),
    ("end t", lambda: b"".join(body()) + end_rec(body(), snapshot_time=T + 1),
     "is not the HEADER's T"),
    ("end field", lambda: b"".join(body()) + end_rec(body(), extents=[]), "unknown field"),
    ("end pid 0", lambda: b"".join(body()) + end_rec(
        body(), processes=[{"pid": 0, "comm": "x", "mode": "attach", "mappings": 1}]), "pid"),
    ("end nan", lambda: b"".join(body()) + end_rec(body(), stats={"x": float("nan")}),
     "JSON values"),
    ("end binary", lambda: b"".join(body()) + end_rec(body(), stats={"x": b"\x00"}),
     "JSON values"),
    ("end deep", lambda: b"".join(body()) + end_rec(body(), stats={"x": [[[[[[[[[[[[[[[[[[[[
        [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}), "nested"),
    ("after end", lambda: b"".join(good_records()[0]) + header_rec(), "after the stream's last"),
]


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_hostile_streams_are_refused(build: Callable[[], bytes], needle: str) -> None:
    refused(build(), needle)


def test_an_oversized_record_is_refused_from_its_header_alone() -> None:
    dec = StreamDecoder()
    dec.receive_data(header_rec() + struct.pack(">2sBBIQ", b"US", 2, 0, 0xFFFFFFFF, 0))
    assert isinstance(dec.next_record(), StreamHeader)
    with pytest.raises(StreamError, match="over the limit"):
        dec.next_record()  # no payload has arrived, nor will be waited for


def test_a_failed_decoder_stays_failed() -> None:
    dec = StreamDecoder()
    dec.receive_data(b"XX" + bytes(14))
    with pytest.raises(StreamError) as first:
        dec.next_record()
    assert dec.phase == Phase.FAILED
    with pytest.raises(StreamError) as again:
        dec.next_record()
    assert str(again.value) == str(first.value)


def test_wanted_sizes_reads_to_the_record_in_progress() -> None:
    blob = b"".join(good_records()[0])
    dec = StreamDecoder()
    assert dec.wanted() == 16
    dec.receive_data(blob[:10])
    assert dec.wanted() == 6
    dec.receive_data(blob[10:20])
    header_len = struct.unpack(">I", blob[4:8])[0]
    assert dec.wanted() == 16 + header_len - 20


# ---- the encoder keeps a sender honest ------------------------------------------------------


def test_encoder_refuses_what_a_receiver_would() -> None:
    with pytest.raises(ValueError, match="after header"):
        Encoder().pages(0, bytes(P))
    enc = Encoder()
    enc.header(SIZE, P, T, OBJ)
    with pytest.raises(ValueError, match="comes once"):
        enc.header(SIZE, P, T, OBJ)
    with pytest.raises(ValueError, match="not a multiple"):
        enc.pages(10, bytes(P))
    with pytest.raises(ValueError, match="past the object"):
        enc.hole(NPAGES * P, 2 * P)
    enc.pages(0, bytes(2 * P))
    with pytest.raises(ValueError, match="already sent"):
        enc.hole(P, P)
    with pytest.raises(ValueError, match="before every page"):
        enc.end(FIELDS)
    with pytest.raises(ValueError, match="split them"):
        big = Encoder()
        big.header(64 << 20, P, T, OBJ)
        big.pages(0, bytes(5 << 20))
    with pytest.raises(ValueError, match="HEADER"):
        Encoder().header(SIZE, 3000, T, OBJ)
    enc.hole(2 * P, SIZE - 2 * P)
    with pytest.raises(ValueError, match="pid"):
        enc.end({"processes": [{"pid": -1, "comm": "x", "mode": "m", "mappings": 0}]})


def test_encoder_compresses_only_what_gets_smaller() -> None:
    enc = Encoder()
    enc.header(SIZE, P, T, OBJ)
    noise = random.Random(3).randbytes(P)
    assert enc.pages(0, noise, compress=True)[3] == 0  # sent raw
    assert enc.pages(P, bytes(P), compress=True)[3] == FLAG_ZSTD
    assert enc.bytes_sent == 2 * P


# ---- coverage, addresses, the reply ---------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.lists(st.tuples(st.integers(0, 2999), st.integers(1, 400)),
                                       max_size=30))
def test_coverage_agrees_with_a_set(npages: int, ranges: list[tuple[int, int]]) -> None:
    cov, model = Coverage(npages), set()
    for first, count in ranges:
        if first + count > npages:
            with pytest.raises(ValueError):
                cov.cover(first, count)
            continue
        want = set(range(first, first + count))
        clash = cov.cover(first, count)
        if want & model:
            assert clash == min(want & model)
            return  # the set is now partly filled: a stream is dead after a clash
        assert clash is None
        model |= want
        assert cov.covered == len(model)
        missing = sorted(set(range(npages)) - model)
        assert cov.first_missing() == (missing[0] if missing else None)


def test_coverage_of_a_huge_object_costs_what_is_touched() -> None:
    cov = Coverage(MAX_OBJECT_PAGES)  # 256 MiB of bitmap, reserved, not touched
    assert cov.cover(MAX_OBJECT_PAGES - 10, 10) is None
    assert cov.cover(0, 1 << 24) is None  # a 64 GiB hole: 2 MiB of bitmap
    assert cov.first_missing() == 1 << 24
    assert cov.cover(5, 1) == 5
    cov.close()


@pytest.mark.parametrize("text,listen,want", [
    ("-", False, "-"),
    ("unix:/run/x.sock", False, "unix:/run/x.sock"),
    ("tcp://198.18.0.2:7000", False, "tcp://198.18.0.2:7000"),
    ("198.18.0.2:7000", False, "tcp://198.18.0.2:7000"),
    ("localhost:1", False, "tcp://localhost:1"),
    ("[::1]:7000", False, "tcp://[::1]:7000"),
    ("tcp://[fe80::1]:65535", False, "tcp://[fe80::1]:65535"),
    ("127.0.0.1:0", True, "tcp://127.0.0.1:0"),
])
def test_addresses(text: str, listen: bool, want: str) -> None:
    assert str(parse_address(text, listen=listen)) == want


@pytest.mark.parametrize("text,needle", [
    ("", "not an address"), ("host", "not an address"), ("unix:", "needs a socket path"),
    ("unix:/x\0y", "NUL"), ("unix:/" + "x" * 120, "longer than"), ("udp://h:1", "scheme"),
    ("::1:7000", "brackets"), ("[::1]7000", "brackets"), ("[zz]:1", "IPv6"),
    ("h:65536", "port"), ("h:-1", "port"), ("h:http", "port"), ("h:0", "port 0"),
    (":7000", "host"), ("a b:1", "host"),
])
def test_bad_addresses(text: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        parse_address(text)


def test_reply_lines() -> None:
    sha = "ab" * 32
    assert encode_reply(Reply(True, manifest_sha256=sha)) == f"ok {sha}\n".encode()
    assert decode_reply(f"ok {sha}\n".encode()) == Reply(True, manifest_sha256=sha)
    line = encode_reply(Reply(False, error="disk full\nand \x1b[31mred"))
    assert line == b"error: disk full\\x0aand \\x1b[31mred\n"
    assert decode_reply(line) == Reply(False, error="disk full\\x0aand \\x1b[31mred")
    named = Reply(True, manifest_sha256=sha, image="snapshot-1.img")
    assert encode_reply(named) == f"ok {sha} snapshot-1.img\n".encode()
    assert decode_reply(encode_reply(named)) == named
    # a name a parent reference could not carry safely is left out, never sent
    unsafe = Reply(True, manifest_sha256=sha, image="a b/../c")
    assert encode_reply(unsafe) == f"ok {sha}\n".encode()
    for bad in (b"ok\n", b"ok 1234\n", b"fine\n", b"ok " + sha.encode(), b"x" * 5000 + b"\n",
                f"ok {sha} ../x\n".encode(), f"ok {sha} a b\n".encode()):
        with pytest.raises(StreamError):
            decode_reply(bad)


def test_kinds_are_numbered_by_the_format() -> None:
    assert [(k.name, k.value) for k in Kind] == [("HEADER", 1), ("PAGES", 2), ("HOLE", 3),
                                                 ("END", 4), ("ABORT", 5)]
