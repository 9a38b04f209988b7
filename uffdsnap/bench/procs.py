"""The processes and files of a bench run, and the one thing each event does to the writers.

Everything a run creates is registered in a Workspace, whose close() undoes it on every way out
(normal end, error, Ctrl-C): stopped writers are continued, every process we started is ended,
objects are closed (memfds vanish with their last fd), images and logs are removed, and huge
pages we reserved are given back. Writers and the native handler also die with this process
(PR_SET_PDEATHSIG), and a handler's death releases its writers (it holds their only uffd).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from uffdsnap.bench.config import HUGE_PAGE
from uffdsnap.bench.writerlog import Fleet, read_log
from uffdsnap.errors import UserError
from uffdsnap.testing import build as devbuild

COPY_CHUNK = 1 << 20
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def now_ns() -> int:
    return time.monotonic_ns()


class BenchError(UserError):
    """A helper failed or the machine cannot run a scenario; one line says which and why."""


@dataclass
class Workspace:
    """Owns the run's processes, objects, files and system changes; close() undoes them all."""

    dest_dir: str
    log_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="uffdsnap-bench-logs-"))
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    stopped: set[int] = field(default_factory=set)
    fds: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    hugepages_restore: tuple[int, int] | None = None   # (value to restore, value we set)

    def start(self, argv: list[str], *, stdin: int | None = subprocess.DEVNULL,
              **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def temp_path(self, stem: str, where: str | None = None) -> str:
        path = os.path.join(where or self.dest_dir, f"uffdsnap-bench-{stem}-{uuid.uuid4().hex[:8]}")
        self.paths.append(path)
        return path

    def remove(self, *paths: str) -> None:
        for path in paths:
            for p in (path, path + ".json"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

    def end(self, proc: subprocess.Popen[str], timeout: float = STOP_TIMEOUT_S) -> None:
        """Continue (if stopped), terminate, and reap one process; kill it if it lingers."""
        if proc.poll() is None:
            if proc.pid in self.stopped:
                _signal(proc.pid, signal.SIGCONT)
                self.stopped.discard(proc.pid)
            _signal(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for pid in list(self.stopped):
            _signal(pid, signal.SIGCONT)
        self.stopped.clear()
        for proc in reversed(list(self.procs)):
            self.end(proc, timeout=5.0)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.remove(*self.paths)
        self.paths.clear()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        if self.hugepages_restore is not None:
            restore, ours = self.hugepages_restore
            if _read_int("/proc/sys/vm/nr_hugepages") == ours:  # nobody changed it since
                _write_int("/proc/sys/vm/nr_hugepages", restore)
            self.hugepages_restore = None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def _write_int(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


# ---- huge pages ---------------------------------------------------------------------------------

def free_huge_pages() -> int:
    """Free 2 MiB huge pages (HugePages_Free; the default huge page size here is 2 MiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def ensure_huge_pages(ws: Workspace, size: int, reserve: bool) -> str | None:
    """None if a hugetlb object of `size` fits now (reserving more when `reserve`); else why not."""
    need = -(-size // HUGE_PAGE)
    have = free_huge_pages()
    if have >= need:
        return None
    if not reserve:
        return (f"needs {need} free 2 MiB huge pages, {have} free (run with "
                f"--reserve-hugepages, or raise /proc/sys/vm/nr_hugepages)")
    try:
        current = _read_int("/proc/sys/vm/nr_hugepages")
        target = current + need - have
        _write_int("/proc/sys/vm/nr_hugepages", target)
    except OSError as e:
        return f"cannot reserve huge pages: {e.strerror}"
    if ws.hugepages_restore is None:
        ws.hugepages_restore = (current, target)
    else:
        ws.hugepages_restore = (ws.hugepages_restore[0], target)
    have = free_huge_pages()
    return None if have >= need else f"reserved huge pages but only {have} of {need} are free"


# ---- objects ------------------------------------------------------------------------------------

@dataclass
class BenchObject:
    """A memfd of `size` bytes (shmem, or hugetlb with 2 MiB pages), filled with non-zero data.
    Other processes open it as `path` (/proc/OUR_PID/fd/N); we never map it."""

    fd: int
    path: str
    size: int
    kind: str


def create_object(ws: Workspace, kind: str, size: int) -> BenchObject:
    """A memfd of `kind` (hugetlb: rounded up to whole huge pages), filled by bench_writer --fill
    with non-zero data, so that no copy can skip a zero page."""
    flags = os.MFD_CLOEXEC
    if kind == "hugetlb":
        flags |= os.MFD_HUGETLB | (21 << os.MFD_HUGE_SHIFT)
        size = -(-size // HUGE_PAGE) * HUGE_PAGE
    try:
        fd = os.memfd_create(f"uffdsnap-bench-{kind}", flags)
    except OSError as e:
        raise BenchError(f"cannot create a {kind} memfd: {e.strerror}") from None
    ws.fds.append(fd)
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise BenchError(f"cannot size a {kind} memfd to {size} bytes: {e.strerror}") from None
    obj = BenchObject(fd, f"/proc/{os.getpid()}/fd/{fd}", size, kind)
    proc = ws.start([str(devbuild.build("bench_writer")), "--object", obj.path, "--fill"])
    _, err = proc.communicate()
    ws.procs.remove(proc)
    if proc.returncode != 0:
        raise BenchError(f"filling the {kind} object failed: {err.strip() or proc.returncode}")
    return obj


def close_object(ws: Workspace, obj: BenchObject) -> None:
    if obj.fd in ws.fds:
        ws.fds.remove(obj.fd)
        os.close(obj.fd)


# ---- writers -----------------------------------------------------------------------------------

@dataclass
class Writer:
    """A bench_writer process and the log it writes at exit (None when idle: it logs nothing)."""

    proc: subprocess.Popen[str]
    log: str | None


def _read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """One line of a helper's stdout, within `timeout`; BenchError with its stderr otherwise."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if sel.select(timeout):
            line = proc.stdout.readline()
            if line:
                return line.strip()
    err = ""
    if proc.poll() is not None and proc.stderr is not None:
        err = " ".join(proc.stderr.read().strip().splitlines()[-1:])
        raise BenchError(f"{what} exited with status {proc.returncode}"
                         + (f": {err}" if err else ""))
    raise BenchError(f"{what} did not answer within {timeout:g} s")


def expect(proc: subprocess.Popen[str], word: str, what: str,
            timeout: float = READY_TIMEOUT_S) -> str:
    line = _read_line(proc, timeout, what)
    if not line.startswith(word):
        err = proc.stderr.read().strip() if proc.poll() is not None and proc.stderr else ""
        raise BenchError(f"{what}: expected {word!r}, got {line!r} {err}".strip())
    return line


def start_writers(ws: Workspace, obj: BenchObject, n: int, *, rate: float | None, probe: bool,
                  idle: bool, uffd_sock: str | None, max_seconds: int) -> list[Writer]:
    """Start `n` bench_writers on `obj` (the rate is shared among them) and wait until each
    has mapped and prefaulted it; with `uffd_sock` each first hands its uffd to the handler."""
    binary = str(devbuild.build("bench_writer"))
    writers = []
    for i in range(n):
        argv = [binary, "--object", obj.path, "--prefault", "--max-seconds", str(max_seconds),
                "--seed", str(i + 1)]
        log = None
        if idle:
            argv.append("--idle")
        else:
            log = os.path.join(ws.log_dir, f"writer-{uuid.uuid4().hex[:8]}-{i}.log")
            argv += ["--log", log]
            if rate:
                argv += ["--rate", f"{rate / n:.3f}"]
            if probe:
                argv.append("--probe-wp")
        if uffd_sock:
            argv += ["--uffd-sock", uffd_sock]
        writers.append(Writer(ws.start(argv), log))
    for i, w in enumerate(writers):
        expect(w.proc, "ready", f"writer {i} (pid {w.proc.pid})")
    return writers


def stop_writers(ws: Workspace, writers: list[Writer]) -> Fleet:
    """Stop the writers (SIGTERM: each writes its log and exits) and read their logs."""
    for w in writers:
        _signal(w.proc.pid, signal.SIGTERM)
    logs = []
    for i, w in enumerate(writers):
        try:
            w.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        err = w.proc.stderr.read().strip() if w.proc.stderr and w.proc.poll() is not None else ""
        ws.end(w.proc)
        if w.proc.returncode != 0:
            raise BenchError(f"writer {i} exited with status {w.proc.returncode}: {err}")
        if w.log:
            logs.append(read_log(w.log))
    return Fleet(logs)


# ---- events: stop the world, raw copy, native handler, ours -----------------------------------

def raw_copy(src_fd: int, dest: str, size: int) -> int:
    """Copy [0, size) of src_fd to a new file `dest` (pread/pwrite, 1 MiB at a time, sized with
    ftruncate first, like an image); return the nanoseconds the copy itself took."""
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(out, size)
        t0 = now_ns()
        pos = 0
        while pos < size:
            n = os.preadv(src_fd, [view[:min(COPY_CHUNK, size - pos)]], pos)
            if n <= 0:
                break
            done = 0
            while done < n:
                done += os.pwrite(out, view[done:n], pos + done)
            pos += n
        return now_ns() - t0
    finally:
        os.close(out)


def _task_states(pid: int) -> list[str]:
    states = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return []
    return states


def wait_stopped(pids: list[int], timeout: float = 10.0) -> None:
    """Until every thread of every pid is in stopped state (T), polling /proc without sleeping."""
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending:
        pending = [p for p in pending if any(s not in ("T", "t") for s in _task_states(p))]
        if pending and time.monotonic() > deadline:
            raise BenchError(f"processes {pending} did not stop within {timeout:g} s")


def stop_the_world(ws: Workspace, obj: BenchObject, pids: list[int]) -> dict[str, Any]:
    """Freeze every mapper (SIGSTOP), copy the object to the destination, thaw (SIGCONT)."""
    dest = ws.temp_path("stw")
    t_start = now_ns()
    try:
        for pid in pids:
            ws.stopped.add(pid)
            os.kill(pid, signal.SIGSTOP)
        wait_stopped(pids)
        t_stopped = now_ns()
        copy_ns = raw_copy(obj.fd, dest, obj.size)
        t_copied = now_ns()
    finally:
        for pid in pids:
            _signal(pid, signal.SIGCONT)
            ws.stopped.discard(pid)
    t_end = now_ns()
    ws.remove(dest)
    return {"t_start_ns": t_start, "t_stopped_ns": t_stopped, "t_copied_ns": t_copied,
            "t_end_ns": t_end, "pause_ns": t_end - t_start, "stop_ns": t_stopped - t_start,
            "copy_ns": copy_ns, "bytes": obj.size,
            "copy_bytes_per_s": obj.size * 1e9 / max(copy_ns, 1)}


def plain_copy(ws: Workspace, obj: BenchObject) -> dict[str, Any]:
    """A raw copy of the object to the destination, nothing stopped (for an idle object)."""
    dest = ws.temp_path("raw")
    t_start = now_ns()
    copy_ns = raw_copy(obj.fd, dest, obj.size)
    t_end = now_ns()
    ws.remove(dest)
    return {"t_start_ns": t_start, "t_end_ns": t_end, "copy_ns": copy_ns, "bytes": obj.size,
            "copy_bytes_per_s": obj.size * 1e9 / max(copy_ns, 1)}


@dataclass
class Handler:
    """The native reference handler (bench_handler): the baseline for fault service and copy."""

    proc: subprocess.Popen[str]
    sock: str
    dest: str


def start_handler(ws: Workspace, obj: BenchObject, nprocs: int, nice: int = 0) -> Handler:
    """The native reference handler, listening for `nprocs` writers' uffds, at priority `nice`
    (ours runs at the same: see BenchConfig.nice)."""
    sock = ws.temp_path("handler.sock", ws.log_dir)
    dest = ws.temp_path("native")
    proc = ws.start([str(devbuild.build("bench_handler")), "--listen", sock, "--procs",
                     str(nprocs), "--object", obj.path, "--dest", dest],
                    stdin=subprocess.PIPE, preexec_fn=_niced(nice))
    expect(proc, "listening", "the native handler")
    return Handler(proc, sock, dest)


def _niced(nice: int) -> Callable[[], None] | None:
    """A preexec_fn taking priority `nice` in the child (best effort: only root may raise it)."""
    if not nice:
        return None

    def apply() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    return apply


def handler_ready(h: Handler) -> None:
    expect(h.proc, "ready", "the native handler")


def run_native(ws: Workspace, h: Handler, timeout: float) -> dict[str, Any]:
    """Tell the handler to take its snapshot; return its JSON report."""
    stdin: IO[str] | None = h.proc.stdin
    assert stdin is not None
    t_sent = now_ns()
    stdin.write("go\n")
    stdin.flush()
    line = _read_line(h.proc, timeout, "the native handler")
    try:
        result: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        raise BenchError(f"the native handler said {line!r}") from None
    ws.end(h.proc)
    ws.remove(h.dest)
    result["t_sent_ns"] = t_sent
    copy_ns = result["t_copied_ns"] - result["t_protected_ns"]
    result["copy_ns"] = copy_ns
    result["copy_bytes_per_s"] = result["bytes_scanned"] * 1e9 / max(copy_ns, 1)
    result["protect_total_ns"] = result["t_protected_ns"] - result["t_go_ns"]
    return result


def run_ours(ws: Workspace, obj: BenchObject, mode: str, timeout: float,
             nice: int = 0) -> dict[str, Any]:
    """One of our snapshots of `obj` in `mode`, as its own process (uffdsnap.bench.snaprun),
    at priority `nice` (as `uffdsnap snapshot --nice`)."""
    out = ws.temp_path(f"{mode}.img")
    t_launch = now_ns()
    proc = ws.start([sys.executable, "-P", "-m", "uffdsnap.bench.snaprun", "--object", obj.path,
                     "--output", out, "--mode", mode, "--timeout", str(timeout),
                     "--nice", str(nice)])
    try:
        stdout, stderr = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        ws.end(proc)
        raise BenchError(f"our snapshot ({mode}) did not finish within {timeout + 30:g} s") \
            from None
    t_exit = now_ns()
    ws.procs.remove(proc)
    ws.remove(out)
    if proc.returncode != 0:
        why = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise BenchError(f"our snapshot ({mode}) failed: {why}")
    result: dict[str, Any] = json.loads(stdout)
    s = result["summary"]
    t = result["t_snapshot_ns"]
    result.update({"t_launch_ns": t_launch, "t_exit_ns": t_exit,
                   "t_protect_start_ns": t - s["protect_phase_ns"],
                   "t_copied_ns": t + s["copy_ns"]})
    return result


def machine_info(dest_dir: str) -> dict[str, Any]:
    """What a reader needs to weigh the numbers: CPUs, memory, kernel, CPU model, destination."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "kernel": os.uname().release,
                            "python": sys.version.split()[0], "page_size": mmap.PAGESIZE}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    info["dest_dir"] = dest_dir
    info["dest_fs"] = _fs_type(dest_dir)
    return info


def _fs_type(path: str) -> str:
    """The file system type of `path` from /proc/self/mounts (longest matching mount point)."""
    real = os.path.realpath(path)
    best, fs = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, parts[2]
    except OSError:
        pass
    return fs


def load_average() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []
