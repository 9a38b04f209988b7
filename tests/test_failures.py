"""The workload never hangs because of us: SIGKILL of the coordinator or of an agent at every
phase, a writer exiting mid-snapshot, and malformed messages from a peer."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from conftest import make_workload, needs_root, start_writers, stop_writers
from uffdsnap import workload as wl
from uffdsnap.image import manifest_path, verify
from uffdsnap.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Protect,
    Protected,
    Role,
    Unprotect,
    Welcome,
)

pytestmark = needs_root
PHASES = ["joining", "protecting", "copying", "finishing"]
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


@pytest.fixture
def writers(shm_path: str) -> Iterator[list[wl.WriterProcess]]:
    make_workload(shm_path, 4, data_pages=512)
    ws = start_writers(shm_path, native=4)
    yield ws
    stop_writers(shm_path, ws)


def paused_snapshot(shm_path: str, out: str, phase: str) -> subprocess.Popen[str]:
    env = {**os.environ, "UFFDSNAP_TEST_HOOKS": json.dumps({"pause_in": phase})}
    proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path,
                             "-o", out, "--json"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_line(proc.stderr, f"paused in {phase}")
    return proc


def assert_nothing_published(out: str) -> None:
    assert not os.path.exists(out)
    assert not os.path.exists(manifest_path(out))


@pytest.mark.parametrize("phase", PHASES)
def test_coordinator_killed(phase: str, shm_path: str, writers: list[wl.WriterProcess],
                            tmp_path: Path) -> None:
    out = str(tmp_path / "x.img")
    proc = paused_snapshot(shm_path, out, phase)
    agents = children_agents(proc.pid)
    assert len(agents) == 4
    proc.kill()
    proc.wait()
    assert_writers_resume(shm_path, writers)
    wait_gone(agents)  # every agent noticed, released, and left
    assert_nothing_published(out)


@pytest.mark.parametrize("phase", PHASES)
def test_agent_killed(phase: str, shm_path: str, writers: list[wl.WriterProcess],
                      tmp_path: Path) -> None:
    out = str(tmp_path / "x.img")
    proc = paused_snapshot(shm_path, out, phase)
    agents = children_agents(proc.pid)
    os.kill(agents[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1, stdout
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert "left while its process lives" in lines[-1] or "lost" in lines[-1], lines
    assert json.loads(stdout)["ok"] is False
    assert_writers_resume(shm_path, writers)
    wait_gone(agents)
    assert_nothing_published(out)


@pytest.mark.parametrize("phase", ["protecting", "copying"])
def test_writer_exit_does_not_fail_the_snapshot(phase: str, shm_path: str,
                                                writers: list[wl.WriterProcess],
                                                tmp_path: Path) -> None:
    out = str(tmp_path / "x.img")
    proc = paused_snapshot(shm_path, out, phase)
    victim = writers.pop(0)
    victim.kill()  # SIGKILL: the process is gone, its agent reports it and leaves
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert [p["pid"] for p in summary["processes_gone"]] == [victim.pid]
    assert wl.check_file(out).ok
    assert verify(out).ok
    assert_writers_resume(shm_path, writers)


# ---- malformed messages from a (fake) coordinator to a real agent ----------------------------


def _frame(obj: object) -> bytes:
    payload = msgpack.packb(obj)
    return struct.pack(">I", len(payload)) + payload


MALFORMED = {
    "garbage": struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1",
    "oversized": struct.pack(">I", 64 << 20),
    "unknown": _frame({"t": "format_disk"}),
    "out-of-range": _frame({"t": "unprotect", "ranges": [[1 << 40, 4096]]}),
    "wrong-field-type": _frame({"t": "unprotect", "ranges": "all"}),
    "out-of-turn": _frame({"t": "welcome", "version": 1, "size": 4096, "page_size": 4096,
                           "major": 0, "minor": 0, "inode": 0, "delegate": False}),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_agent_drops_malformed_coordinator_and_frees_writer(kind: str, shm_path: str,
                                                            tmp_path: Path) -> None:
    layout = make_workload(shm_path, 1, data_pages=256)
    [writer] = start_writers(shm_path, native=1)
    sock_path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    agent = subprocess.Popen([sys.executable, "-m", "uffdsnap", "agent", "--attach",
                              str(writer.pid), "--coordinator", sock_path],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.settimeout(30)
        fake = Connection(Role.COORDINATOR)
        st = os.stat(shm_path)
        while fake.next_message() is None:  # the agent's hello
            fake.receive_data(conn.recv(65536))
        conn.sendall(fake.send(Welcome(PROTOCOL_VERSION, layout.size, layout.page_size,
                                       os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)))
        conn.sendall(fake.send(Protect(1)))
        while not isinstance(msg := fake.next_message(), Protected):
            if msg is None:
                fake.receive_data(conn.recv(65536))
        # the writer is now blocked on a protected page (faults go unanswered)...
        before = wl.read_live_seqs(shm_path)[0]
        conn.sendall(fake.send(Unprotect(((0, layout.page_size),))))  # a valid one first
        conn.sendall(MALFORMED[kind])
        # ...and the agent must drop us and release it
        _, stderr = agent.communicate(timeout=30)
        assert agent.returncode != 0
        assert stderr.count("\n") == 1 and "protocol error" in stderr, stderr
        assert wl.read_live_seqs(shm_path)[0] >= before
        assert_writers_resume(shm_path, [writer])
        conn.close()
    finally:
        if agent.poll() is None:
            agent.kill()
        listener.close()
        stop_writers(shm_path, [writer])
