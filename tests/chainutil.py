"""Chains of images for tests: a full root and deltas written with ImageWriter (as the
coordinator's incremental snapshots will), with the model they must restore to (the object's
bytes at each link's T). Used by tests/unit/test_image_chain.py and
tests/system/test_cli_chain.py."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uffdsnap.image import ImageWriter, extent_checksum, manifest_path, manifest_sha256

P = 4096
T0 = 1_700_000_000_000_000_000
OBJECT: dict[str, Any] = {"source": "/dev/shm/chain-test", "kind": "shm", "dev": 25,
                          "inode": 1234}


@dataclass
class Chain:
    """Images root first, and the object's bytes at each one's T."""

    paths: list[Path] = field(default_factory=list)
    states: list[bytes] = field(default_factory=list)

    @property
    def last(self) -> Path:
        return self.paths[-1]


def fields(t: int, parent: dict[str, Any] | None = None, **obj: Any) -> dict[str, Any]:
    f: dict[str, Any] = {"object": {**OBJECT, **obj}, "snapshot_time": t,
                         "processes": [{"pid": 4242, "comm": "writer", "mode": "attach",
                                        "mappings": 1}],
                         "stats": {"faults": 1}}
    if parent is not None:
        f["parent"] = parent
    return f


def parent_ref(parent: Path, name: str | None = None) -> dict[str, Any]:
    """The parent field naming `parent` (as `name`, default its bare file name: relative to
    the delta's directory when both are in one)."""
    m = json.loads(Path(manifest_path(str(parent))).read_text())
    return {"image": name if name is not None else parent.name,
            "manifest_sha256": manifest_sha256(str(parent)),
            "snapshot_unix_ns": m["snapshot_time"]["unix_ns"]}


def write_image(path: Path, size: int, saved: list[tuple[int, bytes]], t: int,
                parent: dict[str, Any] | None = None, page_size: int = P,
                **obj: Any) -> None:
    """Publish an image of `size` bytes holding `saved` (offset, bytes) extents: full without
    `parent`, else a delta of it."""
    with ImageWriter(str(path), size, page_size) as w:
        for off, data in saved:
            w.write(off, data)
            w.record_extent(off, len(data), extent_checksum(data))
        w.publish(fields(t, parent, **obj))


def page_span(index: int, size: int, page_size: int = P) -> tuple[int, int]:
    return index * page_size, min(size, (index + 1) * page_size)


def root(directory: Path, rng: random.Random, kinds: list[str], tail: int,
         name: str = "n0.img", t: int = T0) -> Chain:
    """A full image of len(kinds) pages (+ a partial page of `tail` bytes): each page
    "data" (random), "zero" (saved, all zeros) or "hole" (not saved)."""
    size = len(kinds) * P + tail
    state = bytearray(size)
    saved = []
    for i, kind in enumerate([*kinds, "data"] if tail else kinds):
        a, b = page_span(i, size)
        if kind == "data":
            state[a:b] = rng.randbytes(b - a)
        if kind != "hole":
            saved.append((a, bytes(state[a:b])))
    write_image(directory / name, size, saved, t)
    return Chain([directory / name], [bytes(state)])


def add_delta(chain: Chain, rng: random.Random, changes: list[tuple[int, str]],
              name: str | None = None, step: int = 1000) -> None:
    """Append a delta that sets the pages of `changes` (index modulo the page count; "data"
    random bytes, "zero" zeros), saved as one extent per run of consecutive pages."""
    state = bytearray(chain.states[-1])
    size = len(state)
    npages = -(-size // P)
    new: dict[int, str] = {i % npages: kind for i, kind in changes} if npages else {}
    saved: list[tuple[int, bytes]] = []
    run: list[int] = []
    for i in sorted(new):
        a, b = page_span(i, size)
        state[a:b] = rng.randbytes(b - a) if new[i] == "data" else bytes(b - a)
        if run and i != run[-1] + 1:
            saved.append(_extent(state, run, size))
            run = []
        run.append(i)
    if run:
        saved.append(_extent(state, run, size))
    parent = chain.last
    path = parent.parent / (name or f"n{len(chain.paths)}.img")
    t = T0 + step * len(chain.paths)
    write_image(path, size, saved, t, parent_ref(parent))
    chain.paths.append(path)
    chain.states.append(bytes(state))


def _extent(state: bytearray, run: list[int], size: int) -> tuple[int, bytes]:
    a, b = run[0] * P, page_span(run[-1], size)[1]
    return a, bytes(state[a:b])


def random_chain(directory: Path, seed: int, links: int, pages: int = 16,
                 tail: int = 100) -> Chain:
    """A root and `links - 1` deltas of random pages (zero pages and the partial last page
    included)."""
    rng = random.Random(seed)
    chain = root(directory, rng, [rng.choice(["data", "zero", "hole"]) for _ in range(pages)],
                 tail)
    for _ in range(links - 1):
        add_delta(chain, rng, [(rng.randrange(pages + 1), rng.choice(["data", "zero"]))
                               for _ in range(rng.randrange(1, 6))])
    return chain


def edit_manifest(image: Path, **changes: Any) -> None:
    """Rewrite `image`'s manifest with top-level fields replaced (None deletes one)."""
    mpath = Path(manifest_path(str(image)))
    d = json.loads(mpath.read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    mpath.write_text(json.dumps(d))
