"""ptrace injection against real processes: root and uid-65534 Python targets, C only where a
state cannot be made from Python (an unstoppable vfork parent). No mocks. Every wait is on an
event (a line from the target, a readable uffd, waitid, a pidfd) with a deadline, except "the
thread is inside syscall N", "the vfork parent is in D state" and "the target has a tracer", which
have no event and are polled from /proc."""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uffdsnap import inject
from uffdsnap.inject import (
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SYS_CLOCK_NANOSLEEP,
    SYS_EPOLL_WAIT,
    SYS_EXIT_GROUP,
    SYS_GETPID,
    SYS_READ,
    create_uffd_in,
    injected,
    seccomp_verdict,
)
from uffdsnap.native import uffd
from uffdsnap.native.libc import KernelError

SYS_GETTID = 186
NOBODY = 65534
DEADLINE = 20.0
PAGE = os.sysconf("SC_PAGE_SIZE")
REPO = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: targets run as uid 65534, and userfaultfd/seccomp-filter reads need "
    "CAP_SYS_PTRACE/CAP_SYS_ADMIN or /dev/userfaultfd access")

# The target: maps its own memfd MAP_SHARED, prints "ready PID TID ADDR LEN WORKER_TID", then
# obeys one command per line on stdin (read byte by byte: data after a command stays unread).
# With --leader-exits a second thread (TID) does that once the main thread has exited.
TARGET = r"""
import ctypes, mmap, os, select, signal, struct, sys, threading, time

libc = ctypes.CDLL(None, use_errno=True)
PAGE = mmap.PAGESIZE

def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\n").encode())

def command():
    buf = b""
    while not buf.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            os._exit(0)
        buf += byte
    return buf.decode().split()

def install_seccomp(rules):
    # rules: "NR=ACTION" or "NR/ARG1=ACTION"; ACTION kill|errno. Everything else is allowed.
    prog = [(0x20, 0, 0, 4), (0x15, 1, 0, 0xC000003E), (0x06, 0, 0, 0x80000000)]
    for rule in rules:
        what, action = rule.split("=")
        ret = {"kill": 0x80000000, "errno": 0x00050000 | 1, "trap": 0x00030000}[action]
        nr, _, arg = what.partition("/")
        if arg:
            prog += [(0x20, 0, 0, 0), (0x15, 0, 3, int(nr, 0)), (0x20, 0, 0, 24),
                     (0x15, 0, 1, int(arg, 0)), (0x06, 0, 0, ret)]
        else:
            prog += [(0x20, 0, 0, 0), (0x15, 0, 1, int(nr, 0)), (0x06, 0, 0, ret)]
    prog.append((0x06, 0, 0, 0x7FFF0000))
    code = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *i) for i in prog))
    fprog = struct.pack("<H6xQ", len(prog), ctypes.addressof(code))
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0, ctypes.get_errno()
    install_seccomp.keep = code

usr1 = 0
def on_usr1(signum, frame):
    global usr1
    usr1 += 1
    say("usr1", usr1)
signal.signal(signal.SIGUSR1, on_usr1)

fd = os.memfd_create("uffdsnap-inject-test")
os.ftruncate(fd, 4 * PAGE)
mem = mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
worker_tid = 0
if "--seccomp" in sys.argv:
    install_seccomp(sys.argv[sys.argv.index("--seccomp") + 1:])
if "--thread" in sys.argv:
    started = threading.Event()
    def worker():
        global worker_tid
        worker_tid = threading.get_native_id()
        started.set()
        time.sleep(3600)
    threading.Thread(target=worker, daemon=True).start()
    started.wait()
# --steal: a hostile thread (a new thread per scan with --churn) scans its own fd table for
# whatever names userfaultfd, keeps a dup of it, and tries to make a uffd with a device fd.
stolen, scans, ours = [], 0, set()
def steal_once():
    global scans
    scans += 1
    for name in os.listdir("/proc/self/fd"):
        if int(name) in ours:
            continue
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
            if "userfaultfd" not in link:
                continue
            kept = os.dup(int(name))
            if os.readlink(f"/proc/self/fd/{kept}") != link:  # the number was reused
                os.close(kept)
                continue
        except OSError:
            continue
        ours.add(kept)
        if link == "/dev/userfaultfd":  # USERFAULTFD_IOC_NEW
            made = libc.ioctl(kept, 0xAA00, os.O_CLOEXEC | os.O_NONBLOCK)
            ours.add(made)
            stolen.append("uffd-from-device" if made >= 0 else "device")
        else:
            stolen.append("uffd-copy")
if "--steal" in sys.argv:
    def stealer():
        while True:
            if "--churn" in sys.argv:
                scan = threading.Thread(target=steal_once)
                scan.start()
                scan.join()
            else:
                steal_once()
    threading.Thread(target=stealer, daemon=True).start()
def serve():
    say("ready", os.getpid(), threading.get_native_id(), addr, 4 * PAGE, worker_tid)
    while True:
        cmd = command()
        if cmd[0] == "ping":
            say("pong", usr1)
        elif cmd[0] == "write":
            page, value = int(cmd[1]), int(cmd[2])
            mem[page * PAGE] = value
            say("wrote", page, mem[page * PAGE])
        elif cmd[0] == "sleep":
            seconds = float(cmd[1])
            say("blocking")
            start = time.monotonic()
            time.sleep(seconds)
            say("slept", time.monotonic() - start >= seconds)
        elif cmd[0] == "nanosleep":
            seconds = float(cmd[1])
            ts = struct.pack("<qq", int(seconds), int(seconds % 1 * 1e9))
            say("blocking")
            start = time.monotonic()
            ret = libc.nanosleep(ctypes.c_char_p(ts), None)
            say("slept", ret == 0 and time.monotonic() - start >= seconds, ctypes.get_errno())
        elif cmd[0] == "read":
            say("blocking")
            say("got", os.read(0, int(cmd[1])).decode())
        elif cmd[0] == "cread":
            buf = ctypes.create_string_buffer(64)
            say("blocking")
            ret = libc.read(0, buf, int(cmd[1]))
            say("got", buf.raw[:ret].decode() if ret > 0
                else f"ret={ret},errno={ctypes.get_errno()}")
        elif cmd[0] == "epoll":
            ep = select.epoll()
            ep.register(0, select.EPOLLIN)
            say("blocking")
            events = ep.poll()
            say("got", os.read(0, int(cmd[1])).decode(), events == [(0, select.EPOLLIN)])
        elif cmd[0] == "thefts":
            say("thefts", scans, ",".join(sorted(set(stolen))) or "none")
        elif cmd[0] == "exit":
            os._exit(int(cmd[1]))

if "--leader-exits" in sys.argv:  # a thread serves; the main thread exits (a zombie leader)
    def leaderless():
        while open("/proc/self/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.001)
        serve()
    threading.Thread(target=leaderless).start()
    libc.pthread_exit(None)
serve()
"""


class Target:
    """A TARGET process with line-based I/O that never blocks the test past DEADLINE."""

    def __init__(self, *args: str, user: int | None = None, python: str = sys.executable):
        self.proc = subprocess.Popen([python, "-I", "-c", TARGET, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, cwd="/", user=user,
                                     group=user, extra_groups=None if user is None else [])
        self._buf = b""
        pid, tid, addr, size, worker = map(int, self.expect("ready"))
        assert pid == self.proc.pid
        self.pid, self.tid, self.addr, self.size, self.worker_tid = pid, tid, addr, size, worker

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())

    def line(self, timeout: float = DEADLINE) -> str | None:
        """The next line, or None if none arrives within `timeout`."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, word: str) -> list[str]:
        line = self.line()
        assert line is not None, f"target {self.proc.pid} said nothing (expected {word!r})"
        parts = line.split()
        assert parts[0] == word, f"expected {word!r}, got {line!r}"
        return parts[1:]

    def ping(self) -> int:
        """Proves the target runs and answers; returns how many SIGUSR1 it has handled."""
        self.send("ping\n")
        return int(self.expect("pong")[0])

    def thefts(self) -> tuple[int, str]:
        """(scans so far, what the --steal thread got hold of: "none" or kinds joined by ",")."""
        self.send("thefts\n")
        scans, kinds = self.expect("thefts")
        return int(scans), kinds

    def finish(self) -> int:
        self.send("exit 0\n")
        return self.proc.wait(DEADLINE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)


def status(pid: int | str, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return value.strip()
    raise KeyError(field)


def waitid_within(pid: int, options: int) -> os.waitid_result:
    """os.waitid(P_PID, pid, options) with a deadline (it has no timeout of its own)."""
    result: list[os.waitid_result | None] = []
    waiter = threading.Thread(target=lambda: result.append(os.waitid(os.P_PID, pid, options)),
                              daemon=True)
    waiter.start()
    waiter.join(DEADLINE)
    assert result and result[0] is not None, f"waitid({pid}) saw nothing"
    return result[0]


def wait_in_syscall(pid: int, tid: int, nr: int) -> None:
    """Poll until thread `tid` is blocked inside syscall `nr` (no event exists for that)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            if f.read().split()[0] == str(nr):
                return
        time.sleep(0.001)
    raise AssertionError(f"thread {tid} never entered syscall {nr}")


def fd_table(pid: int) -> dict[str, str]:
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            table[name] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return table


def maps_text(pid: int | str) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def assert_released(target: Target) -> None:
    """Not traced any more, and running: it answers a ping."""
    assert status(target.pid, "TracerPid") == "0"
    target.ping()


@pytest.fixture(scope="module")
def nobody_python() -> str:
    """An interpreter uid 65534 may run (a pyenv under /root is not)."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        try:
            if candidate and subprocess.run([candidate, "-I", "-c", ""], user=NOBODY,
                                            group=NOBODY, extra_groups=[], cwd="/").returncode == 0:
                return candidate
        except PermissionError:
            continue
    pytest.skip("no Python interpreter that uid 65534 can run")


@pytest.fixture
def spawn(request: pytest.FixtureRequest) -> Iterator[Callable[..., Target]]:
    """spawn(*args, user=None) -> Target; every target is killed at teardown."""
    made: list[Target] = []

    def make(*args: str, user: int | None = None) -> Target:
        python = request.getfixturevalue("nobody_python") if user is not None else sys.executable
        target = Target(*args, user=user, python=python)
        made.append(target)
        return target

    yield make
    for target in made:
        target.kill()


USERS = [pytest.param(None, id="root"), pytest.param(NOBODY, id="nobody")]
WP_FEATURES = (uffd.FEATURES["PAGEFAULT_FLAG_WP"] | uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
               | uffd.FEATURES["THREAD_ID"])


def protect_all(target: Target, user: int | None) -> int:
    """Our uffd on the target, its whole mapping write-protected."""
    fd, route = create_uffd_in(target.pid)
    assert route == ("syscall" if user is None else "device")  # uid 65534 may not userfaultfd()
    uffd.api(fd, WP_FEATURES)
    uffd.register(fd, target.addr, target.size, uffd.REGISTER_MODE_WP)
    uffd.writeprotect(fd, target.addr, target.size, True)
    return fd


def wait_fault(fd: int) -> uffd.PageFault:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(DEADLINE * 1000), "no fault arrived on the uffd"
    events = uffd.read_events(fd)
    assert len(events) == 1 and isinstance(events[0], uffd.PageFault), events
    return events[0]


# ---- create_uffd_in: the uffd works on the target, and is ours alone ------------------------


@needs_root
@pytest.mark.parametrize("user", USERS)
def test_write_fault_in_target_reaches_our_uffd(spawn, user):
    target = spawn(user=user)
    fd = protect_all(target, user)
    try:
        target.send("write 1 7\n")
        fault = wait_fault(fd)
        assert fault.address == target.addr + PAGE
        assert fault.flags == uffd.PAGEFAULT_FLAG_WRITE | uffd.PAGEFAULT_FLAG_WP
        assert fault.tid == target.tid
        assert target.line(timeout=0.05) is None  # the writer waits for us
        uffd.writeprotect(fd, target.addr + PAGE, PAGE, False)
        assert target.expect("wrote") == ["1", "7"]
    finally:
        os.close(fd)
    assert target.finish() == 0


@needs_root
@pytest.mark.parametrize("user", USERS)
def test_target_keeps_no_uffd_socket_device_or_scratch_page(spawn, user):
    target = spawn(user=user)
    fds_before, maps_before = fd_table(target.pid), maps_text(target.pid)
    fd, _ = create_uffd_in(target.pid)
    try:
        fds_after = fd_table(target.pid)
        assert fds_after == fds_before
        assert not any("userfaultfd" in link or "socket:" in link for link in fds_after.values())
        assert maps_text(target.pid) == maps_before
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        assert_released(target)
    finally:
        os.close(fd)
    assert target.finish() == 0


@needs_root
@pytest.mark.parametrize("user", USERS)
def test_closing_our_fd_releases_a_blocked_writer(spawn, user):
    target = spawn(user=user)
    fd = protect_all(target, user)
    target.send("write 2 9\n")
    assert wait_fault(fd).address == target.addr + 2 * PAGE
    os.close(fd)
    assert target.expect("wrote") == ["2", "9"]
    assert target.finish() == 0


def test_user_mode_only_is_refused():
    with pytest.raises(ValueError, match="USER_MODE_ONLY"):
        create_uffd_in(os.getpid(), os.O_CLOEXEC | uffd.UFFD_USER_MODE_ONLY)


# ---- the interrupted syscall resumes as if nothing happened ---------------------------------

BLOCKING = {
    # command: (syscall the thread sits in, data we send after injecting, expected reply)
    "sleep 0.5": (SYS_CLOCK_NANOSLEEP, "", ["slept", "True"]),
    "nanosleep 0.5": (SYS_CLOCK_NANOSLEEP, "", ["slept", "True", "0"]),
    "read 5": (SYS_READ, "hello", ["got", "hello"]),
    "cread 5": (SYS_READ, "hello", ["got", "hello"]),
    "epoll 5": (SYS_EPOLL_WAIT, "hello", ["got", "hello", "True"]),
}


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("command", list(BLOCKING))
def test_blocked_call_carries_on_after_injection(spawn, user, command):
    if user is not None and os.geteuid() != 0:
        pytest.skip("needs root to run a uid 65534 target")
    nr, data, reply = BLOCKING[command]
    target = spawn(user=user)
    target.send(command + "\n")
    target.expect("blocking")
    wait_in_syscall(target.pid, target.tid, nr)
    with injected(target.pid) as t:
        assert t.stop_point.syscall_nr == nr
        assert t.syscall(SYS_GETPID) == target.pid
    if nr != SYS_EPOLL_WAIT:  # epoll_wait returns EINTR on any stop; Python retries it
        assert t.stop_point.restart is not None
    assert status(target.pid, "TracerPid") == "0"
    target.send(data)
    assert target.expect(reply[0]) == reply[1:]
    assert target.ping() == 0
    assert target.finish() == 0


# ---- signals that arrive while we hold the thread ------------------------------------------


def test_signal_arriving_mid_injection_is_delivered_once(spawn):
    target = spawn()
    with injected(target.pid) as t:
        os.kill(target.pid, signal.SIGUSR1)
        assert t.syscall(SYS_GETPID) == target.pid
        assert t.syscall(SYS_GETTID) == target.tid
    assert target.expect("usr1") == ["1"]
    assert target.ping() == 1
    assert target.finish() == 0


def test_sigstop_mid_injection_leaves_target_stopped_as_asked(spawn):
    target = spawn()
    with injected(target.pid) as t:
        os.kill(target.pid, signal.SIGSTOP)
        assert t.syscall(SYS_GETPID) == target.pid
    assert waitid_within(target.pid, os.WSTOPPED | os.WNOWAIT).si_code == os.CLD_STOPPED
    assert status(target.pid, "TracerPid") == "0"
    os.kill(target.pid, signal.SIGCONT)
    assert target.ping() == 0
    assert target.finish() == 0


def test_stopped_target_is_served_and_stays_stopped(spawn):
    target = spawn()
    os.kill(target.pid, signal.SIGSTOP)
    waitid_within(target.pid, os.WSTOPPED | os.WNOWAIT)
    with injected(target.pid) as t:
        assert t.syscall(SYS_GETPID) == target.pid
    assert status(target.pid, "TracerPid") == "0"
    assert waitid_within(target.pid, os.WSTOPPED | os.WNOWAIT).si_code == os.CLD_STOPPED
    os.kill(target.pid, signal.SIGCONT)
    assert target.ping() == 0
    assert target.finish() == 0


def test_scratch_memory_round_trip_and_removal(spawn):
    target = spawn()
    maps_before = maps_text(target.pid)
    with injected(target.pid) as t:
        page = t.map_scratch()
        t.write(page + 8, b"uffdsnap")
        assert t.read(page, 16) == bytes(8) + b"uffdsnap"
        kept = t.map_scratch(3 * PAGE)  # left for the block's exit to unmap
        t.write(kept + 2 * PAGE, b"x")
        assert t.read(kept + 2 * PAGE, 1) == b"x"
    assert maps_text(target.pid) == maps_before
    assert_released(target)
    assert target.finish() == 0


@needs_root
def test_a_started_tracer_stops_its_target_at_once_and_serves_its_session(spawn):
    """start_tracers (what an agent host does for a burst of targets): the tracer stops its
    target before anyone asks, and the session that comes next uses it; a started tracer for
    another thread is let go (the target runs on) and the session gets a new one."""
    from uffdsnap.inject import _tracer

    target, other = spawn(), spawn()
    inject.start_tracers([(target.pid, target.tid), (other.pid, other.tid + 1_000_000)])
    started = _tracer._STARTED[target.pid][1]
    wait_status(target.pid, "TracerPid", str(started))
    wait_status(target.pid, "State", "t (tracing stop)")  # stopped, no session yet
    with injected(target.pid, target.tid) as t:
        assert int(status(target.pid, "TracerPid")) == started
        assert t.syscall(SYS_GETPID) == target.pid
    assert_released(target)
    with injected(other.pid, other.tid) as t:  # (its started tracer named no such thread)
        assert t.syscall(SYS_GETPID) == other.pid
    assert_released(other)
    assert not _tracer._STARTED
    assert target.finish() == 0 and other.finish() == 0


@needs_root
def test_a_started_tracer_nobody_claims_lets_go(spawn, monkeypatch):
    """A started tracer whose session never comes releases its target after UNCLAIMED_S and
    exits (a host that asked for it and then did not use it never holds a target stopped); a
    session after that gets a new tracer."""
    from uffdsnap.inject import _tracer

    monkeypatch.setattr(_tracer, "UNCLAIMED_S", 0.2)
    target = spawn()
    inject.start_tracers([(target.pid, target.tid)])
    started = _tracer._STARTED[target.pid][1]
    wait_status(target.pid, "TracerPid", str(started))
    assert waitid_within(started, os.WEXITED | os.WNOWAIT).si_status == 0
    assert_released(target)
    with injected(target.pid, target.tid) as t:
        assert int(status(target.pid, "TracerPid")) not in (0, started)
        assert t.syscall(SYS_GETPID) == target.pid
    assert_released(target)
    assert target.finish() == 0


@needs_root
def test_a_target_asks_a_short_slice_while_injected_and_gets_its_own_back(spawn):
    """While we drive it (each injected call makes it run a few times, and with every CPU busy
    each run waits for a turn) the thread we inject into asks EEVDF's shortest slice, its nice
    value kept; released, it has its own slice and nice value back. Its other threads are not
    touched."""
    from uffdsnap.native import sched

    target = spawn("--thread")
    own = sched.ask_slice(target.tid, 5_000_000)  # a slice and a nice value of its own
    os.setpriority(os.PRIO_PROCESS, target.tid, 3)
    assert own is not None and _slice_of(target.pid, target.tid) == 5_000_000
    worker = _slice_of(target.pid, target.worker_tid)
    with injected(target.pid, target.tid) as t:
        assert _slice_of(target.pid, target.tid) == sched.SHORTEST_SLICE_NS
        assert os.getpriority(os.PRIO_PROCESS, target.tid) == 3
        assert t.syscall(SYS_GETPID) == target.pid
        assert _slice_of(target.pid, target.worker_tid) == worker
    assert _slice_of(target.pid, target.tid) == 5_000_000
    assert os.getpriority(os.PRIO_PROCESS, target.tid) == 3
    assert_released(target)
    assert target.finish() == 0


def _slice_of(pid: int, tid: int) -> int:
    """The slice the scheduler gives thread `tid` of `pid` (ns), as /proc says."""
    with open(f"/proc/{pid}/task/{tid}/sched") as f:
        return int(next(line for line in f if line.startswith("se.slice")).split(":")[1])


def wait_status(pid: int, field: str, value: str) -> None:
    """Poll until /proc/PID/status says `field` is `value` (no event exists for that)."""
    deadline = time.monotonic() + DEADLINE
    while status(pid, field) != value:
        assert time.monotonic() < deadline, f"{field} of {pid}: {status(pid, field)!r}"
        time.sleep(0.001)


def test_injects_into_another_thread(spawn):
    target = spawn("--thread")
    wait_in_syscall(target.pid, target.worker_tid, SYS_CLOCK_NANOSLEEP)
    with injected(target.pid, target.worker_tid) as t:
        assert t.syscall(SYS_GETTID) == target.worker_tid
        assert t.syscall(SYS_GETPID) == target.pid
    assert_released(target)
    assert target.finish() == 0


@needs_root
@pytest.mark.parametrize("user", USERS)
def test_process_whose_main_thread_exited_gets_a_working_uffd(spawn, user):
    """A zombie group leader has no /proc/PID/mem and no files for pidfd_getfd(): we must stop,
    read and take fds through a live thread, on both routes (the device one reads and writes
    target memory)."""
    target = spawn("--leader-exits", user=user)
    assert target.tid != target.pid and status(target.pid, "State").startswith("Z")
    fds_before, maps_before = fd_table(target.pid), maps_text(f"{target.pid}/task/{target.tid}")
    fd = protect_all(target, user)
    try:
        assert fd_table(target.pid) == fds_before
        assert maps_text(f"{target.pid}/task/{target.tid}") == maps_before
        assert status(f"{target.pid}/task/{target.tid}", "TracerPid") == "0"
        target.send("write 3 4\n")
        fault = wait_fault(fd)
        assert (fault.address, fault.tid) == (target.addr + 3 * PAGE, target.tid)
        uffd.writeprotect(fd, target.addr + 3 * PAGE, PAGE, False)
        assert target.expect("wrote") == ["3", "4"]
    finally:
        os.close(fd)
    assert target.finish() == 0


# ---- nothing we lend outlives its use: the other threads are stopped meanwhile -------------

LEND_ROUNDS = 100  # attaches a hostile target gets to catch what we lend it
CONTROL_ROUNDS = 300  # the control's bound: it must catch the lent fd within these


def thread_states(pid: int) -> dict[int, tuple[str, str]]:
    """{tid: (State, TracerPid)} of every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = (status(f"{pid}/task/{tid}", "State"),
                             status(f"{pid}/task/{tid}", "TracerPid"))
        except (OSError, KeyError):
            pass  # (a --churn scan thread that just exited)
    return out


def wait_scanning(target: Target) -> int:
    """Until the --steal thread has scanned again (it runs: nothing left it stopped); the
    count. Polled: a spinning thread signals nothing."""
    first, _ = target.thefts()
    deadline = time.monotonic() + DEADLINE
    while (now := target.thefts()[0]) <= first:
        assert time.monotonic() < deadline, "the stealing thread stopped scanning"
        time.sleep(0.001)
    return now


@needs_root
@pytest.mark.parametrize("churn", [False, True], ids=["spinning-thread", "new-thread-per-scan"])
def test_no_other_thread_can_take_the_lent_device_fd(spawn, churn):
    """A uid-65534 target whose other thread scans its fd table for anything naming
    userfaultfd (or, --churn, a thread created anew for every scan: threads born while we stop
    the others) never gets the /dev/userfaultfd fd we lend it nor a copy of the uffd, over
    LEND_ROUNDS attaches; and every attach still leaves it running, untraced, working."""
    target = spawn("--steal", *(["--churn"] if churn else []), user=NOBODY)
    wait_scanning(target)
    for _ in range(LEND_ROUNDS):
        fd, route = create_uffd_in(target.pid)
        os.close(fd)
        assert route == "device"
    assert target.thefts()[1] == "none"
    wait_scanning(target)  # the other threads were let go
    assert all(tracer == "0" and not state.startswith("t")
               for state, tracer in thread_states(target.pid).values())
    fd = protect_all(target, NOBODY)
    try:
        target.send("write 1 5\n")
        assert wait_fault(fd).address == target.addr + PAGE
        uffd.writeprotect(fd, target.addr + PAGE, PAGE, False)
        assert target.expect("wrote") == ["1", "5"]
    finally:
        os.close(fd)
    assert target.thefts()[1] == "none"
    assert target.finish() == 0


@needs_root
def test_control_threads_left_running_take_the_lent_device_fd(spawn):
    """The negative control: with the other threads left running (test hook lend_unfrozen, the
    behaviour before), the same thread gets the device fd and makes a uffd with it, which
    vm.unprivileged_userfaultfd=0 denies uid 65534."""
    target = spawn("--steal", user=NOBODY)
    wait_scanning(target)
    kinds = "none"
    for _ in range(CONTROL_ROUNDS):
        fd, route = create_uffd_in(target.pid, test_hooks={"lend_unfrozen": True})
        os.close(fd)
        assert route == "device"
        kinds = target.thefts()[1]
        if "uffd-from-device" in kinds:
            break
    assert "uffd-from-device" in kinds, f"no theft in {CONTROL_ROUNDS} rounds: {kinds}"


@needs_root
def test_other_threads_stay_stopped_while_a_lent_fd_is_open_and_go_on_any_way_out(spawn):
    """Stopped other threads are resumed only once no fd we made is left in the target; an
    error inside the block still closes it, then resumes them."""
    target = spawn("--thread", user=NOBODY)
    wait_in_syscall(target.pid, target.worker_tid, SYS_CLOCK_NANOSLEEP)
    device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    fds_before = fd_table(target.pid)
    try:
        with pytest.raises(RuntimeError, match="on purpose"), injected(target.pid) as t:
            assert t.stop_other_threads() == 1
            assert thread_states(target.pid)[target.worker_tid][0].startswith("t")
            theirs = t.give_fd(device)
            with pytest.raises(KernelError, match="still open") as caught:
                t.resume_other_threads()
            assert caught.value.errno == errno.EBUSY
            assert thread_states(target.pid)[target.worker_tid][0].startswith("t")
            assert str(theirs) in fd_table(target.pid)
            raise RuntimeError("on purpose")
    finally:
        os.close(device)
    assert fd_table(target.pid) == fds_before
    assert all(tracer == "0" for _state, tracer in thread_states(target.pid).values())
    wait_in_syscall(target.pid, target.worker_tid, SYS_CLOCK_NANOSLEEP)  # back in its sleep
    assert_released(target)
    assert target.finish() == 0


@needs_root
def test_target_killed_while_its_threads_are_stopped_is_a_clear_error(spawn):
    target = spawn("--thread", user=NOBODY)
    with pytest.raises(KernelError) as caught, injected(target.pid) as t:
        t.stop_other_threads()
        os.kill(target.pid, signal.SIGKILL)
        t.syscall(SYS_GETPID)
    assert caught.value.errno == errno.ESRCH
    assert target.proc.wait(DEADLINE) == -signal.SIGKILL


# ---- targets that go away, or cannot be had ------------------------------------------------


def test_target_exiting_mid_injection_is_a_clear_error(spawn):
    target = spawn()
    with pytest.raises(KernelError) as caught, injected(target.pid) as t:
        t.syscall(SYS_EXIT_GROUP, 7)
    assert caught.value.errno == errno.ESRCH
    assert "exited" in str(caught.value)
    assert target.proc.wait(DEADLINE) == 7  # its exit status was left for its parent


def test_target_killed_mid_injection_is_a_clear_error(spawn):
    target = spawn()
    with pytest.raises(KernelError) as caught, injected(target.pid) as t:
        os.kill(target.pid, signal.SIGKILL)
        t.syscall(SYS_GETPID)
    assert caught.value.errno == errno.ESRCH
    assert target.proc.wait(DEADLINE) == -signal.SIGKILL


def test_missing_process_is_a_clear_error():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1  # no process can have it
    with pytest.raises(KernelError) as caught:
        create_uffd_in(pid)
    assert caught.value.errno == errno.ESRCH


def test_zombie_is_a_clear_error(spawn):
    target = spawn()
    target.send("exit 3\n")
    waitid_within(target.pid, os.WEXITED | os.WNOWAIT)  # a zombie now
    with pytest.raises(KernelError) as caught:
        create_uffd_in(target.pid)
    assert caught.value.errno == errno.ESRCH
    assert target.proc.wait(DEADLINE) == 3


def test_already_traced_target_is_a_clear_error(spawn):
    target = spawn()
    tracer = subprocess.Popen(
        [sys.executable, "-I", "-c",
         "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
         "libc.syscall.restype = ctypes.c_long; "
         f"assert libc.syscall(101, 0x4206, {target.pid}, 0, 0) == 0, ctypes.get_errno(); "
         "print('tracing', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert tracer.stdout is not None and tracer.stdout.readline() == b"tracing\n"
        with pytest.raises(KernelError) as caught, injected(target.pid):
            pass
        assert caught.value.errno == errno.EPERM
        assert f"already traced by pid {tracer.pid}" in str(caught.value)
    finally:
        assert tracer.stdin is not None
        tracer.stdin.close()
        tracer.wait(DEADLINE)
    assert_released(target)
    assert target.finish() == 0


@pytest.fixture(scope="module")
def vfork_wait(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for helpers/inject_targets/vfork_wait.c")
    exe = tmp_path_factory.mktemp("inject") / "vfork_wait"
    subprocess.run([cc, "-O2", "-o", str(exe), str(REPO / "helpers/inject_targets/vfork_wait.c")],
                   check=True)
    return str(exe)


def test_unstoppable_target_times_out_then_is_released_when_it_can_stop(vfork_wait):
    proc = subprocess.Popen([vfork_wait], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"vforking")
        deadline = time.monotonic() + DEADLINE
        while not status(proc.pid, "State").startswith("D"):  # no event for "in vfork wait"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with pytest.raises(KernelError) as caught, injected(proc.pid, timeout=0.2):
            pass
        assert caught.value.errno == errno.ETIMEDOUT
        assert proc.stdin is not None
        proc.stdin.write(b"x")  # the vfork child exits; the parent stops, we restore + detach
        proc.stdin.flush()
        assert proc.stdout.readline() == b"done\n"
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# A thread in the kernel's vfork wait (state D: PTRACE_INTERRUPT cannot stop it) beside a main
# thread that can be stopped; the vfork child exits when a byte arrives on stdin.
VFORK_THREAD_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
static void *vforker(void *arg) {
    char c;
    pid_t child = vfork();
    if (child == 0)
        _exit(read(0, &c, 1) == 1 ? 0 : 1);
    waitpid(child, NULL, 0);
    printf("done\n");
    fflush(stdout);
    return arg;
}
int main(void) {
    pthread_t thread;
    pthread_create(&thread, NULL, vforker, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_join(thread, NULL);
    return 0;
}
"""


def test_a_thread_that_cannot_stop_fails_the_attach_and_stops_nothing(tmp_path):
    """create_uffd_in stops the other threads before it lends anything; one that cannot stop
    (vfork wait) makes it fail with ETIMEDOUT, and no thread is left stopped or traced: the
    vforking thread carries on when its child exits."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "vfork_thread"
    (tmp_path / "vfork_thread.c").write_text(VFORK_THREAD_C)
    subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(tmp_path / "vfork_thread.c")],
                   check=True)
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + DEADLINE
        while not any(state.startswith("D") for tid, (state, _) in
                      thread_states(proc.pid).items() if tid != proc.pid):  # no event for it
            assert time.monotonic() < deadline, thread_states(proc.pid)
            time.sleep(0.001)
        with pytest.raises(KernelError) as caught:
            create_uffd_in(proc.pid, timeout=1.0)
        assert caught.value.errno == errno.ETIMEDOUT, caught.value
        assert "did not stop" in str(caught.value)
        states = thread_states(proc.pid)
        assert all(tracer == "0" for _state, tracer in states.values()), states
        assert not states[proc.pid][0].startswith("t"), states
        assert proc.stdin is not None
        proc.stdin.write(b"x")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"done\n"
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the injecting process dies ----------------------------------------------------------------

# An agent that injects through the API and then waits, killed by the test at a chosen point:
# "stopped" (just attached), "holding" (a scratch page, a uffd and a /dev/userfaultfd fd given to
# the target, all still there: the worst moment to die), "in-call" (inside an injected nanosleep).
AGENT = r"""
import os, struct, sys
from uffdsnap.inject import SYS_NANOSLEEP, SYS_USERFAULTFD, injected
pid, point = int(sys.argv[1]), sys.argv[2]
with injected(pid) as t:
    if point != "stopped":
        page = t.map_scratch()
        t.syscall_fd(SYS_USERFAULTFD, os.O_NONBLOCK | os.O_CLOEXEC)
        device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        t.give_fd(device)
    print("holding", t.tid, flush=True)
    if point == "in-call":
        t.write(page, struct.pack("<qq", 1, 0))
        t.syscall(SYS_NANOSLEEP, page, 0)
    sys.stdin.read()
"""


def line_of(proc: subprocess.Popen[bytes]) -> str:
    """The next line `proc` prints, within DEADLINE (it prints nothing else meanwhile)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + DEADLINE
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"{proc.pid} said nothing"
        byte = os.read(fd, 1)
        assert byte, f"{proc.pid} exited with {proc.wait(DEADLINE)} before saying anything"
        buf += byte
    return buf.decode()


def traced_by(pid: int) -> int:
    """Poll until `pid` has a tracer (no event exists for that); its pid."""
    deadline = time.monotonic() + DEADLINE
    while (tracer := int(status(pid, "TracerPid"))) == 0:
        assert time.monotonic() < deadline, f"{pid} was never traced"
        time.sleep(0.001)
    return tracer


def wait_exit(pid: int) -> None:
    """Wait, within DEADLINE, until process `pid` (not our child) has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([pidfd], [], [], DEADLINE)[0], f"{pid} did not exit"
    finally:
        os.close(pidfd)


def uffds_in(pid: int) -> list[str]:
    return [fd for fd, link in fd_table(pid).items() if link == "anon_inode:[userfaultfd]"]


@needs_root
@pytest.mark.parametrize("point", ["stopped", "holding", "in-call"])
def test_agent_killed_mid_injection_leaves_target_running_and_unaltered(spawn, point):
    """SIGKILL of the injecting process is the one exit no `finally` sees; were the tracer a
    thread of it, the kernel would detach the target with injected registers in place (it
    crashes in the borrowed vdso code) and leave the uffd we made in it."""
    target = spawn()
    fds_before, maps_before = fd_table(target.pid), maps_text(target.pid)
    agent = subprocess.Popen([sys.executable, "-P", "-c", AGENT, str(target.pid), point],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert line_of(agent) == f"holding {target.tid}\n"
        tracer = int(status(target.pid, "TracerPid"))
        assert tracer != 0
        if point == "in-call":
            wait_in_syscall(target.pid, target.tid, inject.SYS_NANOSLEEP)
        else:
            assert status(target.pid, "State").startswith("t")
        assert bool(uffds_in(target.pid)) == (point != "stopped")
        agent.kill()
        assert agent.wait(DEADLINE) == -signal.SIGKILL
        wait_exit(tracer)  # it finishes any call, removes what was made, restores, detaches
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(DEADLINE)
    assert status(target.pid, "TracerPid") == "0"
    assert status(target.pid, "State")[0] not in "tT"
    assert uffds_in(target.pid) == []
    assert fd_table(target.pid) == fds_before
    assert maps_text(target.pid) == maps_before
    assert target.ping() == 0  # its registers are its own: it runs on and answers
    target.send("write 1 5\n")
    assert target.expect("wrote") == ["1", "5"]
    assert target.finish() == 0


def test_attach_agent_killed_before_the_target_stops_releases_it(vfork_wait, tmp_path):
    """`uffdsnap agent --attach` SIGKILLed while the target cannot stop yet (vfork wait): the
    target is stopped, restored and released once it can stop, and runs on to a clean exit."""
    proc = subprocess.Popen([vfork_wait], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    agent = None
    try:
        assert line_of(proc).startswith("vforking")
        deadline = time.monotonic() + DEADLINE
        while not status(proc.pid, "State").startswith("D"):  # no event for "in vfork wait"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        agent = subprocess.Popen([sys.executable, "-P", "-m", "uffdsnap", "agent", "--attach",
                                  str(proc.pid), "--coordinator", str(tmp_path / "none.sock")],
                                 stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tracer = traced_by(proc.pid)  # seized; its PTRACE_INTERRUPT waits for the vfork
        agent.kill()
        assert agent.wait(DEADLINE) == -signal.SIGKILL
        assert proc.stdin is not None
        proc.stdin.write(b"x")  # the vfork child exits; the parent stops and is released
        proc.stdin.flush()
        wait_exit(tracer)
        assert line_of(proc) == "done\n"
        assert proc.wait(DEADLINE) == 0
    finally:
        for p in (agent, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(DEADLINE)


# ---- seccomp ---------------------------------------------------------------------------------


@needs_root
def test_seccomp_kill_on_userfaultfd_falls_back_to_device_without_killing(spawn):
    target = spawn("--seccomp", f"{uffd.SYS_USERFAULTFD}=kill")
    fd, route = create_uffd_in(target.pid)
    try:
        assert route == "device"
        uffd.api(fd, WP_FEATURES)
        uffd.register(fd, target.addr, target.size, uffd.REGISTER_MODE_WP)
    finally:
        os.close(fd)
    assert_released(target)
    assert target.finish() == 0


@needs_root
def test_seccomp_forbidding_both_routes_is_a_clear_error_and_leaves_nothing(spawn):
    target = spawn("--seccomp", f"{uffd.SYS_USERFAULTFD}=errno",
                   f"16/{uffd.USERFAULTFD_IOC_NEW:#x}=kill")
    fds_before, maps_before = fd_table(target.pid), maps_text(target.pid)
    with pytest.raises(KernelError) as caught:
        create_uffd_in(target.pid)
    assert "seccomp" in str(caught.value)
    assert "injected ioctl" in str(caught.value)
    assert fd_table(target.pid) == fds_before
    assert maps_text(target.pid) == maps_before
    assert_released(target)
    assert target.finish() == 0


@needs_root
def test_seccomp_trap_is_swallowed_if_our_precheck_is_outrun(spawn, monkeypatch):
    """A filter can change between our check and the call (another thread, TSYNC): the SIGSYS
    that RET_TRAP raises for our call must never reach the target (it would dump core)."""
    sys_getppid = 110
    target = spawn("--seccomp", f"{sys_getppid}=trap")
    monkeypatch.setattr(inject, "seccomp_verdict", lambda *args: SECCOMP_RET_ALLOW)
    with pytest.raises(KernelError) as caught, injected(target.pid) as t:
        t.syscall(sys_getppid)
    assert caught.value.errno == errno.ENOSYS
    assert "seccomp" in str(caught.value)
    assert_released(target)
    assert target.finish() == 0


def _bpf(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("<HBBI", *i) for i in insns)


def test_seccomp_verdict_follows_the_kernel_rules():
    allow = _bpf((0x06, 0, 0, SECCOMP_RET_ALLOW))
    deny_close = _bpf((0x20, 0, 0, 0), (0x15, 0, 1, 3), (0x06, 0, 0, SECCOMP_RET_ERRNO | 9),
                      (0x06, 0, 0, SECCOMP_RET_ALLOW))
    kill_arg = _bpf((0x20, 0, 0, 16), (0x54, 0, 0, 0xFF), (0x15, 0, 1, 0x42),
                    (0x06, 0, 0, SECCOMP_RET_KILL_PROCESS), (0x06, 0, 0, SECCOMP_RET_ALLOW))
    assert seccomp_verdict([], 3, (), 0) == SECCOMP_RET_ALLOW
    assert seccomp_verdict([allow, deny_close], 3, (1,), 0) == SECCOMP_RET_ERRNO | 9
    assert seccomp_verdict([allow, deny_close], 4, (1,), 0) == SECCOMP_RET_ALLOW
    assert seccomp_verdict([deny_close, kill_arg], 3, (0x1142,), 0) == SECCOMP_RET_KILL_PROCESS
    assert seccomp_verdict([kill_arg], 3, (0x1143,), 0) == SECCOMP_RET_ALLOW
    assert seccomp_verdict([_bpf((0x35, 0, 0, 0))], 0, (), 0) == SECCOMP_RET_KILL_PROCESS
