"""For tests and `uffdsnap bench` only: compile their helper programs (helpers/*.c) at run time.

Nothing on the snapshot path may import this module. The helpers are test and bench C (test
workloads, the bench's writer and its reference fault handler) that exist only in a source
checkout; they are compiled with the system C compiler on demand and cached. The product's own
C (uffdsnap/native/src: the native core and the uffdsnap-writer program) is compiled by setup.py
into the package at install time and is never built here.

`build("lifecycle")` returns the path of an executable compiled from helpers/lifecycle.c (which
may include the product's headers, uffdsnap/native/src/*.h). The binary is cached under a name
keyed by a hash of the compiler, the flags, the source and every header it can include, so
editing a source rebuilds it and an unchanged one is reused. Compilation goes to a temporary
name and is renamed into place, so several processes (parallel pytest workers) may build the same
helper at once: each rename is atomic and every result is identical.

Cache directory, first that is usable: helpers/.build/ in the source tree, then
$XDG_CACHE_HOME/uffdsnap (default ~/.cache/uffdsnap), then /tmp/uffdsnap-<uid>.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from uffdsnap.errors import UserError

CFLAGS: tuple[str, ...] = ("-O2", "-Wall", "-Werror", "-std=gnu11", "-pthread")
LIBS: tuple[str, ...] = ("-lm",)


def helpers_dir() -> Path:
    """The helpers/ directory (test and bench C) of the source checkout this package was
    installed from (editable); UserError in an installed wheel, which ships no helpers."""
    path = Path(__file__).resolve().parents[2] / "helpers"
    if not path.is_dir():
        raise UserError(f"test and bench helper sources not found at {path}: they come with a "
                        "source checkout (`pip install -e .` there)")
    return path


def product_headers_dir() -> Path:
    """The product's C headers, which helpers may include (the workload layout, util.h): the
    test writers must agree with the shipped writer on the layout."""
    return Path(__file__).resolve().parents[1] / "native" / "src"


def compiler() -> str:
    """Absolute path of the C compiler ($CC if set, else `cc`); UserError if there is none."""
    name = os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if path is None:
        raise UserError(f"no C compiler found ({name!r} is not on PATH): install gcc "
                        "(e.g. `apt-get install gcc libc6-dev`) to build uffdsnap's helpers")
    return path


def _in_tree_cache() -> Path:
    return helpers_dir() / ".build"


def _usable_dir(path: Path, *, private: bool) -> bool:
    """Create `path` if needed; True if it is a writable directory (and ours alone if private)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not os.access(path, os.W_OK | os.X_OK):
        return False
    # A directory in a shared place (/tmp) must be ours and closed to others, or anyone could
    # plant a binary under the name we are about to execute.
    return not private or (st.st_uid == os.getuid() and not st.st_mode & 0o022)


def cache_dir() -> Path:
    """The directory binaries are cached in (see the module doc for the order of preference)."""
    in_tree = _in_tree_cache()
    if _usable_dir(in_tree, private=False):
        return in_tree
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = Path(xdg) / "uffdsnap"
    if _usable_dir(user, private=True):
        return user
    tmp = Path(tempfile.gettempdir()) / f"uffdsnap-{os.getuid()}"
    if _usable_dir(tmp, private=True):
        return tmp
    raise UserError(f"no writable cache directory for helper binaries (tried {in_tree}, {user}, "
                    f"{tmp})")


def _build_key(cc: str, source: Path, flags: tuple[str, ...]) -> str:
    """Hash of everything that determines the binary: compiler, flags, source, shared headers."""
    h = hashlib.sha256()
    h.update(cc.encode() + b"\0" + " ".join(flags).encode() + b"\0")
    h.update(source.read_bytes())
    for header in sorted([*source.parent.glob("*.h"), *product_headers_dir().glob("*.h")]):
        h.update(b"\0" + header.name.encode() + b"\0" + header.read_bytes())
    return h.hexdigest()[:16]


def build(name: str) -> Path:
    """Compile the test or bench helper helpers/<name>.c (unless an up-to-date cached binary
    exists); return its path. Never for the product's C, which setup.py builds into the package.

    Raises UserError, one line, when the source is missing, there is no compiler, or it fails.
    """
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"bad helper name {name!r}")
    source = helpers_dir() / f"{name}.c"
    if not source.is_file():
        raise UserError(f"no helper source {source}")
    cc = compiler()
    out_dir = cache_dir()
    flags = CFLAGS
    stem = name
    target = out_dir / f"{stem}-{_build_key(cc, source, flags)}"
    if os.access(target, os.X_OK):
        return target

    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}-", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [cc, *flags, "-I", str(source.parent), "-I", str(product_headers_dir()), "-o",
               str(tmp), str(source), *LIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "error" in ln] or \
                proc.stderr.splitlines() or [f"exit status {proc.returncode}"]
            raise UserError(f"building helper {name} with {cc} failed: {lines[0].strip()}")
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if out_dir == _in_tree_cache():  # shared caches may serve other checkouts: leave them be
        _prune(out_dir, stem, keep=target)
    return target


def _prune(out_dir: Path, name: str, keep: Path) -> None:
    """Remove older builds of `name` from the cache (best effort; a running one keeps its inode)."""
    for old in out_dir.glob(f"{name}-*"):
        if old != keep and not old.name.endswith(".tmp") and len(old.name) == len(keep.name):
            try:
                old.unlink()
            except OSError:
                pass
