"""PostgreSQL-like load snapshotted live (issue 11): a pre-forking server running as another user
(uid 65534) whose parent accepts every connection and forks a short-lived child per connection
(helpers/preforker.c --fork-per-connection, as PostgreSQL's postmaster does), under a load
generator that keeps connecting, sending a few requests and closing.

One `uffdsnap snapshot --shm /proc/PID/map_files/START-END` (the server's anonymous shared
memory) runs while the load is served. The image must be one instant (the workload checker) and
verify; every process that mapped the memory writable during the snapshot (the parent, and every
connection child alive at T or forked during the copy) must be among the processes the summary
reports (with their tracked children, and the processes gone); and the load must keep being
served while the command runs. The command's wall time, the request rates before, during and
after it, and the summary's join, protect-phase and total durations are printed (`pytest -s`),
never asserted (no timed assertions in this suite).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import SPAWNED, needs_root
from uffdsnap import workload as wl
from uffdsnap.image import verify
from uffdsnap.testing import build as devbuild

pytestmark = needs_root

NOBODY = 65534
SLOTS = 3  # the server's writer slots: at most this many connection children at once
DATA_PAGES = 1024  # per slot, 4 KiB pages: a 12 MiB object
CLIENTS = 4  # load-generator threads: one more than the slots, so connections also queue
REQUESTS_PER_CONNECTION = 5
MEASURE_S = 2.0  # how long the request rate is measured before and after the snapshot
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0  # a request (or a connect) not answered by then fails the load
SNAPSHOT_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0
CLOCK_MARGIN_NS = 1_000_000  # T comes on the wall clock; children's lives on the monotonic one


# --- the server --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Child:
    """One connection's child, from its "done" line: it mapped the object at least over
    [start_ns, end_ns] (CLOCK_MONOTONIC)."""

    index: int
    pid: int
    seq: int
    ops: int
    start_ns: int
    end_ns: int


@dataclass
class ForkingServer:
    """helpers/preforker --fork-per-connection running as uid 65534. Its stdout (a "done" line
    per connection) is drained by a thread, so that its children never block on a full pipe."""

    proc: subprocess.Popen[str]
    socket_path: str
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)  # ready line, or EOF
    ended: threading.Event = field(default_factory=threading.Event)  # EOF on its stdout
    reader: threading.Thread | None = None
    pid: int = 0
    spec: str = ""  # /proc/PID/map_files/START-END of its shared memory

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            if line.startswith("ready"):
                self.ready.set()
        self.ended.set()
        self.ready.set()

    def _wait_ready(self, slots: int) -> None:
        if not self.ready.wait(READY_TIMEOUT_S) or not self.lines or \
                not self.lines[0].startswith("ready"):
            self.kill()
            raise AssertionError(f"the server did not become ready: {self.lines} "
                                 f"{self.stderr()!r}")
        fields = dict(f.split("=", 1) for f in self.lines[0].split()[1:])
        assert fields["workers"] == str(slots) and fields["pids"] == "", self.lines[0]
        self.pid = int(fields["pid"])
        assert self.pid == self.proc.pid
        self.spec = f"/proc/{self.pid}/map_files/{fields['map']}"

    def children(self) -> list[Child]:
        """Every connection child that has exited so far, in the order they reported."""
        found = []
        for line in list(self.lines):
            if line.startswith("done "):
                f = {k: int(v) for k, v in (x.split("=", 1) for x in line.split()[1:])}
                found.append(Child(f["index"], f["pid"], f["seq"], f["ops"], f["start_ns"],
                                   f["end_ns"]))
        return found

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def stop(self) -> int:
        """The documented way: set the stop word, then connect once (the parent notices the
        word when a connection arrives, which it closes unserved, or when a child exits: then
        it may be gone already) and it waits for its children. Returns the exit status, once
        its output has ended."""
        wl.set_stop(self.spec)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(REQUEST_TIMEOUT_S)
            try:
                s.connect(self.socket_path)
                answer = s.recv(1)
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
                answer = b""  # a child's exit woke it first: it stopped listening
            assert answer == b"", "the server served a connection after its stop word"
        self.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert self.ended.wait(EXIT_TIMEOUT_S), "the server's output did not end"
        return self.proc.returncode

    def kill(self) -> None:
        """Kill the parent and the children it has (they would also die with it: parent
        deathsig), reap it, and let the drain thread end."""
        if self.proc.poll() is None:
            for pid in _children_of(self.proc.pid):
                _kill(pid)
            self.proc.kill()
        self.proc.wait(timeout=EXIT_TIMEOUT_S)
        if self.reader is not None:
            self.reader.join(EXIT_TIMEOUT_S)


@contextmanager
def forking_server(slots: int, data_pages: int) -> Iterator[ForkingServer]:
    """Start the server as uid 65534 and wait until it listens; on the way out (even on
    failure) kill it and its children and remove its directory."""
    where = tempfile.mkdtemp(prefix="uffdsnap-prefork-")
    server: ForkingServer | None = None
    try:
        # The build cache is private to root: the server runs a copy, from a directory it owns
        # (it binds its socket there, and unlinks it when it exits).
        binary = shutil.copy(devbuild.build("preforker"), where)
        os.chmod(where, 0o755)
        os.chown(where, NOBODY, NOBODY)
        socket_path = os.path.join(where, "server.sock")
        argv = [binary, "--workers", str(slots), "--data-pages", str(data_pages), "--listen",
                socket_path, "--fork-per-connection"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/", user=NOBODY,
                                group=NOBODY, extra_groups=[])
        SPAWNED.append(proc)
        server = ForkingServer(proc, socket_path)
        server.reader = threading.Thread(target=server._drain, daemon=True)
        server.reader.start()
        server._wait_ready(slots)
        yield server
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(where, ignore_errors=True)


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the load ----------------------------------------------------------------------------------

@dataclass
class LoadGenerator:
    """CLIENTS threads, each in a loop: connect, send REQUESTS_PER_CONNECTION requests one at a
    time (each a byte, answered with (slot index, seq)), close. Records when each request was
    answered, and the highest seq answered per slot."""

    path: str
    threads: list[threading.Thread] = field(default_factory=list)
    answered_ns: list[list[int]] = field(default_factory=list)  # per client thread
    highest: list[dict[int, int]] = field(default_factory=list)  # per client: slot -> seq
    connections: list[int] = field(default_factory=list)  # per client: connections completed
    stopping: threading.Event = field(default_factory=threading.Event)
    serving: threading.Event = field(default_factory=threading.Event)  # a request answered
    failed: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def start(self, clients: int) -> None:
        for k in range(clients):
            self.answered_ns.append([])
            self.highest.append({})
            self.connections.append(0)
            thread = threading.Thread(target=self._client, args=(k,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _client(self, k: int) -> None:
        answered, highest = self.answered_ns[k], self.highest[k]
        try:
            while not self.stopping.is_set():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(REQUEST_TIMEOUT_S)
                    s.connect(self.path)
                    for _ in range(REQUESTS_PER_CONNECTION):
                        s.sendall(b"r")
                        index, seq = struct.unpack("<QQ", _recv_exactly(s, 16))
                        answered.append(time.monotonic_ns())
                        highest[index] = max(seq, highest.get(index, 0))
                        self.serving.set()
                self.connections[k] += 1
        except Exception as e:  # any failure of a client fails the load
            self.errors.append(f"client {k}: {type(e).__name__}: {e}")
            self.failed.set()

    def stop(self) -> list[int]:
        """Stop every client (each finishes its connection); the clients still running after
        their deadline."""
        self.stopping.set()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 5
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return [k for k, t in enumerate(self.threads) if t.is_alive()]

    def answered_between(self, start_ns: int, end_ns: int) -> int:
        return sum(1 for times in self.answered_ns for t in times if start_ns <= t < end_ns)

    def highest_seqs(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for per_client in self.highest:
            for index, seq in per_client.items():
                out[index] = max(seq, out.get(index, 0))
        return out

    def measure(self, seconds: float) -> tuple[int, int]:
        """Let the load run for `seconds` (ended early only by a failing client); the
        interval's (start, end) in CLOCK_MONOTONIC ns."""
        start = time.monotonic_ns()
        if self.failed.wait(seconds):
            raise AssertionError(f"the load failed: {self.errors}")
        return start, time.monotonic_ns()


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"the server closed the connection after {len(data)} of {n} bytes")
        data += chunk
    return data


def _rate(load: LoadGenerator, interval: tuple[int, int]) -> float:
    start, end = interval
    return load.answered_between(start, end) / max(end - start, 1) * 1e9


# --- the test ----------------------------------------------------------------------------------

def test_fork_per_connection_server_under_load(tmp_path: Path) -> None:
    """A postmaster-like server (parent accepts, forks a child per connection, SLOTS writer
    slots, uid 65534) serves a steady stream of short connections before, during and after
    `uffdsnap snapshot --shm /proc/PID/map_files/START-END`: the image is one instant and
    verifies, every process that mapped the memory during the snapshot was tracked, and
    requests kept being answered while the command ran."""
    out = str(tmp_path / "prefork.img")
    with forking_server(SLOTS, DATA_PAGES) as server:
        load = LoadGenerator(server.socket_path)
        try:
            load.start(CLIENTS)
            if not load.serving.wait(READY_TIMEOUT_S):
                raise AssertionError(f"no request answered: {load.errors}")
            before = load.measure(MEASURE_S)
            seqs_before = wl.read_live_seqs(server.spec)
            offsets = [time.time_ns() - time.monotonic_ns()]
            start = time.monotonic_ns()
            proc = subprocess.run(
                [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", server.spec, "-o", out,
                 "--json"], capture_output=True, text=True, timeout=SNAPSHOT_TIMEOUT_S,
                check=False)
            during = (start, time.monotonic_ns())
            offsets.append(time.time_ns() - time.monotonic_ns())
            after = load.measure(MEASURE_S)
        finally:
            stuck = load.stop()
        assert not stuck, f"load clients {stuck} did not finish"
        status = server.stop()
        children = server.children()
        server_err = server.stderr()

    # what happened (pytest -s shows it), before anything is judged
    rates = [_rate(load, w) for w in (before, during, after)]
    print(f"\nsnapshot command: exit {proc.returncode}, wall {(during[1] - during[0]) / 1e9:.3f} s")
    print(f"requests/s: before {rates[0]:.0f}, during {rates[1]:.0f}, after {rates[2]:.0f} "
          f"({load.answered_between(*during)} answered during the command; "
          f"{sum(load.connections)} connections, {len(children)} children in all)")
    summary: dict[str, Any] = json.loads(proc.stdout) if proc.returncode == 0 else {}
    if summary:
        reported = summary["processes"] + summary["processes_gone"]
        tracked = {p["pid"] for p in reported} | {c for p in reported
                                                  for c in p.get("children", ())}
        in_snapshot = _in_snapshot(children, summary, offsets)
        print(f"summary: join_ns {summary['join_ns']} protect_phase_ns "
              f"{summary['protect_phase_ns']} duration_ns {summary['duration_ns']} (copy_ns "
              f"{summary['copy_ns']}, faults {summary['faults']}); {len(tracked)} pids reported "
              f"(processes {[(p['pid'], p['children']) for p in summary['processes']]}, gone "
              f"{[p['pid'] for p in summary['processes_gone']]}); {len(in_snapshot)} children "
              "alive at T or forked during the copy; "
              f"{sum(p.get('children_unnamed', 0) for p in reported)} children unnamed")

    assert not load.errors, load.errors
    assert status == 0, f"server exit {status}: {server_err}"
    assert proc.returncode == 0, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"

    # the image: one instant, between the state before the command and the final one
    result = wl.check_file(out)
    assert result.ok, result.summary()
    assert verify(out).ok
    finals = {c.index: c.seq for c in children}  # the last line of each slot: its final seq
    assert finals == load.highest_seqs()  # every step was a request, and each was answered
    for i, seq in enumerate(result.seqs):
        assert seqs_before[i] <= seq <= finals[i], (i, seqs_before[i], seq, finals[i])

    # every process that mapped the memory writable during the snapshot was tracked: named,
    # or counted among the children tracked from birth that exited before /proc showed them
    missing = [c for c in in_snapshot if c.pid not in tracked]
    unnamed = sum(p.get("children_unnamed", 0) for p in reported)
    if server.pid not in tracked or len(missing) > unnamed:
        pytest.fail(f"mapped the memory during the snapshot, not reported: "
                    f"{'' if server.pid in tracked else f'the server {server.pid}, '}"
                    f"{len(missing)} of {len(in_snapshot)} children alive at T or forked during "
                    f"the copy, {unnamed} unnamed reported: {_lives(missing, summary, offsets)}; "
                    f"reported {sorted(tracked)}", pytrace=False)
    ours = {server.pid} | {c.pid for c in children}
    assert tracked <= ours, f"reported, not ours: {sorted(tracked - ours)}"

    # the load kept being served while the command ran
    assert load.answered_between(*during) > 0


def _lives(children: list[Child], summary: dict[str, Any], offsets: list[int]) -> str:
    """Each child's pid, slot and life in ms from T (the copy ends at copy_ns)."""
    t_mono = summary["snapshot_time_unix_ns"] - sum(offsets) // 2
    return ", ".join(f"{c.pid} (slot {c.index}, {(c.start_ns - t_mono) / 1e6:+.2f}.."
                     f"{(c.end_ns - t_mono) / 1e6:+.2f} ms)" for c in children)


def _in_snapshot(children: list[Child], summary: dict[str, Any],
                 offsets: list[int]) -> list[Child]:
    """The children that mapped the object while the snapshot was in force: alive at T or
    forked during the copy. A child's reported life lies within its mapping's; T comes on the
    wall clock (`offsets`: wall minus monotonic, read just before and after the command), so
    the window is narrowed by a margin on each side."""
    margin = CLOCK_MARGIN_NS + abs(offsets[1] - offsets[0])  # (wider if the wall clock moved)
    t_mono = summary["snapshot_time_unix_ns"] - sum(offsets) // 2
    if summary["copy_ns"] > 2 * margin:  # overlapping the copy, whatever the clocks' error
        lo, hi = t_mono + margin, t_mono + summary["copy_ns"] - margin
    else:  # a copy too short to tell: alive across T
        lo, hi = t_mono + margin, t_mono - margin
    return [c for c in children if c.start_ns < hi and c.end_ns > lo]
