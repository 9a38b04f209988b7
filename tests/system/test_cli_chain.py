"""The commands on chains of delta images: `verify`, `info`, `restore` follow the chain,
`compact` merges it; every broken chain is one line on stderr and a non-zero exit, nothing
written. Real files, real processes (the CLI runs as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from chainutil import T0, Chain, edit_manifest, parent_ref, random_chain, write_image
from test_cli import assert_one_line_error, uffdsnap

from uffdsnap.image import load_manifest, manifest_path, manifest_sha256


def test_verify_info_restore_compact_a_ten_link_chain(tmp_path: Path, shm: Path) -> None:
    chain = random_chain(tmp_path, seed=11, links=10, pages=48)
    last = str(chain.last)

    r = uffdsnap("verify", last)
    assert r.returncode == 0 and r.stderr == "" and "chain of 10 images" in r.stdout, r.stderr
    assert len(r.stdout.splitlines()) == 11  # the summary, then one line per link
    d = json.loads(uffdsnap("verify", last, "--json").stdout)
    assert d["ok"] and [c["kind"] for c in d["chain"]] == ["full"] + ["delta"] * 9

    r = uffdsnap("info", last)
    assert r.returncode == 0 and "chain       10 images, root first" in r.stdout, r.stderr
    assert "image format 2" in r.stdout and "as in the parent" in r.stdout
    d = json.loads(uffdsnap("info", last, "--json").stdout)
    assert d["ok"] and d["kind"] == "delta" and len(d["chain"]) == 10
    assert d["chain"][0]["manifest_sha256"] == manifest_sha256(str(chain.paths[0]))

    r = uffdsnap("restore", last, "--to", str(shm / "obj"))
    assert r.returncode == 0 and "from a chain of 10 images" in r.stdout, r.stderr
    assert (shm / "obj").read_bytes() == chain.states[-1]

    full = tmp_path / "full.img"
    r = uffdsnap("compact", last, "-o", str(full), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["ok"] and d["links"] == 10 and d["manifest_sha256"] == manifest_sha256(str(full))
    assert full.read_bytes() == chain.states[-1]
    assert uffdsnap("verify", str(full)).returncode == 0
    m = load_manifest(manifest_path(str(full)))
    assert m.format_version == 1 and len(m.stats["compacted_from"]) == 10

    before = full.read_bytes()
    r = uffdsnap("compact", last, "-o", str(full))
    assert r.returncode == 2 and "--force" not in r.stdout
    assert_one_line_error(r, "already exists")
    assert full.read_bytes() == before
    r = uffdsnap("compact", str(chain.paths[3]), "-o", str(full), "--force")
    assert r.returncode == 0 and "(4 images)" in r.stdout, r.stderr
    assert full.read_bytes() == chain.states[3]


def _missing(c: Chain) -> None:
    os.unlink(manifest_path(str(c.paths[0])))


def _manifest_modified(c: Chain) -> None:
    edit_manifest(c.paths[0], stats={"faults": 99})


def _image_modified(c: Chain) -> None:
    m = load_manifest(manifest_path(str(c.paths[0])))
    with open(c.paths[0], "r+b") as f:
        f.seek(m.extents[0].offset)
        f.write(b"\xfe\xed")


def _geometry(c: Chain) -> None:
    size = len(c.states[0]) + 4096
    os.unlink(c.paths[1])
    os.unlink(manifest_path(str(c.paths[1])))
    write_image(c.paths[1], size, [], T0 + 1000, parent_ref(c.paths[0]))


def _t_order(c: Chain) -> None:
    edit_manifest(c.paths[1], parent={**parent_ref(c.paths[0]), "snapshot_unix_ns": T0 + 1000})


def _v2_without_parent(c: Chain) -> None:
    edit_manifest(c.paths[1], parent=None)


def _v1_with_parent(c: Chain) -> None:
    edit_manifest(c.paths[1], format_version=1)


# case -> (break it, the words of the one line, what info says: "error" or "broken" or "ok")
HOSTILE: dict[str, tuple[Callable[[Chain], None], str, str]] = {
    "parent-missing": (_missing, "n0.img is missing", "broken"),
    "parent-manifest-modified": (_manifest_modified, "was modified", "broken"),
    "parent-image-modified": (_image_modified, "its parent", "ok"),
    "geometry": (_geometry, "not the same object", "broken"),
    "parent-t-not-earlier": (_t_order, "not earlier", "error"),
    "version-2-without-parent": (_v2_without_parent, "missing field 'parent'", "error"),
    "version-1-with-parent": (_v1_with_parent, "cannot name a parent", "error"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_broken_chain_is_one_line(tmp_path: Path, shm: Path, case: str) -> None:
    chain = random_chain(tmp_path, seed=12, links=2)
    assert uffdsnap("verify", str(chain.last)).returncode == 0  # the control
    breaker, needle, info_says = HOSTILE[case]
    breaker(chain)
    last = str(chain.last)
    for command in (["verify", last], ["restore", last, "--to", str(shm / "r")],
                    ["compact", last, "-o", str(tmp_path / "full.img")]):
        r = uffdsnap(*command)
        assert r.returncode in (1, 2), (command, r.stdout, r.stderr)
        assert_one_line_error(r, needle)
        d = json.loads(uffdsnap(*command, "--json").stdout)
        assert d["ok"] is False and (needle in d.get("error", "") or
                                     needle in (d.get("problem") or ""))
    assert os.listdir(shm) == []
    assert not list(tmp_path.glob("full.img*")) and not list(tmp_path.glob(".*"))
    r = uffdsnap("info", last)
    if info_says == "error":
        assert r.returncode == 2
        assert_one_line_error(r, needle)
    else:
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert ("BROKEN" in r.stdout) == (info_says == "broken")


def test_a_cycle_is_one_line(tmp_path: Path) -> None:
    """a <- b, then a edited to name b as its parent, and b to hash the edited a: the walk
    from b meets b again (before it would find a's recorded hash of b stale)."""
    chain = random_chain(tmp_path, seed=13, links=2)
    a, b = chain.paths
    edit_manifest(a, format_version=2, parent={"image": b.name,
                                               "manifest_sha256": manifest_sha256(str(b)),
                                               "snapshot_unix_ns": T0 - 1})
    edit_manifest(b, parent=parent_ref(a))
    for command in (["verify", str(b)], ["compact", str(b), "-o", str(tmp_path / "f.img")]):
        r = uffdsnap(*command)
        assert r.returncode == 2
        assert_one_line_error(r, "cycle")


def test_relative_parent_is_found_beside_the_delta(tmp_path: Path, shm: Path) -> None:
    """The cwd holds a decoy n0.img of the same object; the delta, named by a relative path
    from there, must still take its parent from its own directory."""
    here, cwd = tmp_path / "chain", tmp_path / "cwd"
    here.mkdir()
    cwd.mkdir()
    chain = random_chain(here, seed=14, links=3)
    write_image(cwd / "n0.img", len(chain.states[0]), [(0, b"\x07" * 4096)], T0)
    rel = os.path.join("..", "chain", chain.last.name)
    for command in (["verify", rel], ["restore", rel, "--to", str(shm / "r")],
                    ["compact", rel, "-o", "full.img"]):
        r = subprocess.run([sys.executable, "-m", "uffdsnap", *command], capture_output=True,
                           text=True, timeout=60, cwd=cwd)
        assert r.returncode == 0, (command, r.stderr)
    assert (shm / "r").read_bytes() == chain.states[-1]
    assert (cwd / "full.img").read_bytes() == chain.states[-1]


@pytest.mark.parametrize("args,needle", [
    (["compact", "{last}"], "required"),
    (["compact", "{tmp}/none.img", "-o", "{tmp}/f.img"], "no such image"),
    (["compact", "{last}", "-o", "{tmp}/no/dir/f.img"], "does not exist"),
    (["compact", "{last}", "-o", "{root}", "--force"], "a parent in the chain"),
    (["compact", "{last}", "-o", "{last}", "--force"], "itself"),
    (["compact", "{last}", "-o", "{tmp}"], "is a directory"),
    (["restore", "{last}", "--to", "{root}", "--force"], "a parent in the chain"),
])
def test_compact_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    chain = random_chain(tmp_path, seed=15, links=2)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    r = uffdsnap(*[a.format(tmp=tmp_path, last=chain.last, root=chain.paths[0])
                   for a in args])
    assert_one_line_error(r, needle)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
