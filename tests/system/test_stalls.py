"""Bounded waits for writers (issue 14): an agent, the agent host or the coordinator is stopped
(SIGSTOP) in each phase of a snapshot, in both modes, with `snapshot --shm` (one-shot) and with
a long-running `coordinator` that enlisted writers joined. Real writer processes keep writing
all along; a meter records the longest time each one made no progress. Every case must show:
no writer waited longer than the fault deadline plus a margin, a snapshot that needed the
stopped party failed in one clear line, nothing was published, and continuing the stopped
process (SIGCONT) harms nothing (writers run on; a long-running coordinator takes the next
snapshot, consistent). Negative controls: with the deadline watch off (test hook
`no_stall_watch`), the same stop stalls writers past the bound, and the same check says so.

The measured maxima are printed (`pytest -s`: lines "stall ...") for docs/testing.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import SPAWNED, make_workload, needs_root, start_writers, stop_writers
from procutil import (
    assert_nothing_published,
    assert_writers_resume,
    children_agents,
    finish,
    wait_line,
)
from uffdsnap import workload as wl
from uffdsnap.image import verify

pytestmark = [needs_root, pytest.mark.slow]

DEADLINE_S = 2.0  # the default --fault-deadline
MARGIN_S = 1.5  # generous: 2 vCPUs shared by writers, agents, coordinator and the test
BOUND_S = DEADLINE_S + MARGIN_S
STOPPED_S = BOUND_S + 1.5  # how long the role stays stopped: a stall that lasts as long shows
PHASES = ["joining", "protecting", "copying", "finishing"]
# Writers keep meeting protected pages through the whole stop: paced passes over many pages,
# and a scan slowed down (test hook) so that it does not un-protect everything at once.
DATA_PAGES = 1024
RATE = 125.0  # pages per second, per writer: a pass takes 8 s
SCAN_DELAY_S = 0.3
MODES = ["agents", "delegated"]
NO_WATCH = {"no_stall_watch": True, "agent": {"no_stall_watch": True}}


class StallMeter:
    """The longest time each writer's published seq stood still, sampled from the object
    every few milliseconds (the workload's writers publish one per page written)."""

    PERIOD_S = 0.005

    def __init__(self, path: str, indexes: list[int]):
        self.path, self.indexes = path, indexes
        self.longest = dict.fromkeys(indexes, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StallMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last = wl.read_live_seqs(self.path)
        changed = dict.fromkeys(self.indexes, time.monotonic())
        while True:
            stop = self._stop.wait(self.PERIOD_S)
            seqs, now = wl.read_live_seqs(self.path), time.monotonic()
            for i in self.indexes:
                if seqs[i] != last[i] or stop:
                    self.longest[i] = max(self.longest[i], now - changed[i])
                    changed[i] = now
            last = seqs
            if stop:
                return


@dataclass
class Case:
    setup: str  # "oneshot" (`snapshot --shm`) or "longrun" (`coordinator`, enlisted writers)
    role: str  # "coordinator", "host" (the attach agents' host) or "agent" (an enlisted one)
    mode: str
    phase: str
    deadline: float | None = None  # --fault-deadline (None: the default, DEADLINE_S)
    hooks: dict[str, Any] = field(default_factory=dict)  # more coordinator test hooks
    stopped_s: float = STOPPED_S  # how long the role stays stopped

    @property
    def name(self) -> str:
        given = "" if self.deadline is None else f"-deadline{self.deadline:g}"
        hooked = "".join(f"+{hook}" for hook in sorted(self.hooks))
        return f"{self.setup}-{self.role}-{self.mode}-{self.phase}{given}{hooked}"

    @property
    def bound(self) -> float:
        return (DEADLINE_S if self.deadline is None else self.deadline) + MARGIN_S

    @property
    def must_fail(self) -> bool:
        """Whether the snapshot needed the stopped party (a coordinator stopped before
        anything is protected, or after everything is saved, needed by no writer)."""
        return not (self.role == "coordinator" and self.phase in ("joining", "finishing"))


@dataclass
class Outcome:
    bound: float  # the case's deadline plus the margin
    stalls: dict[int, float]  # writer index -> longest stall, seconds
    exempt: set[int]  # a stopped enlisted agent's own writer (agents mode: see _longrun)
    returncode: int
    stdout: str
    stderr: str
    out: str
    extra: dict[str, Any] = field(default_factory=dict)

    def bounded_max(self) -> float:
        return max(v for i, v in self.stalls.items() if i not in self.exempt)


def assert_stalls_bounded(outcome: Outcome) -> None:
    """The guarantee: no writer waited longer than the fault deadline plus the margin (but a
    stopped enlisted agent's own, in agents mode: docs/overview.md, bounded waits)."""
    over = {i: round(v, 2) for i, v in outcome.stalls.items()
            if i not in outcome.exempt and v > outcome.bound}
    assert not over, f"writers stalled past {outcome.bound:g} s: {over}"


def _hooks(case: Case, watch: bool) -> str:
    return json.dumps({"pause_in": case.phase, "scan_delay_s": SCAN_DELAY_S, **case.hooks,
                       **({} if watch else NO_WATCH)})


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_for(victim: int, coordinator: int, seconds: float) -> None:
    """Stop `victim` for `seconds` while the snapshot goes on from its paused phase, then
    continue it. (The coordinator itself is let go on only once it runs again, and only if
    still paused: a SIGUSR1 the pause did not take would be redelivered, and kill it.)"""
    _signal(victim, signal.SIGSTOP)
    if victim != coordinator:
        _signal(coordinator, signal.SIGUSR1)
    try:
        time.sleep(seconds)  # the length of the stop: what is measured, not a synchronization
    finally:
        _signal(victim, signal.SIGCONT)
    if victim == coordinator:
        _unpause(coordinator)


def _usr1_caught(pid: int) -> bool:
    """Whether the process catches SIGUSR1 now (the pause test hook does, while it pauses)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt"))
    except (OSError, StopIteration):
        return False
    return bool(mask & (1 << (signal.SIGUSR1 - 1)))


def _unpause(pid: int, settle_s: float = 1.0) -> None:
    """End a pause that nothing else ends: agents that left end it as soon as the coordinator
    runs; give that `settle_s`, then SIGUSR1 if it still pauses."""
    deadline = time.monotonic() + settle_s
    while _usr1_caught(pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling /proc: nothing signals the end of a pause
    if _usr1_caught(pid):
        _signal(pid, signal.SIGUSR1)


def _oneshot(case: Case, shm: str, tmp_path: Path, watch: bool) -> Outcome:
    make_workload(shm, 3, data_pages=DATA_PAGES)
    ws = start_writers(shm, native=3, rate=RATE)
    out = str(tmp_path / "x.img")
    try:
        with StallMeter(shm, [w.index for w in ws]) as meter:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm, "-o", out,
                 "--json", "--mode", case.mode, "--test-hooks", _hooks(case, watch),
                 *([] if case.deadline is None else ["--fault-deadline", str(case.deadline)])],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            SPAWNED.append(proc)
            wait_line(proc.stderr, f"paused in {case.phase}")
            [host] = children_agents(proc.pid)
            _stop_for(proc.pid if case.role == "coordinator" else host, proc.pid,
                      case.stopped_s)
            stdout, stderr = finish(proc)
            assert_writers_resume(shm, ws)
        return Outcome(case.bound, meter.longest, set(), proc.returncode, stdout, stderr, out)
    finally:
        stop_writers(shm, ws)


def _longrun(case: Case, shm: str, tmp_path: Path, watch: bool) -> Outcome:
    make_workload(shm, 3, data_pages=DATA_PAGES)
    sock = str(tmp_path / "c.sock")
    coord = subprocess.Popen(
        [sys.executable, "-m", "uffdsnap", "coordinator", "--shm", shm, "--listen", sock,
         "--attach", "--mode", case.mode, "--test-hooks", _hooks(case, watch)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    SPAWNED.append(coord)
    ws: list[wl.WriterProcess] = []
    try:
        wait_line(coord.stdout, "listening")
        # writer 0 is attached (the host's), 1 and 2 enlist (an agent each)
        ws = start_writers(shm, native=1, enlisted=2, enlist=sock, rate=RATE,
                           agent_hooks=None if watch else NO_WATCH["agent"])
        out = str(tmp_path / "x.img")
        with StallMeter(shm, [w.index for w in ws]) as meter:
            client = _client(sock, out)
            wait_line(coord.stderr, f"paused in {case.phase}")
            [host] = children_agents(coord.pid)
            [agent] = children_agents(ws[1].pid)
            victim = {"coordinator": coord.pid, "host": host, "agent": agent}[case.role]
            _stop_for(victim, coord.pid, case.stopped_s)
            stdout, stderr = finish(client)
            assert_writers_resume(shm, ws)
        # an enlisted agent holds the only reference to its process's uffd (agents mode):
        # stopped, it holds that process's writers, and it is not ours to kill
        exempt = {ws[1].index} if case.role == "agent" and case.mode == "agents" else set()
        outcome = Outcome(case.bound, meter.longest, exempt, client.returncode, stdout, stderr,
                          out)
        outcome.extra["next"] = _next_snapshot(coord, sock, tmp_path / "next.img", ws)
        return outcome
    finally:
        if ws:
            stop_writers(shm, ws)
        coord.send_signal(signal.SIGTERM)
        try:
            coord.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            coord.kill()


def _client(sock: str, out: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "snapshot", "--coordinator",
                             sock, "-o", out, "--json"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    SPAWNED.append(proc)
    return proc


def _next_snapshot(coord: subprocess.Popen[str], sock: str, out: Path,
                   ws: list[wl.WriterProcess]) -> str:
    """After SIGCONT the long-running coordinator still serves: the next snapshot (writers
    that lost their agent are attached) succeeds and is one instant. Returns "" or why not."""
    assert coord.poll() is None, "the coordinator died"
    client = _client(sock, str(out))
    while client.poll() is None:  # (the hook pauses this snapshot too: let it go)
        try:
            wait_line(coord.stderr, "paused in", timeout=1)
        except AssertionError:
            continue  # not yet, or it failed before the phase (the client then exits)
        _unpause(coord.pid, settle_s=0)
        break
    stdout, stderr = finish(client)
    if client.returncode != 0:
        return stderr.strip() or stdout
    result = wl.check_file(str(out))
    return "" if result.ok and verify(str(out)).ok else result.summary()


def run_case(case: Case, shm: str, tmp_path: Path, watch: bool = True) -> Outcome:
    outcome = (_oneshot if case.setup == "oneshot" else _longrun)(case, shm, tmp_path, watch)
    stalls = {i: round(v, 2) for i, v in outcome.stalls.items()}
    print(f"\nstall {case.name}{'' if watch else ' (no watch)'}: max {outcome.bounded_max():.2f}"
          f" s, per writer {stalls}, exempt {sorted(outcome.exempt)}, exit "
          f"{outcome.returncode}: {outcome.stderr.strip().splitlines()[-1:]}")
    return outcome


def check_outcome(case: Case, outcome: Outcome) -> None:
    """A failed snapshot: one clear line, nothing published. One that succeeded (a case
    where no writer needed the stopped party): consistent."""
    assert "Traceback" not in outcome.stderr, outcome.stderr
    if outcome.returncode == 0:
        assert not case.must_fail, f"{case.name}: the snapshot succeeded"
        result = wl.check_file(outcome.out)
        assert result.ok and verify(outcome.out).ok, result.summary()
    else:
        assert outcome.returncode == 1, outcome.stderr
        lines = outcome.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("uffdsnap: "), outcome.stderr
        assert json.loads(outcome.stdout)["ok"] is False
        assert_nothing_published(outcome.out)
    assert not outcome.extra.get("next"), f"after SIGCONT: {outcome.extra['next']}"


CASES = ([Case("oneshot", role, mode, phase) for role in ("host", "coordinator")
          for mode in MODES for phase in PHASES] +
         [Case("longrun", role, mode, phase) for role in ("agent", "host", "coordinator")
          for mode in MODES for phase in PHASES])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stopped_role_stalls_no_writer_past_the_deadline(case: Case, shm_path: str,
                                                         tmp_path: Path) -> None:
    outcome = run_case(case, shm_path, tmp_path)
    assert_stalls_bounded(outcome)
    check_outcome(case, outcome)


# (stopped while protecting: every writer is held then, so each control stalls for sure)
CONTROLS = [Case("oneshot", "host", "agents", "protecting"),
            Case("oneshot", "coordinator", "agents", "protecting"),
            Case("oneshot", "coordinator", "delegated", "protecting"),
            Case("longrun", "host", "agents", "protecting"),
            Case("longrun", "coordinator", "agents", "protecting")]


@pytest.mark.parametrize("case", CONTROLS, ids=lambda c: c.name)
def test_without_the_deadline_watch_the_stop_stalls_writers(case: Case, shm_path: str,
                                                            tmp_path: Path) -> None:
    """Negative control: the deadline watch off in coordinator and agents, the same stop
    holds writers for as long as it lasts, and the same check catches it."""
    outcome = run_case(case, shm_path, tmp_path, watch=False)
    with pytest.raises(AssertionError, match="stalled past"):
        assert_stalls_bounded(outcome)
    assert outcome.bounded_max() >= case.stopped_s - 0.5


@pytest.mark.parametrize("unprotect", [True, False], ids=["unprotected", "control"])
def test_a_stopped_delegated_agent_is_released_through_our_copy(unprotect: bool, shm_path: str,
                                                                tmp_path: Path) -> None:
    """Delegated mode: an enlisted agent stopped mid-copy (the scan slowed further, so that
    pages are left unsaved when the snapshot fails) cannot release its process, but the
    coordinator holds a copy of its uffd and un-protects it before closing that copy: its own
    writer does not wait for it either. Control (test hook `no_unprotect_for_stopped`): that
    writer waits for as long as its agent is stopped (8 s here: it meets an unsaved page
    a moment after the failure), and the same check says so."""
    hooks: dict[str, Any] = {"scan_delay_s": 1.0}
    if not unprotect:
        hooks["no_unprotect_for_stopped"] = True
    case = Case("longrun", "agent", "delegated", "copying", hooks=hooks, stopped_s=8.0)
    outcome = run_case(case, shm_path, tmp_path)
    check_outcome(case, outcome)
    if unprotect:
        assert_stalls_bounded(outcome)
    else:
        with pytest.raises(AssertionError, match="stalled past"):
            assert_stalls_bounded(outcome)


@pytest.mark.parametrize("case", [Case("oneshot", role, "agents", "copying", deadline=0.5)
                                  for role in ("host", "coordinator")], ids=lambda c: c.name)
def test_fault_deadline_option_sets_the_bound(case: Case, shm_path: str,
                                              tmp_path: Path) -> None:
    """--fault-deadline 0.5: a stopped agent host, or a stopped coordinator (whose agents
    learn the deadline from its welcome), holds writers for that deadline plus the margin,
    not the default's (2 s, already past this bound once the agents' grace is added)."""
    outcome = run_case(case, shm_path, tmp_path)
    assert_stalls_bounded(outcome)
    check_outcome(case, outcome)
    if case.role == "host":
        assert "fault deadline (0.5 s)" in outcome.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "99999", "soon"])
def test_fault_deadline_bad_values(value: str, shm_path: str, tmp_path: Path) -> None:
    make_workload(shm_path, 1, data_pages=16)
    for argv in (["snapshot", "--shm", shm_path, "-o", str(tmp_path / "x.img")],
                 ["coordinator", "--shm", shm_path, "--listen", str(tmp_path / "c.sock")]):
        proc = subprocess.run([sys.executable, "-m", "uffdsnap", *argv, "--fault-deadline",
                               value], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "--fault-deadline" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_fault_waits_sees_a_real_blocked_writer() -> None:
    """The watch's eyes (procfs.FaultWaits): a process blocked on a write-protect fault that
    nobody answers is seen waiting, for as long as it waits, and no longer once woken."""
    import ctypes
    import mmap

    from uffdsnap.native import uffd as K
    from uffdsnap.native.pidfd import pidfd_getfd, pidfd_open
    from uffdsnap.procfs import FaultWaits

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: protects its own page, then writes it (nobody reads its uffd)
        code = 1
        try:
            buf = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            uffd, _ = K.create_uffd()
            K.api(uffd, K.REQUIRED_FEATURES)
            K.register(uffd, addr, 4096)
            K.writeprotect(uffd, addr, 4096, protect=True)
            os.write(w, f"{uffd} {addr}\n".encode())
            buf[0] = 1  # blocks until un-protected
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            uffd_no, addr = (int(x) for x in f.readline().split())
        waits = FaultWaits()
        deadline = time.monotonic() + 10
        while waits.longest({pid}, time.monotonic())[0] != pid:
            assert time.monotonic() < deadline, "the writer never blocked"
            time.sleep(0.01)  # polling /proc: nothing signals a blocked writer
        first = time.monotonic()
        time.sleep(0.3)  # how long it has waited is what is measured
        seen, waited = waits.longest({pid}, time.monotonic())
        assert seen == pid and waited >= time.monotonic() - first - 0.05
        pidfd = pidfd_open(pid)
        try:
            uffd = pidfd_getfd(pidfd, uffd_no)
        finally:
            os.close(pidfd)
        try:
            K.writeprotect(uffd, addr, 4096, protect=False)  # wakes it
        finally:
            os.close(uffd)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert waits.longest({pid}, time.monotonic()) == (0, 0.0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
