"""An ImageWriter into files its caller created (and will name): how a coordinator writes a
client's image with the client's rights, never its own (`snapshot --coordinator -o OUT`).

The client opens two unnamed files (O_TMPFILE) in OUT's directory, with its own rights, and
passes them with its request; the coordinator fills the first with the image and the second with
the manifest, and the client links both into place once told the snapshot is good
(`publish_unnamed`). The coordinator never opens, creates or names a path on a client's word.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading

from uffdsnap.errors import UserError
from uffdsnap.image._files import fsync_dir, place, pwrite_all, unlink_quiet
from uffdsnap.image._format import check_geometry, manifest_path
from uffdsnap.image._unnamed import name_unnamed
from uffdsnap.image._writer import ImageWriter


class PassedImageWriter(ImageWriter):
    """ImageWriter over an image fd and a manifest fd it was given (and now owns): publish
    fills the manifest and makes both durable; naming them is the giver's."""

    def __init__(self, path: str, size: int, page_size: int, image_fd: int, manifest_fd: int):
        check_geometry(size, page_size)
        if "\0" in path:
            raise UserError(f"{path!r}: a file name cannot contain a NUL byte")
        self.path, self.size, self.page_size, self.overwrite = path, size, page_size, False
        self._lock = threading.Lock()
        self._extents: list[tuple[int, int, str]] = []
        self._state = "open"
        self._tmp: str | None = None
        self._manifest_tmp: str | None = None
        self.fd, self.manifest_fd = image_fd, manifest_fd
        try:
            for fd, what in ((image_fd, "image"), (manifest_fd, "manifest")):
                check_passed_file(fd, what)
            os.ftruncate(image_fd, size)
        except BaseException:
            self.abort()
            raise

    def _place(self, text: bytes) -> None:
        """The manifest into its file, durable; naming both is the giver's."""
        os.ftruncate(self.manifest_fd, 0)
        pwrite_all(self.manifest_fd, memoryview(text), 0)
        os.fsync(self.manifest_fd)

    def _close(self) -> None:
        os.close(self.fd)
        os.close(self.manifest_fd)

    def abort(self) -> None:
        with self._lock:
            if self._state in ("published", "aborted"):
                return
            self._state = "aborted"
        for fd in (self.fd, self.manifest_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def check_passed_file(fd: int, what: str) -> None:
    """A file a client passed for us to write: an unnamed (O_TMPFILE) regular file, open for
    reading and writing, and empty. UserError (one line) otherwise: we never write into a
    file that has a name (someone else's, perhaps), a device, a FIFO or a socket."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"the {what} file passed is not a regular file")
    if st.st_nlink != 0:
        raise UserError(f"the {what} file passed has a name (pass an unnamed O_TMPFILE file)")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise UserError(f"the {what} file passed is not open for reading and writing")
    if st.st_size != 0:
        raise UserError(f"the {what} file passed is not empty")


def open_unnamed(path: str) -> tuple[int, int]:
    """The client's side: an unnamed image file and an unnamed manifest file in the directory
    of `path`, created with our rights (UserError, one line, if we may not)."""
    directory = os.path.dirname(os.path.abspath(path))
    fds: list[int] = []
    try:
        for _ in range(2):
            fds.append(os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise UserError(f"{path}: cannot create files in {directory}: "
                        f"{e.strerror or e}") from None
    return fds[0], fds[1]


def publish_unnamed(image_fd: int, manifest_fd: int, path: str, overwrite: bool) -> None:
    """The client's side, once the coordinator filled both: the manifest, then the image, under
    their final names (no-clobber unless `overwrite`, as ImageWriter.publish)."""
    final_manifest = manifest_path(path)
    tmp = name_unnamed(manifest_fd, final_manifest)
    try:
        place(tmp, final_manifest, overwrite)
    except BaseException:
        unlink_quiet(tmp)
        raise
    tmp = name_unnamed(image_fd, path)
    try:
        place(tmp, path, overwrite)
    except BaseException:
        unlink_quiet(tmp)
        unlink_quiet(final_manifest)  # it describes an image that never appeared
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
