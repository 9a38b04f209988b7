"""Process helpers shared by the end-to-end tests: wait for a child's line, check that writers
make progress, find agents, start a snapshot paused in a phase (test hook)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from uffdsnap import workload as wl
from uffdsnap.image import manifest_path

RESUME_LIMIT_S = 2.0


def wait_line(stream, needle: str, timeout: float = 30.0) -> str:
    """Read lines from a child's pipe until one contains `needle`."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"never saw {needle!r}; got {''.join(seen)!r}")


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
    """Pids of `uffdsnap agent` processes whose parent is `parent`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"agent" in cmd:
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
    assert not os.path.exists(out)
    assert not os.path.exists(manifest_path(out))




def finish(proc: subprocess.Popen[str], timeout: float = 90.0) -> tuple[str, str]:
    """Wait for a snapshot process; on timeout kill it and fail with what it printed."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"snapshot still running after {timeout:g} s; stderr: {err[-2000:]}"
                             f"; stdout: {out[-500:]}") from None
