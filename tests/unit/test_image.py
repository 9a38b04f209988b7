"""The image + manifest format: writer, atomic publish, hostile manifests, verify, restore, CLI.

Everything runs on real files, on the test's tmp dir (a disk file system) and on /dev/shm (tmpfs,
where restored objects live).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.image import (
    FORMAT_VERSION,
    CorruptImage,
    ImageError,
    ImageWriter,
    Manifest,
    extent_checksum,
    info,
    load_manifest,
    manifest_path,
    restore,
    verify,
)

P = 4096
T_NS = 1_700_000_000_123_456_789
FIELDS: dict[str, Any] = {
    "object": {"source": "/dev/shm/test", "kind": "shm", "dev": 25, "inode": 1234},
    "snapshot_time": T_NS,
    "processes": [{"pid": 4242, "comm": "writer", "mode": "attach", "mappings": 2}],
    "stats": {"faults": 3, "pause_ms": 0.25},
}


@pytest.fixture(params=["disk", "shm"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on a disk file system, then one on tmpfs (/dev/shm)."""
    if request.param == "disk":
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="uffdsnap-test-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_object(pages: int, tail: int = 0, seed: int = 1) -> tuple[bytes, list[tuple[int, int]]]:
    """Object bytes with random pages, zero pages and holes; returns (bytes, saved ranges).

    Holes are ranges a coordinator would skip (SEEK_HOLE): not written, not recorded.
    """
    rng = random.Random(seed)
    data = bytearray()
    saved: list[tuple[int, int]] = []
    for i in range(pages):
        kind = rng.choice(["data", "data", "zero", "hole"])
        if kind == "data":
            data += rng.randbytes(P)
        else:
            data += bytes(P)
        if kind != "hole":
            saved.append((i * P, P))
    if tail:
        data += rng.randbytes(tail)
        saved.append((pages * P, tail))
    return bytes(data), saved


def write_image(path: Path, data: bytes, saved: list[tuple[int, int]],
                fields: dict[str, Any] | None = None) -> Manifest:
    with ImageWriter(str(path), len(data), P) as w:
        for off, n in saved:
            w.write(off, data[off:off + n])
            w.record_extent(off, n, extent_checksum(data[off:off + n]))
        return w.publish(fields or FIELDS)


def simple_image(d: Path, name: str = "out.img") -> tuple[Path, bytes, Manifest]:
    data, saved = make_object(64, tail=100)
    path = d / name
    return path, data, write_image(path, data, saved)


def flip(path: Path, offset: int, value: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF if value is None else value]))


# ---------------------------------------------------------------------------------------------
# Writer


def test_round_trip_is_exact_and_sparse(where: Path) -> None:
    data, saved = make_object(256, tail=123)
    path = where / "out.img"
    m = write_image(path, data, saved)
    assert path.read_bytes() == data
    st_ = path.stat()
    assert st_.st_size == len(data)
    assert st_.st_blocks * 512 < len(data)  # zero pages and holes were not written
    assert m.object.size == len(data) and m.object.page_size == P
    assert m.snapshot_unix_ns == T_NS
    assert m.snapshot_iso8601 == "2023-11-14T22:13:20.123456789Z"
    assert m.processes[0]["pid"] == 4242 and m.stats["faults"] == 3
    assert load_manifest(manifest_path(str(path))) == m
    report = verify(str(path))
    assert report.ok, report.problem
    assert report.bytes_checked == sum(n for _, n in saved)


def test_zero_pages_are_holes(where: Path) -> None:
    path = where / "z.img"
    with ImageWriter(str(path), 16 * P, P) as w:
        w.write(0, bytes(8 * P))
        w.write(8 * P, memoryview(bytes(P) + b"\x01" + bytes(P - 1)))
        assert os.pread(w.fd, 2 * P, 8 * P) == bytes(P) + b"\x01" + bytes(P - 1)
        assert os.pread(w.fd, P, 0) == bytes(P)
        w.record_extent(0, 16 * P, extent_checksum(os.pread(w.fd, 16 * P, 0)))
        w.publish(FIELDS)
    with open(path, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 9 * P  # only the page with the 1
    assert verify(str(path)).ok


def test_concurrent_writers_and_coalescing(where: Path) -> None:
    """Fault-handler-like single pages and scanner-like chunks from several threads."""
    pages = 1024
    data = random.Random(7).randbytes(pages * P)
    path = where / "t.img"
    with ImageWriter(str(path), len(data), P) as w:
        def save(indexes: list[int]) -> None:
            for i in indexes:
                w.write(i * P, data[i * P:(i + 1) * P])
                w.record_extent(i * P, P, extent_checksum(data[i * P:(i + 1) * P]))

        order = list(range(pages))
        random.Random(3).shuffle(order)
        threads = [threading.Thread(target=save, args=(order[k::8],)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = w.publish(FIELDS)
    assert path.read_bytes() == data
    assert len(m.extents) == 4  # 1024 single pages merged into 1 MiB extents
    assert verify(str(path)).ok


def test_overlapping_saves_of_identical_data_are_merged(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(32 * P)
    path = tmp_path / "o.img"
    with ImageWriter(str(path), len(data), P) as w:
        w.write(0, data)
        w.record_extent(0, len(data), extent_checksum(data))
        w.record_extent(3 * P, P, extent_checksum(data[3 * P:4 * P]))  # a fault page inside
        w.record_extent(0, len(data), extent_checksum(data))  # and a duplicate
        m = w.publish(FIELDS)
    assert [(e.offset, e.length) for e in m.extents] == [(0, len(data))]
    assert verify(str(path)).ok


def test_page_saved_twice_with_different_contents_fails(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    a, b = b"\x01" * P, b"\x02" * P
    with pytest.raises(SnapshotFailed, match="more than once"), \
            ImageWriter(str(path), 4 * P, P) as w:
        w.write(0, a)
        w.record_extent(0, P, extent_checksum(a))
        w.write(0, b)
        w.record_extent(0, P, extent_checksum(b))
        w.publish(FIELDS)
    assert os.listdir(tmp_path) == []


def test_data_outside_extents_is_not_published(tmp_path: Path) -> None:
    path = tmp_path / "x.img"
    with pytest.raises(SnapshotFailed, match=f"offset {2 * P}"), \
            ImageWriter(str(path), 4 * P, P) as w:
        w.write(2 * P, b"\x07" * P)  # written, never recorded
        w.publish(FIELDS)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_misuse(tmp_path: Path) -> None:
    with ImageWriter(str(tmp_path / "m.img"), 4 * P, P) as w:
        with pytest.raises(ValueError):
            w.write(1, b"x")  # unaligned
        with pytest.raises(ValueError):
            w.write(3 * P, bytes(2 * P))  # past the end
        with pytest.raises(ValueError):
            w.record_extent(0, 100, extent_checksum(b"x"))  # partial page not at the end
        with pytest.raises(ValueError):
            w.record_extent(0, P, "md5:abc")
        with pytest.raises(ValueError, match="unknown manifest field"):
            w.publish({**FIELDS, "colour": "blue"})
    with ImageWriter(str(tmp_path / "n.img"), 4 * P, P) as w, \
            pytest.raises(ValueError, match="invalid manifest fields"):
        w.publish({**FIELDS, "stats": {"nan": float("nan")}})
    with pytest.raises(ValueError):
        ImageWriter(str(tmp_path / "p.img"), 4 * P, 3000)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Atomic publish


def test_no_final_name_until_published(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    w = ImageWriter(str(path), 4 * P, P)
    w.write(0, b"\x05" * P)
    w.record_extent(0, P, extent_checksum(b"\x05" * P))
    names = os.listdir(tmp_path)
    assert len(names) == 1 and names[0].startswith(".a.img.") and names[0].endswith(".tmp")
    assert not path.exists() and not Path(manifest_path(str(path))).exists()
    w.publish(FIELDS)
    assert sorted(os.listdir(tmp_path)) == ["a.img", "a.img.json"]
    assert (path.stat().st_mode & 0o777) == 0o600  # memory contents: owner only


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ImageWriter(str(tmp_path / "a.img"), 4 * P, P) as w:
        w.write(0, b"\x05" * P)
        raise RuntimeError("coordinator gave up")
    assert os.listdir(tmp_path) == []
    w.abort()  # idempotent


def test_existing_image_is_protected(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        ImageWriter(str(path), 4 * P, P)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["a.img"]


def test_image_appearing_during_the_snapshot_is_protected(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    with pytest.raises(UserError, match="already exists"), \
            ImageWriter(str(path), 4 * P, P) as w:
        path.write_bytes(b"someone else's")
        w.publish(FIELDS)
    assert path.read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["a.img"]  # no manifest, no temporaries


def test_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"old")
    Path(manifest_path(str(path))).write_text("old")
    with ImageWriter(str(path), 4 * P, P, overwrite=True) as w:
        w.publish(FIELDS)
    assert path.stat().st_size == 4 * P and verify(str(path)).ok


def test_directory_missing_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ImageWriter(str(tmp_path / "nope" / "a.img"), P, P)


# ---------------------------------------------------------------------------------------------
# Verify


def test_verify_flipped_byte_in_extent(where: Path) -> None:
    path, data, m = simple_image(where)
    bad = m.extents[len(m.extents) // 2]
    flip(path, bad.offset + 17)
    report = verify(str(path))
    assert not report.ok
    assert report.bad_extents == [bad.offset] and report.bad_extent_count == 1
    assert f"offset {bad.offset}" in (report.problem or "")


def test_verify_nonzero_byte_in_a_hole(where: Path) -> None:
    data = b"\x09" * P + bytes(6 * P) + b"\x09" * P
    path = where / "h.img"
    write_image(path, data, [(0, P), (7 * P, P)])
    flip(path, 3 * P + 5, 1)
    report = verify(str(path))
    assert not report.ok and report.bad_extents == []
    assert report.nonzero_outside == [3 * P + 5]
    assert f"offset {3 * P + 5}" in (report.problem or "")


def test_verify_truncated_and_extended_image(tmp_path: Path) -> None:
    path, _, m = simple_image(tmp_path)
    os.truncate(path, m.object.size - P)
    report = verify(str(path))
    assert not report.ok and "truncated" in (report.problem or "")
    os.truncate(path, m.object.size + 1)
    assert not verify(str(path)).ok


def test_verify_missing_pieces(tmp_path: Path) -> None:
    path, _, _ = simple_image(tmp_path)
    os.unlink(path)
    with pytest.raises(ImageError, match="image not found"):
        verify(str(path))
    with pytest.raises(ImageError, match="no such image"):
        verify(str(tmp_path / "none.img"))
    other = tmp_path / "plain.bin"
    other.write_bytes(b"x")
    with pytest.raises(ImageError, match="not a uffdsnap image"):
        verify(str(other))
    os.mkfifo(tmp_path / "fifo.img")
    Path(manifest_path(str(tmp_path / "fifo.img"))).write_text(
        Path(manifest_path(str(path))).read_text())
    with pytest.raises(ImageError, match="not a regular file"):
        verify(str(tmp_path / "fifo.img"))  # must not block


def test_verify_reads_in_bounded_pieces(tmp_path: Path) -> None:
    """A 9 MiB extent (bigger than the 4 MiB read piece) still verifies, and a flip is found."""
    data = random.Random(2).randbytes(9 << 20)
    path = tmp_path / "big.img"
    write_image(path, data, [(0, len(data))])
    assert verify(str(path)).ok
    flip(path, (9 << 20) - 1)
    assert verify(str(path)).bad_extents == [0]


# ---------------------------------------------------------------------------------------------
# Hostile manifests


def valid_manifest(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path, _, _ = simple_image(tmp_path)
    mpath = Path(manifest_path(str(path)))
    return mpath, json.loads(mpath.read_text())


def _set(d: dict[str, Any], keys: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    target: Any = d
    for k in keys[:-1]:
        target = target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


_DELETE = object()

BAD_FIELDS: list[tuple[tuple[Any, ...], Any]] = [
    (("format",), "qcow2"),
    (("format_version",), 2),  # a delta without its parent
    (("format_version",), 3),
    (("parent",), {"image": "a.img", "manifest_sha256": "0" * 64, "snapshot_unix_ns": 0}),
    (("format_version",), "1"),
    (("format_version",), True),
    (("object", "size"), -1),
    (("object", "size"), 1.5),
    (("object", "size"), "4096"),
    (("object", "size"), 10**30),
    (("object", "size"), 1),  # extents now run past the end
    (("object", "page_size"), 3000),
    (("object", "page_size"), 0),
    (("object", "page_size"), 1 << 40),
    (("object", "source"), 7),
    (("object", "source"), "x\x1b[2Jy"),  # terminal escape
    (("object", "inode"), -5),
    (("object", "inode"), _DELETE),
    (("object", "colour"), "blue"),
    (("snapshot_time", "unix_ns"), -1),
    (("snapshot_time", "unix_ns"), 10**40),
    (("snapshot_time", "iso8601"), "yesterday"),
    (("processes",), {"pid": 1}),
    (("processes", 0, "pid"), 0),
    (("processes", 0, "pid"), "1"),
    (("processes", 0, "comm"), None),
    (("processes", 0, "mappings"), -1),
    (("processes", 0, "mode"), _DELETE),
    (("stats",), []),
    (("extents",), {}),
    (("extents", 0), [0, 4096, "xxh3_64:0000000000000000"]),
    (("extents", 0, "offset"), 1),  # unaligned
    (("extents", 0, "offset"), -4096),
    (("extents", 0, "length"), 0),
    (("extents", 0, "length"), 100),  # partial page in the middle
    (("extents", 0, "length"), 2**62),  # past the end
    (("extents", 0, "checksum"), "md5:d41d8cd98f00b204e9800998ecf8427e"),
    (("extents", 0, "checksum"), "xxh3_64:XYZ"),
    (("extents", 1, "offset"), 0),  # overlaps extent 0
    (("created_by", "tool"), ["uffdsnap"]),
    (("created_by",), _DELETE),
    (("surprise",), 1),
]


@pytest.mark.parametrize(("keys", "value"), BAD_FIELDS, ids=lambda x: repr(x)[:40])
def test_bad_field_is_an_image_error(tmp_path: Path, keys: tuple[Any, ...], value: Any) -> None:
    mpath, good = valid_manifest(tmp_path)
    mpath.write_text(json.dumps(_set(good, keys, value)))
    with pytest.raises(ImageError) as e:
        load_manifest(str(mpath))
    assert "\n" not in str(e.value)


def test_unsorted_extents_are_refused(tmp_path: Path) -> None:
    mpath, good = valid_manifest(tmp_path)
    good["extents"].reverse()
    mpath.write_text(json.dumps(good))
    with pytest.raises(ImageError, match="overlaps or precedes"):
        load_manifest(str(mpath))


@pytest.mark.parametrize("raw", [
    b"", b"{", b"not json", b"\xff\xfe\x00garbage", b"[]", b"null", b'"uffdsnap-image"',
    b'{"format": NaN}', b'{"format": Infinity}', b'{"stats": 1e999}',
    b'{"format": "uffdsnap-image", "format": "uffdsnap-image"}',
    b"[" * 100_000 + b"]" * 100_000, b'{"size": ' + b"9" * 5000 + b"}",
], ids=lambda r: repr(r[:24]))
def test_garbage_manifest_is_an_image_error(tmp_path: Path, raw: bytes) -> None:
    mpath = tmp_path / "g.img.json"
    mpath.write_bytes(raw)
    with pytest.raises(ImageError) as e:
        load_manifest(str(mpath))
    assert "\n" not in str(e.value)


def test_manifest_that_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "d.img.json").mkdir()
    with pytest.raises(ImageError):
        load_manifest(str(tmp_path / "d.img.json"))
    os.mkfifo(tmp_path / "f.img.json")
    with pytest.raises(ImageError, match="not a regular file"):
        load_manifest(str(tmp_path / "f.img.json"))  # must not block


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def good_manifest() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        return valid_manifest(Path(d))[1]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=_json)
def test_fuzzed_manifest_never_crashes(tmp_path: Path, good_manifest: dict[str, Any],
                                       data: st.DataObject, value: Any) -> None:
    """Any JSON value at any place: either a valid Manifest or one ImageError, nothing else."""
    keys = data.draw(st.sampled_from(list(_paths(good_manifest))))
    mpath = tmp_path / "f.img.json"
    mpath.write_text(json.dumps(_set(good_manifest, keys, value)))
    try:
        m = load_manifest(str(mpath))
    except ImageError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(m, Manifest) and m.format_version == FORMAT_VERSION


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_random_bytes_manifest(tmp_path: Path, raw: bytes) -> None:
    mpath = tmp_path / "r.img.json"
    mpath.write_bytes(raw)
    with pytest.raises(ImageError):
        load_manifest(str(mpath))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=12),
       tail=st.integers(0, P - 1))
def test_valid_extent_layouts_round_trip(tmp_path: Path, gaps: list[tuple[int, int]],
                                         tail: int) -> None:
    """Sorted, disjoint, page-aligned extents (last one possibly partial) always load back."""
    extents: list[dict[str, Any]] = []
    pos = 0
    for gap, n in gaps:
        pos += gap * P
        extents.append({"offset": pos, "length": n * P, "checksum": "xxh3_64:0123456789abcdef"})
        pos += n * P
    size = pos + tail
    if extents and tail and not gaps[-1][0]:
        extents[-1]["length"] += tail  # the last extent reaches the partial last page
    d = {"format": "uffdsnap-image", "format_version": 1,
         "created_by": {"tool": "uffdsnap", "version": "0.1.0"},
         "object": {"size": size, "page_size": P, "source": "s", "kind": "k", "dev": None,
                    "inode": None},
         "snapshot_time": {"unix_ns": 0, "iso8601": "1970-01-01T00:00:00.000000000Z"},
         "processes": [], "stats": {}, "extents": extents}
    m = Manifest.from_dict(d)
    mpath = tmp_path / "v.img.json"
    mpath.write_text(m.to_json())
    assert load_manifest(str(mpath)) == m
    assert json.loads(m.to_json()) == d


# ---------------------------------------------------------------------------------------------
# Restore and info


def test_restore_is_byte_identical_and_sparse(tmp_path: Path, shm: Path) -> None:
    data, saved = make_object(256, tail=77)
    path = tmp_path / "r.img"
    write_image(path, data, saved)
    to = shm / "restored"
    report = restore(str(path), str(to))
    assert to.read_bytes() == data
    assert to.stat().st_blocks * 512 < len(data)
    assert report.size == len(data) and not report.replaced
    assert report.data_bytes < len(data)
    assert sorted(os.listdir(shm)) == ["restored"]  # no temporaries left


def test_restore_existing_needs_force_and_resizes_exactly(tmp_path: Path, shm: Path) -> None:
    path, data, _ = simple_image(tmp_path)
    to = shm / "target"
    to.write_bytes(b"\xee" * (len(data) * 2))
    with pytest.raises(UserError, match="already exists"):
        restore(str(path), str(to))
    assert to.read_bytes() == b"\xee" * (len(data) * 2)
    ino = to.stat().st_ino
    assert restore(str(path), str(to), force=True).replaced
    assert to.read_bytes() == data and to.stat().st_ino == ino  # in place
    to.write_bytes(b"\xee" * 10)
    restore(str(path), str(to), force=True)
    assert to.read_bytes() == data


def test_restore_refuses_corrupt_image(tmp_path: Path, shm: Path) -> None:
    path, _, m = simple_image(tmp_path)
    flip(path, m.extents[0].offset)
    with pytest.raises(CorruptImage, match="refusing"):
        restore(str(path), str(shm / "t"))
    os.truncate(path, 3)
    with pytest.raises(CorruptImage, match="truncated"):
        restore(str(path), str(shm / "t"))
    assert os.listdir(shm) == []


def test_restore_to_missing_directory(tmp_path: Path) -> None:
    path, _, _ = simple_image(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        restore(str(path), str(tmp_path / "nope" / "t"))


def test_info(tmp_path: Path) -> None:
    path, data, m = simple_image(tmp_path)
    d = info(str(path))
    assert d["image_exists"] and d["image_size"] == len(data)
    assert d["object"]["size"] == len(data) and d["extents"] == len(m.extents)
    assert d["extent_bytes"] == m.extent_bytes
    assert d["snapshot_time"]["unix_ns"] == T_NS and d["processes"][0]["comm"] == "writer"
    os.unlink(path)
    d = info(str(path))
    assert not d["image_exists"] and d["image_size"] is None


# ---------------------------------------------------------------------------------------------
# CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uffdsnap", *args], capture_output=True,
                          text=True, timeout=60)


def assert_one_line_error(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("uffdsnap: error: ")


def test_cli_verify(tmp_path: Path) -> None:
    path, _, m = simple_image(tmp_path)
    r = cli("verify", str(path))
    assert r.returncode == 0 and "OK" in r.stdout and r.stderr == ""
    r = cli("verify", str(path), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True

    bad = m.extents[1]
    flip(path, bad.offset + 1)
    r = cli("verify", str(path))
    assert r.returncode == 1
    assert_one_line_error(r)
    assert f"offset {bad.offset}" in r.stderr
    r = cli("verify", str(path), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["bad_extents"] == [bad.offset]

    os.truncate(path, 10)
    r = cli("verify", str(path))
    assert r.returncode == 1 and "truncated" in r.stderr
    assert_one_line_error(r)


@pytest.mark.parametrize("case", ["missing", "not-an-image", "garbage-manifest",
                                  "hostile-manifest", "manifest-given", "no-args"])
def test_cli_bad_input(tmp_path: Path, case: str) -> None:
    path, _, _ = simple_image(tmp_path)
    mpath = Path(manifest_path(str(path)))
    args = ["verify", str(path)]
    if case == "missing":
        args = ["verify", str(tmp_path / "nothing.img")]
    elif case == "not-an-image":
        (tmp_path / "plain").write_bytes(b"hello")
        args = ["verify", str(tmp_path / "plain")]
    elif case == "garbage-manifest":
        mpath.write_bytes(b"\x00\x01garbage")
    elif case == "hostile-manifest":
        d = json.loads(mpath.read_text())
        d["extents"][0]["length"] = 10**100
        mpath.write_text(json.dumps(d))
    elif case == "manifest-given":
        args = ["verify", str(mpath)]
    elif case == "no-args":
        args = ["verify"]
    for command in (args, ["info", *args[1:]], ["restore", *args[1:], "--to",
                                                str(tmp_path / "r")]):
        r = cli(*command)
        assert r.returncode == 2, (command, r.stderr)
        assert_one_line_error(r)
        r = cli(*command, "--json")
        if case != "no-args":
            assert json.loads(r.stdout)["ok"] is False
    assert not (tmp_path / "r").exists()


def test_cli_info_and_restore(tmp_path: Path, shm: Path) -> None:
    path, data, m = simple_image(tmp_path)
    r = cli("info", str(path))
    assert r.returncode == 0, r.stderr
    assert "2023-11-14T22:13:20.123456789Z" in r.stdout and "writer" in r.stdout
    d = json.loads(cli("info", str(path), "--json").stdout)
    assert d["ok"] and d["extents"] == len(m.extents) and d["object"]["size"] == len(data)

    to = shm / "obj"
    r = cli("restore", str(path), "--to", str(to))
    assert r.returncode == 0, r.stderr
    assert to.read_bytes() == data
    r = cli("restore", str(path), "--to", str(to))
    assert r.returncode == 2 and "--force" in r.stderr
    assert_one_line_error(r)
    r = cli("restore", str(path), "--to", str(to), "--force", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["replaced"] is True
    flip(path, m.extents[0].offset)
    r = cli("restore", str(path), "--to", str(shm / "other"))
    assert r.returncode == 1 and "corrupt" in r.stderr
    assert_one_line_error(r)


def test_cli_info_escapes_hostile_stats(tmp_path: Path) -> None:
    path = tmp_path / "s.img"
    write_image(path, bytes(P), [], {**FIELDS, "stats": {"evil\x1b[2J": "\x1b]0;pwned\x07"}})
    r = cli("info", str(path))
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\\u001b" in r.stdout


def test_snapshot_time_is_now_like(tmp_path: Path) -> None:
    """A real time.time_ns() passes validation and reads back exactly."""
    now = time.time_ns()
    path = tmp_path / "n.img"
    m = write_image(path, bytes(P), [], {**FIELDS, "snapshot_time": {"unix_ns": now}})
    assert load_manifest(manifest_path(str(path))).snapshot_unix_ns == now == m.snapshot_unix_ns


def test_empty_object_round_trip(tmp_path: Path, shm: Path) -> None:
    path = tmp_path / "e.img"
    write_image(path, b"", [])
    assert verify(str(path)).ok
    restore(str(path), str(shm / "e"))
    assert (shm / "e").read_bytes() == b""


def test_restore_onto_itself_is_refused(tmp_path: Path) -> None:
    path, data, _ = simple_image(tmp_path)
    for target in (path, Path(manifest_path(str(path)))):
        with pytest.raises(UserError, match="itself"):
            restore(str(path), str(target), force=True)
    assert path.read_bytes() == data and verify(str(path)).ok


def test_write_after_abort_is_refused(tmp_path: Path) -> None:
    w = ImageWriter(str(tmp_path / "w.img"), 4 * P, P)
    w.abort()
    with pytest.raises(ValueError, match="aborted"):
        w.write(0, b"\x01" * P)
    with pytest.raises(ValueError, match="aborted"):
        w.record_extent(0, P, extent_checksum(b"\x01" * P))


def test_stale_manifest_blocks_a_new_image(tmp_path: Path) -> None:
    Path(manifest_path(str(tmp_path / "s.img"))).write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        ImageWriter(str(tmp_path / "s.img"), P, P)


def test_force_replaces_only_regular_files(tmp_path: Path) -> None:
    """--force never replaces a FIFO, a directory or a symbolic link (nor writes through one):
    the publish fails in one line and leaves each of them, and the link's target, as it was."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not yours")
    specials = {"fifo.img": os.mkfifo, "dir.img": os.mkdir,
                "link.img": lambda p: os.symlink(target, p)}
    for name, make in specials.items():
        path = tmp_path / name
        make(path)
        kind = os.lstat(path).st_mode
        with pytest.raises(UserError, match="symbolic link|not a regular file|a directory"), \
                ImageWriter(str(path), 4 * P, P, overwrite=True) as w:
            w.publish(FIELDS)
        assert os.lstat(path).st_mode == kind
    assert target.read_bytes() == b"not yours"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*specials, "elsewhere"])


def test_restore_force_never_writes_through_a_symlink(tmp_path: Path, shm: Path) -> None:
    path, _data, _ = simple_image(tmp_path)
    victim = shm / "victim"
    victim.write_bytes(b"\xee" * 10)
    link = shm / "link"
    link.symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        restore(str(path), str(link), force=True)
    assert victim.read_bytes() == b"\xee" * 10 and link.is_symlink()
    fifo = shm / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        restore(str(path), str(fifo), force=True)
