"""The consistency-checker workload: writers whose memory proves whether an image is one instant.

A shared-memory object (memfd, /dev/shm file, hugetlbfs file) is laid out as a header page and,
per writer, a counter page followed by D data pages. Writer i's step k fills data page
p(k) = (k*A_i + B_i) mod D with the stamp (tag | i << 40 | k), records the seqs it saw of every
writer in its counter page, and publishes seq = k last. check_image() then proves (or refutes)
that an image holds the object as it was at one instant T. docs/workload.md has the full design.

Used as `from uffdsnap import workload as wl`; every name is re-exported here from:

- _layout: the layout constants, the step/page arithmetic and Layout (pure);
- _object: create an object, stop its writers, read their seqs (pread/pwrite, never mapped),
  and check_file() for an image on disk;
- _writer: PythonWriter and run_python_writer(), and main(), `python -m uffdsnap.workload`;
- _procs: writer processes (the native uffdsnap-writer shipped in the package, or the Python
  one) for tests and the demo;
- _check: the checker, check_image() and its verdict types (pure: buffer in, verdict out).
"""

from uffdsnap.workload._check import (
    CheckResult,
    Violation,
    WriterImage,
    check_image,
    describe_page,
    describe_word,
)
from uffdsnap.workload._layout import (
    C_IMPL,
    C_OBS,
    C_PID,
    C_SEQ,
    H_DATA_PAGES,
    H_MAGIC,
    H_NWRITERS,
    H_PAGE_SIZE,
    H_STOP,
    H_VERSION,
    HEADER_BYTES,
    HEADER_WORDS,
    IMPL_PYTHON,
    IMPLS,
    MAGIC,
    MAX_WRITERS,
    STAMP_TAG,
    STEP_BITS,
    STEP_MAX,
    VERSION,
    WRITER_BITS,
    Layout,
    addend,
    decode_stamp,
    last_step,
    max_writers,
    multiplier,
    page_for_step,
    stamp,
)
from uffdsnap.workload._object import (
    ObjectRef,
    check_file,
    create_object,
    object_path,
    read_layout,
    read_live_seqs,
    set_stop,
)
from uffdsnap.workload._procs import WriterProcess, spawn_writer, writer_command
from uffdsnap.workload._writer import (
    PythonWriter,
    WorkloadError,
    main,
    open_python_writer,
    run_python_writer,
)

__all__ = [
    # layout and step arithmetic
    "MAGIC", "VERSION", "STAMP_TAG", "STEP_BITS", "STEP_MAX", "WRITER_BITS", "MAX_WRITERS",
    "H_MAGIC", "H_VERSION", "H_NWRITERS", "H_DATA_PAGES", "H_PAGE_SIZE", "H_STOP",
    "HEADER_WORDS", "HEADER_BYTES", "C_SEQ", "C_IMPL", "C_PID", "C_OBS", "IMPLS", "IMPL_PYTHON",
    "Layout", "multiplier", "addend", "stamp", "decode_stamp", "page_for_step", "last_step",
    "max_writers",
    # the object
    "ObjectRef", "create_object", "object_path", "read_layout", "set_stop", "read_live_seqs",
    "check_file",
    # the Python writer
    "WorkloadError", "PythonWriter", "open_python_writer", "run_python_writer", "main",
    # writer processes
    "WriterProcess", "writer_command", "spawn_writer",
    # the checker
    "Violation", "WriterImage", "CheckResult", "check_image", "describe_word", "describe_page",
]
