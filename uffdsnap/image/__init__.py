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
  _reader  verify, restore, info
"""

from uffdsnap.image._files import IO_PIECE, ZERO_BLOCK, check_replaceable
from uffdsnap.image._format import (
    CHECKSUM_ALGO,
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
    extent_checksum,
    iso8601_utc,
    load_manifest,
    manifest_path,
)
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
    "FORMAT",
    "FORMAT_VERSION",
    "IO_PIECE",
    "UnnamedImageWriter",
    "check_replaceable",
    "MANIFEST_SUFFIX",
    "MAX_BAD_LISTED",
    "MAX_MANIFEST_BYTES",
    "MAX_OFFSET",
    "MAX_PAGE_SIZE",
    "MAX_PROCESSES",
    "MAX_UNIX_NS",
    "MIN_PAGE_SIZE",
    "ZERO_BLOCK",
    "CorruptImage",
    "Extent",
    "ExtentHash",
    "ImageError",
    "ImageWriter",
    "Manifest",
    "ObjectInfo",
    "RestoreReport",
    "VerifyReport",
    "extent_checksum",
    "info",
    "iso8601_utc",
    "load_manifest",
    "manifest_path",
    "restore",
    "verify",
]
