"""Build the product's C into the package: the native core (a shared library that
uffdsnap.native loads with ctypes) and the demo workload's writer program.

Everything else about the package is in pyproject.toml. Test-only and bench-only C (helpers/)
is not built here: tests and the bench compile it on demand (uffdsnap/testing/build.py).
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SRC = "uffdsnap/native/src"
HEADERS = [f"{SRC}/{name}" for name in ("snapcore.h", "util.h", "workload.h")]
CFLAGS = ["-O2", "-Wall", "-std=gnu11", "-pthread"]
# Programs installed inside the package, next to the core: name -> sources.
PROGRAMS = {"uffdsnap-writer": [f"{SRC}/writer.c"]}
CORE = "uffdsnap.native._snapcore"


class build_native(build_ext):
    """build_ext, plus the package's native programs (linked as executables)."""

    def run(self) -> None:
        super().run()
        for name, sources in PROGRAMS.items():
            self._build_program(name, sources)

    def _program_path(self, name: str) -> str:
        return os.path.join(os.path.dirname(self.get_ext_fullpath(CORE)), name)

    def _build_program(self, name: str, sources: list[str]) -> None:
        target = self._program_path(name)
        objects = self.compiler.compile(sources, output_dir=self.build_temp,
                                        include_dirs=[SRC], extra_postargs=CFLAGS,
                                        depends=HEADERS)
        self.compiler.link_executable(objects, os.path.basename(target),
                                      output_dir=os.path.dirname(target), libraries=["m"],
                                      extra_postargs=["-pthread"])

    def get_outputs(self) -> list[str]:
        return super().get_outputs() + [self._program_path(n) for n in PROGRAMS]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = dict(super().get_output_mapping())
        if self.inplace:
            return mapping
        root = os.path.abspath(".")
        for name in PROGRAMS:
            built = self._program_path(name)
            rel = os.path.relpath(built, self.build_lib)
            mapping[built] = os.path.join(root, rel)
        return mapping


setup(
    ext_modules=[Extension(CORE, sources=[f"{SRC}/snapcore.c"], depends=HEADERS,
                           include_dirs=[SRC], extra_compile_args=CFLAGS, libraries=["m"],
                           extra_link_args=["-pthread"])],
    cmdclass={"build_ext": build_native},
)
