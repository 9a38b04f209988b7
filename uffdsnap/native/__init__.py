"""The product's native parts, built into the package by the build backend (setup.py) and
shipped in the wheel: the native core (a shared library, loaded with ctypes by
uffdsnap.native.core) and the demo workload's writer program. Their sources are in src/.

Nothing here compiles at run time: an installation without them is broken, and says so.
"""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from uffdsnap.errors import UserError

HERE = Path(__file__).resolve().parent
WRITER = "uffdsnap-writer"
_REINSTALL = ("reinstall uffdsnap (`pip install --force-reinstall uffdsnap`; in a source "
              "checkout, `pip install -e .` builds it)")


def core_library() -> Path:
    """The native core's shared library inside the installed package."""
    for suffix in EXTENSION_SUFFIXES:
        path = HERE / f"_snapcore{suffix}"
        if path.is_file():
            return path
    raise UserError(f"the native core (_snapcore*.so) is missing from {HERE}: {_REINSTALL}")


def program(name: str) -> Path:
    """A native program shipped inside the package (e.g. WRITER)."""
    path = HERE / name
    if not os.access(path, os.X_OK):
        raise UserError(f"the native program {name} is missing from {HERE}: {_REINSTALL}")
    return path
