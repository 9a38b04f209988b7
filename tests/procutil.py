"""Process helpers shared by the end-to-end tests: wait for a child's line, check that writers
make progress, find agents, start a snapshot paused in a phase (test hook)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from uffdsnap import workload as wl
from uffdsnap.image import manifest_path

RESUME_LIMIT_S = 2.0


_PENDING: dict[int, bytes] = {}  # bytes read past a line wait_line returned, per pipe fd


def wait_line(stream, needle: str, timeout: float = 30.0) -> str:
    """Read lines from a child's pipe until one contains `needle` (bounded by `timeout`).

    Reads the pipe's fd directly, keeping what follows the line for the next call (and for
    rest()): two lines that arrive in one read are both seen. Use only wait_line and rest() on
    a pipe, not its file object's own readline()."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        buf = _PENDING.pop(fd, b"")
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace") + "\n"
            seen.append(text)
            if needle in text:
                _PENDING[fd] = buf
                return text
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], left)[0] if left > 0 else []
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            _PENDING[fd] = buf
            why = "timed out" if not ready else "end of output"
            got = "".join(seen)
            raise AssertionError(f"never saw {needle!r} ({why}); got {got!r} + {buf!r}")
        _PENDING[fd] = buf + chunk


def rest(stream) -> str:
    """What wait_line read past its last line and nobody has consumed (for error messages)."""
    return _PENDING.pop(stream.fileno(), b"").decode(errors="replace")


def assert_writers_resume(path: str, writers: list[wl.WriterProcess]) -> None:
    """Every writer makes progress within RESUME_LIMIT_S (none is left blocked)."""
    start = wl.read_live_seqs(path)
    deadline = time.monotonic() + RESUME_LIMIT_S
    while True:
        now = wl.read_live_seqs(path)
        stuck = [w.index for w in writers if now[w.index] <= start[w.index]]
        if not stuck:
            return
        assert time.monotonic() < deadline, f"writers {stuck} did not resume within " \
                                            f"{RESUME_LIMIT_S} s"
        time.sleep(0.01)  # polling progress counters: there is no event to wait on


def children_agents(parent: int) -> list[int]:
    """Pids of agent processes (`uffdsnap agent`, or an agent host forked by its coordinator)
    whose parent is `parent`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        # (an agent host forked by `snapshot` or `coordinator` keeps their command line)
        if ppid == parent and (b"agent" in cmd or comm == "uffdsnap-agents"):
            found.append(int(name))
    return found


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} still running"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def paused_snapshot(shm_path: str, out: str, phase: str, mode: str = "agents",
                    hooks: dict | None = None) -> subprocess.Popen[str]:
    """`uffdsnap snapshot --shm` in a child process, paused in `phase` (test hook) until it
    gets SIGUSR1; `hooks` adds more test hooks (see uffdsnap/testhooks.py)."""
    proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path,
                             "-o", out, "--json", "--mode", mode, "--test-hooks",
                             json.dumps({"pause_in": phase, **(hooks or {})})],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_line(proc.stderr, f"paused in {phase}")
    return proc


def assert_nothing_published(out: str) -> None:
    """No image, no manifest, and no temporary of either left beside them (even after a
    SIGKILL: the image has no name until publish)."""
    assert not os.path.exists(out)
    assert not os.path.exists(manifest_path(out))
    directory, name = os.path.split(os.path.abspath(out))
    left = [f for f in os.listdir(directory) if f.startswith(f".{name}.")]
    assert not left, f"temporaries left behind: {left}"




def finish(proc: subprocess.Popen[str], timeout: float = 90.0) -> tuple[str, str]:
    """Wait for a snapshot process; on timeout kill it and fail with what it printed. (What
    wait_line read ahead on its pipes is put back in front.)"""
    early_out = rest(proc.stdout) if proc.stdout else ""
    early_err = rest(proc.stderr) if proc.stderr else ""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"snapshot still running after {timeout:g} s; stderr: "
                             f"{(early_err + err)[-2000:]}; stdout: {(early_out + out)[-500:]}"
                             ) from None
    return early_out + out, early_err + err


# ---- waiting on the kernel's word, bounded ----------------------------------------------------


def wchan(pid: int) -> str:
    """Where the process's main thread sleeps in the kernel ("handle_userfault": blocked on a
    write-protect fault), "" if it runs or is gone."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip()
    except OSError:
        return ""


def blocked_on_fault(pid: int) -> bool:
    return wchan(pid) == "handle_userfault"


def wait_until(cond, what: str, timeout: float = 30.0) -> None:
    """Poll `cond` (state in /proc or in the object, which nothing signals) until it holds;
    fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.002)


async def await_until(cond, what: str, timeout: float = 30.0) -> None:
    """wait_until for trio code: the event loop keeps running meanwhile."""
    import trio

    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.002)
        return
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def progressed(path: str, index: int, since: int, steps: int):
    """A condition: writer `index` is at least `steps` beyond seq `since`."""
    return lambda: wl.read_live_seqs(path)[index] >= since + steps


class Lifecycle:
    """A helpers/lifecycle.c writer: forks a child writer on SIGUSR1, and on SIGUSR2 moves,
    grows, replaces its mapping or execs itself (`on_usr2`)."""

    def __init__(self, path: str, index: int, child_index: int = -1, supervisor: bool = False,
                 on_usr2: str = "move"):
        from conftest import SPAWNED
        from uffdsnap.testing import build as devbuild

        argv = [str(devbuild.build("lifecycle")), "--object", path, "--index", str(index),
                "--child-index", str(child_index), "--on-usr2", on_usr2]
        self.proc = subprocess.Popen(argv + (["--supervisor"] if supervisor else []),
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, text=True)
        SPAWNED.append(self.proc)
        self.index = index
        self.on_usr2 = on_usr2
        assert "ready" in wait_line(self.proc.stdout, "ready")
        self.children: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fork(self) -> int:
        os.kill(self.proc.pid, signal.SIGUSR1)
        line = wait_line(self.proc.stdout, "forked")
        child = int(line.split("pid=")[1].split()[0])
        self.children.append(child)
        return child

    def remap(self) -> str:
        """Send SIGUSR2; return the line saying it is done (for exec: the new image's ready)."""
        os.kill(self.proc.pid, signal.SIGUSR2)
        return wait_line(self.proc.stdout, "ready" if self.on_usr2 == "exec" else "remapped")

    def stop(self, path: str) -> None:
        wl.set_stop(path)
        self.proc.wait(timeout=30)
        wait_gone(self.children)
