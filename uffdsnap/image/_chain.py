"""Chains of images: a delta names its parent, down to one full image (the root).

Everything that follows a chain (verify, restore, info, compact) finds it here, so the rules
that make a chain trustworthy live in one place: each parent is found beside the delta that
names it (a relative name is relative to the delta's directory, never the cwd), its manifest
bytes hash to what the delta recorded, it describes the same object (size, page size, identity)
at an earlier T, no manifest appears twice (a cycle), and the chain has at most MAX_CHAIN_LINKS
links. Only manifests are read here; the images' bytes are the reader's business.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from uffdsnap.image._format import (
    MANIFEST_SUFFIX,
    CorruptImage,
    ImageError,
    Manifest,
    ParentRef,
    iso8601_utc,
    load_manifest_hashed,
    manifest_path,
)

MAX_CHAIN_LINKS = 100_000  # a longer chain is refused (compact it): bounds time and memory


@dataclass(frozen=True)
class Link:
    """One image of a chain: where it was found, its manifest, and that manifest's sha256."""

    image: str
    manifest: Manifest
    manifest_sha256: str

    @property
    def kind(self) -> str:
        return "delta" if self.manifest.is_delta else "full"

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"image": self.image, "kind": self.kind, "manifest_sha256": self.manifest_sha256,
                "snapshot_unix_ns": m.snapshot_unix_ns, "snapshot_time": m.snapshot_iso8601,
                "extents": len(m.extents), "extent_bytes": m.extent_bytes}


def parent_path(child_image: str, ref: ParentRef) -> str:
    """Where a delta's parent is: an absolute name as is, a relative one beside the delta."""
    if os.path.isabs(ref.image):
        return ref.image
    return os.path.join(os.path.dirname(os.path.abspath(child_image)), ref.image)


def no_manifest(image_path: str) -> ImageError:
    """The error for a path with no manifest beside it, with a hint at the likely mistake."""
    mpath = manifest_path(image_path)
    if image_path.endswith(MANIFEST_SUFFIX) and os.path.exists(image_path[:-5]):
        return ImageError(f"{image_path} is a manifest; pass the image, {image_path[:-5]}")
    if not os.path.lexists(image_path):
        return ImageError(f"{image_path}: no such image (and no manifest {mpath})")
    return ImageError(f"{image_path}: not a uffdsnap image: no manifest {mpath} beside it "
                      "(copy OUT.img.json along with OUT.img)")


def walk_chain(image_path: str) -> Iterator[Link]:
    """The links of `image_path`'s chain, the image itself first, its root (a full image) last.

    Raises ImageError (one line) on the first link that breaks a rule: a parent missing or
    unreadable, a cycle, a different object, a T out of order, too many links; CorruptImage
    when a parent's manifest is not the one the delta recorded (it was modified).
    """
    mpath = manifest_path(image_path)
    if not os.path.lexists(mpath):
        raise no_manifest(image_path)
    manifest, digest = load_manifest_hashed(mpath)
    link = Link(image_path, manifest, digest)
    seen = {_identity(mpath)}
    yield link
    while link.manifest.parent is not None:
        if len(seen) >= MAX_CHAIN_LINKS:
            raise ImageError(f"{image_path}: chain longer than {MAX_CHAIN_LINKS} links; "
                             "refusing (compact it)")
        link = _parent_link(link, link.manifest.parent, seen)
        yield link


def load_chain(image_path: str) -> list[Link]:
    """The whole chain of `image_path`, root (full) first, `image_path` last."""
    chain = list(walk_chain(image_path))
    chain.reverse()
    return chain


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # load_manifest says why, in its words
    return st.st_dev, st.st_ino


def _parent_link(child: Link, ref: ParentRef, seen: set[tuple[int, int] | None]) -> Link:
    path = parent_path(child.image, ref)
    mpath = manifest_path(path)
    if not os.path.lexists(mpath):
        raise ImageError(f"{child.image}: its parent image {path} is missing (no manifest "
                         f"{mpath})")
    ident = _identity(mpath)
    if ident is not None and ident in seen:
        raise ImageError(f"{child.image}: its parent {path} is already in the chain "
                         "(a cycle); refusing")
    seen.add(ident)
    manifest, digest = load_manifest_hashed(mpath)
    if digest != ref.manifest_sha256:
        raise CorruptImage(f"{child.image}: the manifest of its parent {path} was modified "
                           f"(sha256 {digest[:16]}..., the delta recorded "
                           f"{ref.manifest_sha256[:16]}...)")
    _check_same_object(child, manifest, path)
    if manifest.snapshot_unix_ns != ref.snapshot_unix_ns:
        raise ImageError(f"{child.image}: its parent {path} has T "
                         f"{iso8601_utc(manifest.snapshot_unix_ns)}, the delta recorded "
                         f"{iso8601_utc(ref.snapshot_unix_ns)}")
    return Link(path, manifest, digest)


def _check_same_object(child: Link, parent: Manifest, path: str) -> None:
    """A delta applies only to an image of the same object: geometry, and identity if known."""
    mine, theirs = child.manifest.object, parent.object
    for what, a, b in (("size", mine.size, theirs.size),
                       ("page size", mine.page_size, theirs.page_size)):
        if a != b:
            raise ImageError(f"{child.image}: its parent {path} has object {what} {b}, the "
                             f"delta {a}: not the same object")
    known = None not in (mine.dev, mine.inode, theirs.dev, theirs.inode)
    if known and (mine.dev, mine.inode) != (theirs.dev, theirs.inode):
        raise ImageError(f"{child.image}: its parent {path} is of object dev {theirs.dev} inode "
                         f"{theirs.inode}, the delta of dev {mine.dev} inode {mine.inode}: not "
                         "the same object")


def segments(chain: list[Link]) -> Iterator[tuple[int, int, int]]:
    """Cover [0, size) with (start, end, link index) ranges: each range's bytes at the last
    link's T are those of the newest link whose extents hold it, else the root's (index 0).

    The same result as applying the root and then each delta's extents in order, with each
    byte read once, from one link, and never from outside a delta's extents.
    """
    size = chain[0].manifest.object.size
    events = sorted((pos, edge, i) for i, link in enumerate(chain) if i
                    for e in link.manifest.extents for pos, edge in ((e.offset, 1), (e.end, -1)))
    live: set[int] = set()
    newest: list[int] = []  # max-heap of live link indexes (negated), cleaned lazily
    start, owner, pos = 0, 0, 0
    for at, edge, i in [*events, (size, 0, 0)]:
        if at > pos:
            while newest and -newest[0] not in live:
                heapq.heappop(newest)
            now = -newest[0] if newest else 0
            if now != owner:
                if pos > start:
                    yield start, pos, owner
                start, owner = pos, now
            pos = at
        if edge > 0:
            live.add(i)
            heapq.heappush(newest, -i)
        elif edge < 0:
            live.discard(i)
    if size > start:
        yield start, size, owner
