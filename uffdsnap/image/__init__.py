"""The image sink: a raw, sparse copy of the object at instant T, plus a JSON manifest beside it.

`OUT.img` holds byte X of the object at file offset X; `OUT.img.json` says what was saved
(extents with xxh3 checksums), when (T), from whom (processes) and how (stats). Both appear under
their final names only once complete, so a reader that sees `OUT.img` may trust it is whole.
The format is documented field by field in docs/image-format.md.

The public API is re-exported here flat; the implementation is private:
  _format  the manifest: dataclasses, JSON load/dump, validation of hostile manifests,
           extent checksums, and the rules every producer of an image checks as it goes
  _files   file I/O shared by writer and readers: bounded reads, sparse writes, atomic names
  _writer  ImageWriter: fill from many threads, publish atomically, or abort
  _chain   chains: a delta names its parent, down to a full image; finding and checking them
  _reader  verify, restore, info (each follows the chain)
  _compact compact: a chain's state as one full image
"""

from uffdsnap.image._chain import MAX_CHAIN_LINKS, Link, load_chain
from uffdsnap.image._compact import CompactReport, compact
from uffdsnap.image._files import IO_PIECE, ZERO_BLOCK, check_replaceable
from uffdsnap.image._format import (
    CHECKSUM_ALGO,
    DELTA_FORMAT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    MAX_OFFSET,
    MAX_PAGE_SIZE,
    MAX_PROCESSES,
    MAX_UNIX_NS,
    MIN_PAGE_SIZE,
    CorruptImage,
    Extent,
    ExtentHash,
    ImageError,
    Manifest,
    ObjectInfo,
    ParentRef,
    extent_checksum,
    iso8601_utc,
    load_manifest,
    load_manifest_hashed,
    manifest_path,
    manifest_sha256,
)
from uffdsnap.image._passed import PassedImageWriter, open_unnamed, publish_unnamed
from uffdsnap.image._reader import (
    MAX_BAD_LISTED,
    RestoreReport,
    VerifyReport,
    info,
    restore,
    verify,
)
from uffdsnap.image._unnamed import UnnamedImageWriter
from uffdsnap.image._writer import COALESCE_LIMIT, ImageWriter

__all__ = [
    "CHECKSUM_ALGO",
    "COALESCE_LIMIT",
    "DELTA_FORMAT_VERSION",
    "FORMAT",
    "FORMAT_VERSION",
    "IO_PIECE",
    "UnnamedImageWriter",
    "PassedImageWriter",
    "open_unnamed",
    "publish_unnamed",
    "check_replaceable",
    "MANIFEST_SUFFIX",
    "MAX_BAD_LISTED",
    "MAX_CHAIN_LINKS",
    "MAX_MANIFEST_BYTES",
    "MAX_OFFSET",
    "MAX_PAGE_SIZE",
    "MAX_PROCESSES",
    "MAX_UNIX_NS",
    "MIN_PAGE_SIZE",
    "ZERO_BLOCK",
    "CompactReport",
    "CorruptImage",
    "Extent",
    "ExtentHash",
    "ImageError",
    "ImageWriter",
    "Link",
    "Manifest",
    "ObjectInfo",
    "ParentRef",
    "RestoreReport",
    "VerifyReport",
    "compact",
    "extent_checksum",
    "info",
    "iso8601_utc",
    "load_chain",
    "load_manifest",
    "load_manifest_hashed",
    "manifest_path",
    "manifest_sha256",
    "restore",
    "verify",
]
