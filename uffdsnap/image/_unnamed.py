"""An ImageWriter whose image has no name until publish.

A coordinator or a receiver may be killed at any moment of a long copy, SIGKILL included.
ImageWriter keeps its image under a temporary name from the start, which such a death leaves
behind (as large as the object). Here the image lives in an unnamed file (O_TMPFILE) that the
kernel frees with the process, and gets its temporary name only when publish begins (the
manifest's temporary is named for that same short moment). Everything else (writes, extents,
checksums, the manifest, the atomic no-clobber publish) is ImageWriter's.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from uffdsnap.image._format import Manifest
from uffdsnap.image._writer import ImageWriter

_PROC_FD = "/proc/self/fd"


class UnnamedImageWriter(ImageWriter):
    """ImageWriter, but the image is an O_TMPFILE until publish (where the file system and
    /proc allow it; otherwise ImageWriter's named temporary is kept)."""

    def __init__(self, path: str, size: int, page_size: int, *, overwrite: bool = False):
        super().__init__(path, size, page_size, overwrite=overwrite)
        self.unnamed = False
        if not os.path.isdir(_PROC_FD):
            return  # no way to give the file a name later
        directory = os.path.dirname(os.path.abspath(path))
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            return  # a file system without O_TMPFILE
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            return
        named, self._tmp = self._tmp, None
        os.close(self.fd)
        self.fd = fd
        self.unnamed = True
        if named:
            os.unlink(named)

    def publish(self, manifest_fields: dict[str, Any]) -> Manifest:
        if self.unnamed:
            self._tmp = self._give_name()
            self.unnamed = False
        return super().publish(manifest_fields)

    def _give_name(self) -> str:
        return name_unnamed(self.fd, self.path)


def name_unnamed(fd: int, path: str) -> str:
    """Link the unnamed file `fd` into the directory of `path` under a fresh temporary name
    (`.NAME.<random>.tmp`); return that name."""
    directory, name = os.path.split(os.path.abspath(path))
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(16):
            tmp = f".{name}.{secrets.token_hex(4)}.tmp"
            try:  # a dir fd makes this linkat(AT_SYMLINK_FOLLOW), not link() of the symlink
                os.link(f"{_PROC_FD}/{fd}", tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
                return os.path.join(directory, tmp)
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)
    raise OSError(f"{path}: could not find a free temporary name in {directory}")
