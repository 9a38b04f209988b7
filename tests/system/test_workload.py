"""The consistency-checker workload's real writers, native and Python, and the helper build
(tests/unit/test_checker.py has the step arithmetic and the checker's verdicts).

Process tests run native (uffdsnap/native/src/writer.c) and Python writers on /dev/shm objects
and memfds.
Synchronization is by events: the writers' "ready" line, waitpid(WUNTRACED) for SIGSTOP, and
polling the live seqs for a condition with a deadline. No timed assertions.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uffdsnap import native
from uffdsnap import workload as wl
from uffdsnap.errors import UserError
from uffdsnap.testing import build as devbuild

PS = 4096
D = 64
_names = itertools.count()


# --- fixtures and helpers -------------------------------------------------------------------

class ShmObject:
    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path, self.fd, self.size = path, fd, size

    def copy(self) -> bytes:
        """A copy of the whole object (a true image only while nothing writes)."""
        return os.pread(self.fd, self.size, 0)

    def copy_page_by_page(self) -> bytes:
        """Front to back, one pread per page: NOT one instant if writers are running."""
        return b"".join(os.pread(self.fd, PS, off) for off in range(0, self.size, PS))


@pytest.fixture
def make_object() -> Iterator[Callable[..., ShmObject]]:
    made: list[ShmObject] = []

    def make(nwriters: int, data_pages: int = D) -> ShmObject:
        path = f"/dev/shm/uffdsnap-test-{os.getpid()}-{next(_names)}"
        fd, size = wl.create_object(path, nwriters, data_pages)
        made.append(ShmObject(path, fd, size))
        return made[-1]

    yield make
    for obj in made:
        os.close(obj.fd)
        Path(obj.path).unlink(missing_ok=True)


@pytest.fixture
def writers() -> Iterator[list[wl.WriterProcess]]:
    """Writer processes started by a test; any still running at the end are killed."""
    started: list[wl.WriterProcess] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            os.kill(w.pid, signal.SIGCONT)
        w.kill()


@pytest.fixture(scope="session")
def writer_bin() -> Path:
    return native.program(native.WRITER)


def start(started: list[wl.WriterProcess], path: str, specs: list[dict[str, object]]) -> None:
    """Spawn one writer per spec (index = position) and wait for every "ready" line."""
    for i, spec in enumerate(specs):
        started.append(wl.spawn_writer(path, i, **spec))  # type: ignore[arg-type]
    for w in started:
        w.wait_ready()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


MIXED: list[dict[str, object]] = [
    {"impl": "c"},
    {"impl": "c", "map_twice": True},
    {"impl": "c", "partial": True},
    {"impl": "c", "map_twice": True, "partial": True},
    {"impl": "python"},
    {"impl": "python", "map_twice": True, "partial": True},
]


def simulate(nwriters: int, data_pages: int, steps: list[int], page_size: int = PS) -> bytearray:
    """An object image after writer i did steps[i] steps, run by the real PythonWriter code,
    interleaved round-robin (so every observation is of a real earlier state)."""
    layout = wl.Layout(nwriters, data_pages, page_size)
    buf = bytearray(layout.size)
    buf[:wl.HEADER_BYTES] = layout.header_bytes()
    ws = [wl.PythonWriter.from_buffer(buf, i) for i in range(nwriters)]
    for w, n in zip(ws, steps, strict=True):
        if n:
            w.mark()
    for _ in range(max(steps, default=0)):
        for w, n in zip(ws, steps, strict=True):
            if w.seq < n:
                w.step()
    for w in ws:
        w.close()
    return buf


def put(buf: bytearray, offset: int, word: int) -> None:
    struct.pack_into("<Q", buf, offset, word)


def fill(buf: bytearray, offset: int, word: int, nwords: int) -> None:
    buf[offset:offset + 8 * nwords] = word.to_bytes(8, "little") * nwords


# --- the native build -------------------------------------------------------------------------

def test_build_is_cached() -> None:
    lifecycle = devbuild.build("lifecycle")
    assert lifecycle.is_file() and os.access(lifecycle, os.X_OK)
    assert devbuild.build("lifecycle") == lifecycle


def test_the_writer_ships_in_the_package(writer_bin: Path) -> None:
    """The demo's writer is built into the package by the build backend, not at run time."""
    assert writer_bin.parent == Path(native.__file__).resolve().parent
    assert os.access(writer_bin, os.X_OK)


@pytest.fixture
def tmp_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "hello.c").write_text('#include <stdio.h>\nint main(void) '
                                     '{ puts("one"); return 0; }\n')
    monkeypatch.setattr(devbuild, "helpers_dir", lambda: helpers)
    return helpers


def run_out(path: Path) -> str:
    return subprocess.run([path], capture_output=True, text=True, check=True).stdout.strip()


def test_edit_rebuilds_and_prunes(tmp_helpers: Path) -> None:
    first = devbuild.build("hello")
    assert first.parent == tmp_helpers / ".build"
    assert run_out(first) == "one"
    (tmp_helpers / "hello.c").write_text(
        (tmp_helpers / "hello.c").read_text().replace('"one"', '"two"'))
    second = devbuild.build("hello")
    assert second != first and run_out(second) == "two"
    assert not first.exists()
    (tmp_helpers / "extra.h").write_text("#define X 1\n")  # headers are part of the key
    assert devbuild.build("hello") != second


def test_unwritable_tree_falls_back_to_xdg_cache(tmp_helpers: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devbuild, "_in_tree_cache", lambda: Path("/proc/self/no-such-dir"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = devbuild.build("hello")
    assert path.parent == tmp_path / "xdg" / "uffdsnap"
    assert run_out(path) == "one"


def test_missing_compiler_is_one_line(tmp_helpers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-cc-anywhere")
    with pytest.raises(UserError, match="install gcc") as e:
        devbuild.build("hello")
    assert "\n" not in str(e.value)


def test_compile_error_is_one_line(tmp_helpers: Path) -> None:
    (tmp_helpers / "bad.c").write_text("int main(void) { int unused; return 0; }\n")
    with pytest.raises(UserError, match="building helper bad") as e:
        devbuild.build("bad")  # -Wall -Werror: an unused variable is an error
    assert "\n" not in str(e.value)
    assert not list((tmp_helpers / ".build").glob("*tmp"))


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "nope"])
def test_bad_helper_names(tmp_helpers: Path, name: str) -> None:
    with pytest.raises(UserError):
        devbuild.build(name)


def _build_in_child(helpers: str) -> str:
    devbuild.helpers_dir = lambda: Path(helpers)  # type: ignore[assignment]
    return str(devbuild.build("hello"))


def test_concurrent_builds_agree(tmp_helpers: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        paths = pool.map(_build_in_child, [str(tmp_helpers)] * 8)
    assert len(set(paths)) == 1
    assert run_out(Path(paths[0])) == "one"
    assert [p.name for p in (tmp_helpers / ".build").iterdir()] == [Path(paths[0]).name]


# --- real writers -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("mapping", [{}, {"map_twice": True}, {"partial": True},
                                     {"map_twice": True, "partial": True}])
def test_writers_match_the_reference_layout(make_object: Callable[..., ShmObject], impl: str,
                                            mapping: dict[str, bool], writer_bin: Path) -> None:
    """Native and Python writers write byte for byte what the in-memory PythonWriter does."""
    obj = make_object(2, 16)
    w = wl.spawn_writer(obj.path, 1, impl=impl, max_ops=77, **mapping)
    assert w.wait() == 77
    image = bytearray(obj.copy())
    expected = simulate(2, 16, [0, 77])
    layout = wl.Layout(2, 16)
    ctr = layout.counter_offset(1)
    assert struct.unpack_from("<Q", image, ctr + 8 * wl.C_PID)[0] == w.pid
    assert wl.IMPLS[struct.unpack_from("<Q", image, ctr + 8 * wl.C_IMPL)[0]] == impl
    image[ctr + 8:ctr + 24] = expected[ctr + 8:ctr + 24]  # impl and pid words
    assert image == expected


def test_writer_resumes_from_the_published_seq(make_object: Callable[..., ShmObject],
                                               writer_bin: Path) -> None:
    obj = make_object(1, 8)
    assert wl.spawn_writer(obj.path, 0, impl="c", max_ops=10).wait() == 10
    assert wl.spawn_writer(obj.path, 0, impl="python", max_ops=5).wait() == 15
    assert wl.spawn_writer(obj.path, 0, impl="c", max_ops=5, rate=10_000).wait() == 20
    result = wl.check_image(obj.copy())
    assert result.ok and result.seqs == [20]


@pytest.mark.parametrize("impl", ["c", "python"])
def test_writer_rejects_bad_arguments(make_object: Callable[..., ShmObject], tmp_path: Path,
                                      impl: str, writer_bin: Path) -> None:
    obj = make_object(2, 8)
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(PS * 4))
    for path, index, why in [(obj.path, 2, "out of range"), (str(junk), 0, "workload"),
                             (str(tmp_path / "missing"), 0, "")]:
        proc = subprocess.run(wl.writer_command(path, index, impl=impl), capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("writer: ") and why in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_quiescent_copy_is_consistent(make_object: Callable[..., ShmObject],
                                      writers: list[wl.WriterProcess], writer_bin: Path) -> None:
    """4 native + 2 Python writers run concurrently; once stopped, a plain copy checks ok."""
    obj = make_object(6)
    start(writers, obj.path, MIXED)
    wait_for(lambda: min(wl.read_live_seqs(obj.fd)) >= 3 * D, "every writer to wrap its pages")
    wl.set_stop(obj.fd)
    finals = [w.wait() for w in writers]
    result = wl.check_image(obj.copy())
    assert result.ok, result.summary()
    assert result.seqs == finals
    assert all(s >= 3 * D for s in finals)
    assert [w.impl for w in result.writers] == ["c"] * 4 + ["python"] * 2
    assert all(w.phase == "idle" for w in result.writers)


def test_frozen_copy_is_consistent_and_writers_move_on(make_object: Callable[..., ShmObject],
                                                       writers: list[wl.WriterProcess],
                                                       writer_bin: Path) -> None:
    """Stop-the-world snapshots (SIGSTOP every writer, copy, SIGCONT) are single instants even
    with writers caught mid-step; the checker accepts them, and the writers then progress."""
    obj = make_object(6)
    start(writers, obj.path, MIXED)
    wait_for(lambda: min(wl.read_live_seqs(obj.fd)) >= D, "every writer to get going")
    caught_mid_step = 0
    for _ in range(6):
        for w in writers:
            os.kill(w.pid, signal.SIGSTOP)
        for w in writers:
            os.waitpid(w.pid, os.WUNTRACED)  # returns once it is stopped
        image = obj.copy_page_by_page()
        for w in writers:
            os.kill(w.pid, signal.SIGCONT)
        result = wl.check_image(image)
        assert result.ok, result.summary()
        caught_mid_step += sum(w.phase != "idle" for w in result.writers)
        seqs = result.seqs
        wait_for(lambda seqs=seqs: all(  # type: ignore[misc]
            live > then for live, then in zip(wl.read_live_seqs(obj.fd), seqs, strict=True)),
            "every writer to move past the image")
    assert caught_mid_step > 0
    wl.set_stop(obj.fd)
    for w in writers:
        w.wait()


def test_copy_while_writers_run_is_caught(make_object: Callable[..., ShmObject],
                                          writers: list[wl.WriterProcess],
                                          writer_bin: Path) -> None:
    """A page-by-page copy taken while writers run is not one instant; the checker must say so,
    including the cross-writer rule: a later region's writer saw an earlier one further along
    than the (earlier copied) counter of that writer shows. The native writers are paced so that
    they advance between the copy of their counter and the copy of the Python writers' (the
    observers, last in the object) on every attempt; a bounded number of attempts is allowed."""
    obj = make_object(6)
    specs = [{**spec, "rate": 3000} if spec["impl"] == "c" else spec for spec in MIXED]
    start(writers, obj.path, specs)
    wait_for(lambda: min(wl.read_live_seqs(obj.fd)) >= D, "every writer to get going")
    kinds: set[str] = set()
    cross: wl.Violation | None = None
    for attempt in range(1, 101):  # noqa: B007 (reported below)
        result = wl.check_image(obj.copy_page_by_page(), max_violations=100_000)
        kinds |= result.kinds.keys()
        cross = cross or next((v for v in result.violations if v.kind == "cross"), None)
        if cross is not None and "data" in kinds:  # both rules seen (not always in one copy)
            break
    assert cross is not None, f"no cross-writer violation in {attempt} racy copies: {kinds}"
    assert "data" in kinds, f"no data violation in {attempt} racy copies: {kinds}"
    assert cross.writer is not None and "newer than" in cross.found
    wl.set_stop(obj.fd)
    for w in writers:
        w.wait()


def test_memfd_object_via_proc_fd(writers: list[wl.WriterProcess], writer_bin: Path) -> None:
    fd, size = wl.create_object("uffdsnap-test", 2, 16)
    try:
        path = wl.object_path(fd)
        start(writers, path, [{"impl": "c", "partial": True}, {"impl": "python"}])
        wait_for(lambda: min(wl.read_live_seqs(fd)) >= 40, "both writers to pass 40")
        wl.set_stop(path)
        finals = [w.wait() for w in writers]
        result = wl.check_image(os.pread(fd, size, 0))
        assert result.ok and result.seqs == finals
        assert wl.read_live_seqs(path) == finals
    finally:
        os.close(fd)


@pytest.mark.usefixtures("hugepages")  # reserves the pages itself: never skips
def test_hugetlb_object(writers: list[wl.WriterProcess], writer_bin: Path) -> None:
    huge = 2 << 20
    fd, size = wl.create_object("uffdsnap-test-huge", 2, 2, page_size=huge)
    try:
        path = wl.object_path(fd)
        start(writers, path, [{"impl": "c", "partial": True, "map_twice": True},
                              {"impl": "python", "partial": True}])
        wait_for(lambda: min(wl.read_live_seqs(fd)) >= 5, "both writers to pass 5")
        wl.set_stop(fd)
        finals = [w.wait() for w in writers]
        result = wl.check_image(os.pread(fd, size, 0))
        assert result.ok and result.seqs == finals
        assert result.layout is not None and result.layout.page_size == huge
    finally:
        os.close(fd)


def test_in_process_api_hands_over_mappings(make_object: Callable[..., ShmObject]) -> None:
    """run_python_writer's on_ready hook sees every mapping (what an enlisting API registers)."""
    obj = make_object(2, 8)
    seen: list[tuple[int, int]] = []

    def on_ready(writer: wl.PythonWriter) -> None:
        seen.extend((offset, len(mm)) for mm, offset in writer.mappings)

    assert wl.run_python_writer(obj.path, 1, max_ops=20, partial=True, map_twice=True,
                                on_ready=on_ready) == 20
    layout = wl.Layout(2, 8)
    one = [(0, PS), (layout.region_offset(1), layout.region_size), (layout.counter_offset(0), PS)]
    assert seen == one + one
    assert wl.check_image(obj.copy()).seqs == [0, 20]


def test_cli_module_runs_a_python_writer(make_object: Callable[..., ShmObject]) -> None:
    obj = make_object(1, 4)
    proc = subprocess.run([sys.executable, "-m", "uffdsnap.workload", "--object", obj.path,
                           "--index", "0", "--max-ops", "9"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("ready pid=")
    assert proc.stdout.splitlines()[-1] == "done seq=9 ops=9"
