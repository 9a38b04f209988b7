"""Delta images and chains: a delta's bytes outside its extents are its parent's.

Chains are built with ImageWriter on real files (the test's tmp dir, and /dev/shm for restored
objects); restore, verify and compact are checked against a model of the object's bytes at
each T, and every rule that makes a chain trustworthy is broken on purpose and must be refused
in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from chainutil import (
    OBJECT,
    T0,
    Chain,
    P,
    add_delta,
    edit_manifest,
    fields,
    parent_ref,
    random_chain,
    root,
    write_image,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uffdsnap.image._chain as chain_module
from uffdsnap.errors import UserError
from uffdsnap.image import (
    DELTA_FORMAT_VERSION,
    FORMAT_VERSION,
    CorruptImage,
    Extent,
    ExtentHash,
    ImageError,
    ImageWriter,
    Link,
    Manifest,
    ObjectInfo,
    ParentRef,
    compact,
    extent_checksum,
    info,
    load_chain,
    load_manifest,
    manifest_path,
    manifest_sha256,
    restore,
    verify,
)
from uffdsnap.image._chain import segments
from uffdsnap.image._reader import ChainSources
from uffdsnap.stream import Encoder, Output, ReceiveResult, encode_image, receive_stream


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


def check_chain(chain: Chain, d: Path) -> None:
    """restore == model, verify OK, compact == restore and verifies, at the last link."""
    report = verify(str(chain.last))
    assert report.ok, report.problem
    assert [Path(c["image"]).name for c in report.chain] == [p.name for p in chain.paths]
    to = d / "restored"
    r = restore(str(chain.last), str(to))
    assert to.read_bytes() == chain.states[-1]
    assert r.links == len(chain.paths)
    full = d / "full.img"
    c = compact(str(chain.last), str(full))
    assert full.read_bytes() == chain.states[-1]
    assert verify(str(full)).ok
    m = load_manifest(manifest_path(str(full)))
    assert m.format_version == FORMAT_VERSION and m.parent is None
    assert m.snapshot_unix_ns == load_manifest(manifest_path(str(chain.last))).snapshot_unix_ns
    assert [x["manifest_sha256"] for x in m.stats["compacted_from"]] == \
        [manifest_sha256(str(p)) for p in chain.paths]
    assert c.manifest_sha256 == manifest_sha256(str(full))
    for e in m.extents:  # zero runs became holes: every extent holds a nonzero page
        data = chain.states[-1][e.offset:e.end]
        assert any(data[i:i + P] != bytes(len(data[i:i + P])) for i in range(0, len(data), P))
    os.unlink(to)
    for p in (full, Path(manifest_path(str(full)))):
        os.unlink(p)


# ---------------------------------------------------------------------------------------------
# Chains restore to the model


_changes = st.lists(st.tuples(st.integers(0, 16), st.sampled_from(["data", "zero"])),
                    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(["data", "zero", "hole"]), min_size=1, max_size=16),
       tail=st.sampled_from([0, 1, 100, P - 1]), deltas=st.lists(_changes, max_size=5),
       seed=st.integers(0, 2**32))
def test_restore_of_a_chain_is_the_model(kinds: list[str], tail: int,
                                         deltas: list[list[tuple[int, str]]],
                                         seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            tempfile.TemporaryDirectory(dir="/dev/shm") as out:
        rng = random.Random(seed)
        chain = root(Path(tmp), rng, kinds, tail)
        for changes in deltas:
            add_delta(chain, rng, changes)
        check_chain(chain, Path(out))
        if len(chain.paths) > 1 and chain.states[-1] != chain.states[-2]:
            # the control: the parent's state is not the delta's, and the check tells them apart
            restore(str(chain.paths[-2]), str(Path(out) / "parent"))
            assert (Path(out) / "parent").read_bytes() != chain.states[-1]


def test_ten_links(tmp_path: Path, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = random_chain(tmp_path, seed=10, links=10, pages=64)
    check_chain(chain, shm)
    monkeypatch.setattr(ChainSources, "MAX_OPEN", 2)  # images closed and reopened as needed
    restore(str(chain.last), str(shm / "few-fds"))
    assert (shm / "few-fds").read_bytes() == chain.states[-1]
    for i, path in enumerate(chain.paths):  # every link restores to its own T's state
        restore(str(path), str(shm / f"at{i}"))
        assert (shm / f"at{i}").read_bytes() == chain.states[i]


def test_a_zero_extent_means_zeros_and_a_gap_means_the_parent(tmp_path: Path,
                                                              shm: Path) -> None:
    ones = b"\x01" * P
    write_image(tmp_path / "a.img", 3 * P, [(0, ones), (P, ones), (2 * P, ones)], T0)
    write_image(tmp_path / "b.img", 3 * P, [(P, bytes(P))], T0 + 1,
                parent_ref(tmp_path / "a.img"))
    restore(str(tmp_path / "b.img"), str(shm / "b"))
    assert (shm / "b").read_bytes() == ones + bytes(P) + ones
    assert (shm / "b").stat().st_blocks * 512 <= 2 * P  # the zero page stayed a hole
    # the control: without that extent, the page is the parent's
    write_image(tmp_path / "c.img", 3 * P, [], T0 + 1, parent_ref(tmp_path / "a.img"))
    restore(str(tmp_path / "c.img"), str(shm / "c"))
    assert (shm / "c").read_bytes() == ones * 3


def test_delta_manifest_is_version_2_and_names_its_parent(tmp_path: Path) -> None:
    chain = random_chain(tmp_path, seed=1, links=2)
    m = load_manifest(manifest_path(str(chain.last)))
    assert m.format_version == DELTA_FORMAT_VERSION and m.is_delta
    assert m.parent == ParentRef("n0.img", manifest_sha256(str(chain.paths[0])), T0)
    assert load_manifest(manifest_path(str(chain.paths[0]))).format_version == FORMAT_VERSION
    raw = Path(manifest_path(str(chain.paths[0]))).read_bytes()
    assert m.parent.manifest_sha256 == hashlib.sha256(raw).hexdigest()


def test_publish_takes_a_parent_ref(tmp_path: Path) -> None:
    write_image(tmp_path / "a.img", P, [(0, b"\x05" * P)], T0)
    ref = ParentRef("a.img", manifest_sha256(str(tmp_path / "a.img")), T0)
    with ImageWriter(str(tmp_path / "b.img"), P, P) as w:
        m = w.publish({**fields(T0 + 5), "parent": ref})
    assert m.parent == ref and verify(str(tmp_path / "b.img")).ok


@pytest.mark.parametrize("parent", [
    {"image": "a.img", "manifest_sha256": "0" * 63, "snapshot_unix_ns": 0},
    {"image": "a.img", "manifest_sha256": "A" * 64, "snapshot_unix_ns": 0},
    {"image": "", "manifest_sha256": "0" * 64, "snapshot_unix_ns": 0},
    {"image": "a\x1b.img", "manifest_sha256": "0" * 64, "snapshot_unix_ns": 0},
    {"image": "a.img", "manifest_sha256": "0" * 64, "snapshot_unix_ns": T0},  # not earlier
    {"image": "a.img", "manifest_sha256": "0" * 64},
    {"image": "a.img", "manifest_sha256": "0" * 64, "snapshot_unix_ns": 0, "extra": 1},
    "a.img",
])
def test_publish_refuses_a_bad_parent(tmp_path: Path, parent: object) -> None:
    with ImageWriter(str(tmp_path / "b.img"), P, P) as w, \
            pytest.raises(ValueError, match="invalid manifest fields") as e:
        w.publish({**fields(T0), "parent": parent})
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_manifest_sha256_of_a_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such manifest") as e:
        manifest_sha256(str(tmp_path / "none.img"))
    one_line(e)


# ---------------------------------------------------------------------------------------------
# Hostile chains: each refused in one line


def two(tmp_path: Path) -> Chain:
    return random_chain(tmp_path, seed=2, links=2)


def test_parent_missing(tmp_path: Path, shm: Path) -> None:
    chain = two(tmp_path)
    os.unlink(manifest_path(str(chain.paths[0])))
    for call in (lambda: verify(str(chain.last)), lambda: load_chain(str(chain.last)),
                 lambda: restore(str(chain.last), str(shm / "r")),
                 lambda: compact(str(chain.last), str(tmp_path / "f.img"))):
        with pytest.raises(ImageError, match="parent image .*n0.img is missing") as e:
            call()
        one_line(e)
    assert os.listdir(shm) == [] and not (tmp_path / "f.img").exists()


def test_parent_image_file_missing(tmp_path: Path) -> None:
    chain = two(tmp_path)
    os.unlink(chain.paths[0])
    with pytest.raises(ImageError, match="n0.img: image not found") as e:
        verify(str(chain.last))
    one_line(e)


def test_parent_manifest_modified(tmp_path: Path, shm: Path) -> None:
    chain = two(tmp_path)
    assert verify(str(chain.last)).ok  # the control: untouched, it verifies
    edit_manifest(chain.paths[0], stats={"faults": 2})  # still a valid manifest
    assert load_manifest(manifest_path(str(chain.paths[0])))
    for call in (lambda: verify(str(chain.last)),
                 lambda: restore(str(chain.last), str(shm / "r"))):
        with pytest.raises(CorruptImage, match="manifest of its parent .* was modified") as e:
            call()
        one_line(e)


def test_parent_image_modified(tmp_path: Path, shm: Path) -> None:
    chain = two(tmp_path)
    m = load_manifest(manifest_path(str(chain.paths[0])))
    flip(chain.paths[0], m.extents[0].offset)
    report = verify(str(chain.last))
    assert not report.ok and "its parent" in (report.problem or "")
    assert [c["ok"] for c in report.chain] == [False, True]
    with pytest.raises(CorruptImage, match="refusing to restore") as e:
        restore(str(chain.last), str(shm / "r"))
    one_line(e)
    with pytest.raises(CorruptImage, match="refusing to compact") as e:
        compact(str(chain.last), str(tmp_path / "f.img"))
    one_line(e)
    assert os.listdir(shm) == [] and not (tmp_path / "f.img").exists()


def test_delta_with_data_outside_its_extents(tmp_path: Path, shm: Path) -> None:
    """A delta's gaps are holes in its file (they mean "as in the parent"): a nonzero byte
    there is corruption, found by verify, and restore refuses rather than ignore it."""
    chain = two(tmp_path)
    m = load_manifest(manifest_path(str(chain.last)))
    gap = next(off for off in range(0, m.object.size, P)
               if not any(e.offset <= off < e.end for e in m.extents))
    with open(chain.last, "r+b") as f:
        f.seek(gap + 7)
        f.write(b"\x01")
    report = verify(str(chain.last))
    assert not report.ok and f"offset {gap + 7}" in (report.problem or "")
    with pytest.raises(CorruptImage, match="refusing to restore") as e:
        restore(str(chain.last), str(shm / "r"))
    one_line(e)


def test_cycle(tmp_path: Path) -> None:
    """a <- b, then a's manifest edited to name b as its parent (and b's to hash the edited
    a, so that every recorded hash holds): the walk from b comes back to b."""
    chain = two(tmp_path)
    a, b = chain.paths
    edit_manifest(a, format_version=2,
                  parent={"image": "n1.img", "manifest_sha256": manifest_sha256(str(b)),
                          "snapshot_unix_ns": T0 - 1})
    edit_manifest(b, parent={**parent_ref(a), "snapshot_unix_ns": T0})
    with pytest.raises(ImageError, match="cycle") as e:
        verify(str(b))
    one_line(e)


def test_self_parent_through_another_name(tmp_path: Path) -> None:
    chain = two(tmp_path)
    b = chain.last
    os.symlink(b.name, tmp_path / "alias.img")
    os.symlink(Path(manifest_path(str(b))).name, tmp_path / "alias.img.json")
    edit_manifest(b, parent={"image": "alias.img", "manifest_sha256": "0" * 64,
                             "snapshot_unix_ns": T0})
    with pytest.raises(ImageError, match="cycle") as e:
        verify(str(b))
    one_line(e)


@pytest.mark.parametrize("mismatch,needle", [
    ({"size": 5 * P}, "object size"),
    ({"page_size": 2 * P}, "page size"),
    ({"inode": 999}, "inode"),
])
def test_geometry_or_identity_mismatch(tmp_path: Path, mismatch: dict[str, int],
                                       needle: str) -> None:
    size, page_size = mismatch.get("size", 4 * P), mismatch.get("page_size", P)
    write_image(tmp_path / "a.img", 4 * P, [(0, b"\x01" * P)], T0)
    ident = {"inode": mismatch["inode"]} if "inode" in mismatch else {}
    write_image(tmp_path / "b.img", size, [], T0 + 1, parent_ref(tmp_path / "a.img"),
                page_size=page_size, **ident)
    with pytest.raises(ImageError, match=f"{needle}.*not the same object") as e:
        verify(str(tmp_path / "b.img"))
    one_line(e)


def test_unknown_identity_is_not_a_mismatch(tmp_path: Path, shm: Path) -> None:
    write_image(tmp_path / "a.img", 4 * P, [(0, b"\x01" * P)], T0, dev=None, inode=None)
    write_image(tmp_path / "b.img", 4 * P, [], T0 + 1, parent_ref(tmp_path / "a.img"))
    assert verify(str(tmp_path / "b.img")).ok


def test_parent_t_not_earlier(tmp_path: Path) -> None:
    chain = two(tmp_path)
    t = load_manifest(manifest_path(str(chain.last))).snapshot_unix_ns
    edit_manifest(chain.last, parent={**parent_ref(chain.paths[0]), "snapshot_unix_ns": t})
    with pytest.raises(ImageError, match="not earlier") as e:
        verify(str(chain.last))
    one_line(e)


def test_parent_t_differs_from_the_recorded_one(tmp_path: Path) -> None:
    chain = two(tmp_path)
    edit_manifest(chain.last, parent={**parent_ref(chain.paths[0]), "snapshot_unix_ns": 5})
    with pytest.raises(ImageError, match="has T .* the delta recorded") as e:
        verify(str(chain.last))
    one_line(e)


def test_version_2_without_parent_and_1_with(tmp_path: Path) -> None:
    chain = two(tmp_path)
    ref = parent_ref(chain.paths[0])
    edit_manifest(chain.last, parent=None)
    with pytest.raises(ImageError, match="missing field 'parent'") as e:
        verify(str(chain.last))
    one_line(e)
    edit_manifest(chain.last, parent=ref, format_version=1)
    with pytest.raises(ImageError, match="version 1 .* cannot name a parent") as e:
        verify(str(chain.last))
    one_line(e)
    edit_manifest(chain.last, format_version=3)
    with pytest.raises(ImageError, match="unsupported format_version 3") as e:
        verify(str(chain.last))
    one_line(e)
    edit_manifest(chain.last, format_version=2, parent={**ref, "snapshot_unix_ns": None})
    with pytest.raises(ImageError, match="parent.snapshot_unix_ns") as e:
        verify(str(chain.last))
    one_line(e)


def test_chain_length_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = random_chain(tmp_path, seed=3, links=6, pages=4)
    assert verify(str(chain.last)).ok
    monkeypatch.setattr(chain_module, "MAX_CHAIN_LINKS", 5)
    with pytest.raises(ImageError, match="longer than 5 links") as e:
        verify(str(chain.last))
    one_line(e)
    assert verify(str(chain.paths[-2])).ok  # 5 links: still fine


def test_relative_parent_is_beside_the_delta_not_in_the_cwd(
        tmp_path: Path, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delta names "n0.img"; the cwd has a decoy n0.img (a valid full image of the same
    object): the chain must use the one beside the delta."""
    here, elsewhere = tmp_path / "chain", tmp_path / "cwd"
    here.mkdir()
    elsewhere.mkdir()
    chain = random_chain(here, seed=4, links=3)
    write_image(elsewhere / "n0.img", len(chain.states[0]), [(0, b"\x07" * P)], T0)
    monkeypatch.chdir(elsewhere)
    restore(str(chain.last), str(shm / "r"))
    assert (shm / "r").read_bytes() == chain.states[-1]
    assert all(Path(c["image"]).parent == here for c in verify(str(chain.last)).chain)


def test_parent_in_another_directory(tmp_path: Path, shm: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "deltas").mkdir()
    rng = random.Random(5)
    chain = root(tmp_path / "base", rng, ["data"] * 4, 0, name="a.img")
    write_image(tmp_path / "deltas" / "b.img", 4 * P, [(P, b"\x02" * P)], T0 + 1,
                parent_ref(tmp_path / "base" / "a.img", "../base/a.img"))
    expected = chain.states[0][:P] + b"\x02" * P + chain.states[0][2 * P:]
    restore(str(tmp_path / "deltas" / "b.img"), str(shm / "r"))
    assert (shm / "r").read_bytes() == expected
    write_image(tmp_path / "deltas" / "c.img", 4 * P, [], T0 + 2,
                parent_ref(tmp_path / "deltas" / "b.img",
                           str(tmp_path / "deltas" / "b.img")))  # absolute
    restore(str(tmp_path / "deltas" / "c.img"), str(shm / "c"))
    assert (shm / "c").read_bytes() == expected


# ---------------------------------------------------------------------------------------------
# Writing: never over the chain, never through a link


def test_restore_and_compact_never_write_over_the_chain(tmp_path: Path) -> None:
    chain = random_chain(tmp_path, seed=6, links=3)
    before = [p.read_bytes() for p in chain.paths]
    for target in (*chain.paths, Path(manifest_path(str(chain.paths[0])))):
        with pytest.raises(UserError, match="itself|a parent in the chain") as e:
            restore(str(chain.last), str(target), force=True)
        one_line(e)
        if target.suffix == ".img":
            with pytest.raises(UserError, match="itself|a parent in the chain") as e:
                compact(str(chain.last), str(target), force=True)
            one_line(e)
    assert [p.read_bytes() for p in chain.paths] == before
    assert verify(str(chain.last)).ok


def test_compact_refuses_an_existing_output_and_links(tmp_path: Path) -> None:
    chain = random_chain(tmp_path, seed=7, links=2)
    out = tmp_path / "full.img"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists") as e:
        compact(str(chain.last), str(out))
    one_line(e)
    assert out.read_bytes() == b"precious"
    victim = tmp_path / "victim"
    victim.write_bytes(b"mine")
    (tmp_path / "link.img").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link") as e:
        compact(str(chain.last), str(tmp_path / "link.img"), force=True)
    one_line(e)
    assert victim.read_bytes() == b"mine"
    compact(str(chain.last), str(out), force=True)
    assert out.read_bytes() == chain.states[-1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_compact_of_a_full_image_copies_it(tmp_path: Path) -> None:
    chain = random_chain(tmp_path, seed=8, links=1)
    c = compact(str(chain.last), str(tmp_path / "copy.img"))
    assert c.links == 1 and (tmp_path / "copy.img").read_bytes() == chain.states[0]
    m = load_manifest(manifest_path(str(tmp_path / "copy.img")))
    assert m.processes == load_manifest(manifest_path(str(chain.last))).processes
    assert m.stats["faults"] == 1 and len(m.stats["compacted_from"]) == 1


@pytest.mark.parametrize("page_size", [2 << 20, 8 << 20])
def test_compact_with_huge_pages(tmp_path: Path, shm: Path, page_size: int) -> None:
    """Extents stay page-aligned when pages are larger than a zero block (2 MiB) and than
    a read piece (8 MiB: such pages are taken whole)."""
    size = 3 * page_size
    page = bytearray(page_size)
    page[12345] = 1
    write_image(tmp_path / "a.img", size, [(0, bytes(page)), (page_size, bytes(page_size))],
                T0, page_size=page_size)
    write_image(tmp_path / "b.img", size, [(2 * page_size, bytes(page))], T0 + 1,
                parent_ref(tmp_path / "a.img"), page_size=page_size)
    compact(str(tmp_path / "b.img"), str(tmp_path / "f.img"))
    m = load_manifest(manifest_path(str(tmp_path / "f.img")))
    assert [(e.offset, e.length) for e in m.extents] == [(0, page_size),
                                                         (2 * page_size, page_size)]
    assert verify(str(tmp_path / "f.img")).ok
    restore(str(tmp_path / "b.img"), str(shm / "r"))
    assert (shm / "r").read_bytes() == bytes(page) + bytes(page_size) + bytes(page)


# ---------------------------------------------------------------------------------------------
# info, and the sweep that picks each range's link


def test_info_shows_the_chain(tmp_path: Path) -> None:
    chain = random_chain(tmp_path, seed=9, links=3)
    d = info(str(chain.last))
    assert d["kind"] == "delta" and d["format_version"] == 2 and d["chain_problem"] is None
    assert [c["kind"] for c in d["chain"]] == ["full", "delta", "delta"]
    assert [Path(c["image"]).name for c in d["chain"]] == [p.name for p in chain.paths]
    assert d["parent"]["image"] == "n1.img"
    os.unlink(manifest_path(str(chain.paths[0])))
    d = info(str(chain.last))  # a broken chain is shown as far as it goes
    assert len(d["chain"]) == 2 and "missing" in d["chain_problem"]


def _link(extents: list[tuple[int, int]], size: int) -> Link:
    obj = ObjectInfo(size, P, "s", "shm")
    m = Manifest(obj, 0, (), tuple(Extent(a, n, "xxh3_64:" + "0" * 16) for a, n in extents),
                 {}, "uffdsnap", "0")
    return Link("x", m, "")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.lists(st.booleans(), min_size=n, max_size=n), max_size=6))))
def test_segments_pick_the_newest_link(case: tuple[int, list[list[bool]]]) -> None:
    """Against a page-by-page model: each page comes from the newest delta that saved it,
    else from the root; the segments cover the object once, in order."""
    npages, saves = case
    size = npages * P
    chain = [_link([(0, size)], size)]
    for saved in saves:
        runs: list[tuple[int, int]] = []
        for i, s in enumerate(saved):
            if s and runs and runs[-1][0] + runs[-1][1] == i * P and i % 2:
                runs[-1] = (runs[-1][0], runs[-1][1] + P)  # touching pages, one extent
            elif s:
                runs.append((i * P, P))
        chain.append(_link(runs, size))
    expected = [max([0] + [k for k, saved in enumerate(saves, 1) if saved[i]])
                for i in range(npages)]
    got: list[int] = []
    pos = 0
    for a, b, owner in segments(chain):
        assert a == pos and b > a
        got += [owner] * ((b - a) // P)
        pos = b
    assert pos == size and got == expected


def test_checksums_in_pieces_match(tmp_path: Path) -> None:
    """ExtentHash over pieces == extent_checksum of the whole (compact relies on it)."""
    data = random.Random(1).randbytes(3 * P + 5)
    h = ExtentHash()
    for i in range(0, len(data), 1000):
        h.update(data[i:i + 1000])
    assert h.checksum() == extent_checksum(data)
    assert json.dumps(h.checksum())


# ---------------------------------------------------------------------------------------------
# Over the stream: the parent travels in HEADER, HOLE is "as in the parent"


async def _receive(records: list[bytes], out: Path) -> ReceiveResult:
    send, recv = trio.testing.memory_stream_one_way_pair()
    await send.send_all(b"".join(records))
    await send.aclose()
    return await receive_stream(recv, Output(str(out)), peer="test")


async def test_a_delta_streams_to_a_delta(tmp_path: Path, shm: Path) -> None:
    chain = random_chain(tmp_path, seed=16, links=3)
    result = await _receive(list(encode_image(str(chain.last))), tmp_path / "r2.img")
    assert result.ok, result.error
    sent = load_manifest(manifest_path(str(chain.last)))
    got = load_manifest(manifest_path(str(tmp_path / "r2.img")))
    assert got == sent and got.parent is not None and got.parent.image == "n1.img"
    assert result.manifest_sha256 == manifest_sha256(str(tmp_path / "r2.img"))
    restore(str(tmp_path / "r2.img"), str(shm / "r"))
    assert (shm / "r").read_bytes() == chain.states[-1]


async def test_a_stream_without_its_parent_is_another_image(tmp_path: Path,
                                                            shm: Path) -> None:
    """A delta's records sent with its parent publish the delta; the same records without
    it publish a full image whose gaps are zeros (the control: the parent field is what
    carries the meaning). END may repeat the HEADER's parent, never name another."""
    chain = random_chain(tmp_path, seed=17, links=2)
    ref = parent_ref(chain.paths[0])
    size = len(chain.states[-1])
    delta = load_manifest(manifest_path(str(chain.last)))

    def records(parent: dict[str, Any] | None) -> list[bytes]:
        enc = Encoder()
        out = [enc.header(size, P, delta.snapshot_unix_ns, OBJECT, parent)]
        pos = 0
        with open(chain.last, "rb") as f:
            for e in delta.extents:
                if e.offset > pos:
                    out.append(enc.hole(pos, e.offset - pos))
                f.seek(e.offset)
                out.append(enc.pages(e.offset, f.read(e.length)))
                pos = e.end
        if pos < size:
            out.append(enc.hole(pos, size - pos))
        if parent is not None:
            with pytest.raises(ValueError, match="parent differs"):
                enc.end({"parent": {**parent, "image": "other.img"}})
        return [*out, enc.end({} if parent is None else {"parent": parent})]

    assert (await _receive(records(ref), tmp_path / "d.img")).ok
    assert (await _receive(records(None), tmp_path / "f.img")).ok
    restore(str(tmp_path / "d.img"), str(shm / "d"))
    restore(str(tmp_path / "f.img"), str(shm / "f"))
    assert (shm / "d").read_bytes() == chain.states[-1]
    assert (shm / "f").read_bytes() != chain.states[-1]
