"""Hostile peers against the real native core (uffdsnap/native/src/snapcore.c): no peer can hold
the core's lock, so no peer can freeze the coordinator, whose every call into the core takes it.

Each test serves an honest writer process (a delegated uffd, test_kernel_uffd's process A) and
sometimes an honest fault channel beside a hostile peer, a separate process run from this file:
  - one that stops reading its fault channel, keeping a copy of the coordinator's end with its
    send timeout set to 0 (forever) and its buffer at the minimum;
  - one that clears O_NONBLOCK, again and again, on a uffd it lent (its file description is
    the core's too);
  - one that floods valid duplicate faults and drains the answers;
  - one that sends more faults before T than any workload blocks on.
In each, the honest writer's faults keep being served, calls into the core keep returning, and
the hostile peer is dropped (failing the snapshot, which releases everyone) within the fault
deadline, or simply does not get more than its share. Every wait is bounded; a core call that
does not return within TIMEOUT fails the test (in a thread left behind: the lock is held).

Also here: the fault-channel parser's fuzzing (helpers/fuzz_snapcore.c against the library the
tests load, for FUZZ_SECONDS, default 3; UFFDSNAP_FUZZ_SECONDS=600 for a longer run).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from test_kernel_uffd import PAGE, TIMEOUT, Writer, needs_root

from uffdsnap import protocol
from uffdsnap.native import uffd as K
from uffdsnap.native.core import SC_FAILED, CoreEvent, SnapCore
from uffdsnap.protocol import faultchannel as fc

NPAGES = 64
SIZE = NPAGES * PAGE
DEADLINE = 0.5  # the fault deadline these tests set (the default is 2 s)
HOSTILE_PAGES = 32  # the hostile peers fault pages [0, 32); honest writers write above
T = TypeVar("T")


def fault(page: int) -> bytes:
    return fc.encode_fault(protocol.Fault(page * PAGE, 1, 1))


# ---- the hostile peers (run as a script, this file is one) -----------------------------------


def _wait_for_stdin_eof() -> None:
    while sys.stdin.buffer.read(1):
        pass


def silent_peer(sock_fd: int, core_end_fd: int, count: int, stride: int) -> None:
    """Send `count` faults (pages `stride` apart, round the first HOSTILE_PAGES), never read,
    and make the coordinator's end (a copy kept) block forever."""
    core_end = socket.socket(fileno=core_end_fd)
    core_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
    core_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum
    sock = socket.socket(fileno=sock_fd)
    frames = b"".join(fault(i * stride % HOSTILE_PAGES) for i in range(count))
    try:
        sock.sendall(frames)
        print("sent", flush=True)
    except OSError as e:  # closed by the core meanwhile: fine, it was told enough
        print(f"sent ({e.strerror})", flush=True)
    _wait_for_stdin_eof()


def flooding_peer(sock_fd: int) -> None:
    """Valid duplicate faults as fast as we can, with as large a send buffer as any user may
    have (net.core.wmem_max) so that the core always finds more, answers drained as fast as we
    can (by a process of its own: a thread would wait for the interpreter's lock)."""
    sock = socket.socket(fileno=sock_fd)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)  # (capped at wmem_max)
    if os.fork() == 0:
        try:
            while sock.recv(1 << 20):
                pass
        finally:
            os._exit(0)
    chunk = fault(0) * 1024
    sock.sendall(chunk)
    print("flooding", flush=True)
    try:
        while True:
            sock.sendall(chunk)
    except OSError as e:
        print(f"stopped: {e.strerror}", flush=True)
    _wait_for_stdin_eof()


def over_limit_peer(sock_fd: int, count: int) -> None:
    """Send `count` faults before T, then wait to be closed."""
    sock = socket.socket(fileno=sock_fd)
    chunk = fault(0) * 1024
    try:
        for _ in range(count // 1024):
            sock.sendall(chunk)
    except OSError:
        pass
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(1 << 16):  # the core answers nothing before T: this waits for EOF
            pass
        print("closed", flush=True)
    except OSError as e:
        print(f"recv: {e.strerror or e}", flush=True)
    _wait_for_stdin_eof()


def nonblock_clearer(uffd: int) -> None:
    """Clear O_NONBLOCK on a lent uffd's file description, and again whenever it is set."""
    flags = fcntl.fcntl(uffd, fcntl.F_GETFL)
    fcntl.fcntl(uffd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    print("cleared", flush=True)
    while not select.select([sys.stdin], [], [], 0.001)[0]:
        flags = fcntl.fcntl(uffd, fcntl.F_GETFL)
        if flags & os.O_NONBLOCK:
            fcntl.fcntl(uffd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


# ---- the test side ---------------------------------------------------------------------------


def bounded(fn: Callable[[], T], what: str, timeout: float = TIMEOUT) -> T:
    """fn() in a thread; fail if it does not return within `timeout` (the core's lock is held:
    the thread is left behind, blocked)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: B036 (handed to the caller)
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{what} did not return within {timeout} s: the core's lock is held")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]


class Rig:
    """A coordinator's core over a memfd, the processes around it, and a bounded teardown."""

    def __init__(self, tmp_path: Path):
        self.memfd = os.memfd_create("hostile", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, SIZE)
        for page in range(NPAGES):
            os.pwrite(self.memfd, bytes([page + 1]) * PAGE, page * PAGE)
        self.img = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self.img, SIZE)
        self.core = SnapCore(self.memfd, self.img, SIZE, PAGE)
        self.core.set_fault_deadline(DEADLINE)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.writers: list[Writer] = []
        self.socks: list[socket.socket] = []
        self.events: list[CoreEvent] = []

    def writer(self, ident: int) -> Writer:
        """An honest writer process whose uffd the core serves (delegated)."""
        w = Writer(self.memfd, NPAGES)
        self.writers.append(w)
        K.api(w.fd, K.REQUIRED_FEATURES | K.FEATURES["THREAD_ID"])
        K.register(w.fd, w.address, SIZE, K.REGISTER_MODE_WP)
        K.writeprotect(w.fd, w.address, SIZE, protect=True)
        bounded(lambda: self.core.add(ident, w.fd, [(w.address, SIZE, 0)]), "add")
        return w

    def channel(self, ident: int) -> tuple[socket.socket, socket.socket]:
        """A fault channel the core serves: (the agent's end, the core's end)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socks += [ours, theirs]
        bounded(lambda: self.core.add_channel(ident, theirs.fileno()), "add_channel")
        return ours, theirs

    def hostile(self, *args: object, fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, __file__, *map(str, args)], pass_fds=fds,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def take_events(self) -> list[CoreEvent]:
        got = bounded(self.core.take_all_events, "take_events")
        self.events += got
        return got

    def wait_event(self, match: Callable[[CoreEvent], bool], what: str,
                   timeout: float = TIMEOUT) -> CoreEvent:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.take_events():
                if match(ev):
                    return ev
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {timeout} s (events: {self.events})"
            select.select([self.core.notify_fd], [], [], left)

    def close(self) -> None:
        for proc in self.procs:  # first: a core blocked on a peer (the old one) gets unblocked
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        try:
            bounded(self.core.close, "close")
        finally:  # (if close hung, its fds stay open: the thread left behind may use them)
            for s in self.socks:
                s.close()
            for w in self.writers:
                w.close()
            os.close(self.img)
            os.close(self.memfd)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def line_from(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> str:
    assert proc.stdout is not None
    ready = select.select([proc.stdout], [], [], timeout)[0]
    assert ready, f"the hostile peer said nothing within {timeout} s"
    return proc.stdout.readline().decode().strip()


def served(w: Writer, page: int, value: int) -> None:
    """The honest writer writes `page` and is served (its write completes)."""
    w.write(page * PAGE + 3, value)
    assert w.report() == f"wrote {page * PAGE + 3} {value}", \
        f"the honest writer's fault on page {page} was not served within {TIMEOUT} s"


def answered(ours: socket.socket, page: int) -> None:
    """An honest agent's fault on `page` comes back as an un-protect covering it."""
    ours.sendall(fault(page))
    ours.settimeout(TIMEOUT)
    try:
        while True:
            head = ours.recv(4, socket.MSG_WAITALL)
            (n,) = struct.unpack(">I", head)
            msg = protocol.decode(ours.recv(n, socket.MSG_WAITALL))
            assert isinstance(msg, protocol.Unprotect)
            if any(off <= page * PAGE < off + length for off, length in msg.ranges):
                return
    except TimeoutError:
        raise AssertionError(f"the honest agent's fault on page {page} was not answered "
                             f"within {TIMEOUT} s") from None


# ---- the tests ---------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("count,err", [(200, errno.ETIMEDOUT), (20000, errno.ENOBUFS)],
                         ids=["slow", "fast"])
def test_a_peer_that_stops_reading_is_dropped_and_the_others_are_served(
        rig: Rig, count: int, err: int) -> None:
    """A peer that stops reading its fault channel (and made the coordinator's end block
    forever) freezes nobody: the honest writer and the honest agent are served meanwhile; the
    peer is dropped once an un-protect has waited for it longer than the fault deadline, or
    once its outbox is full, its channel closed, and the core serves on. (Its faults are for
    every other page: their un-protects cannot be merged into fewer frames.)"""
    w = rig.writer(1)
    honest, _ = rig.channel(3)
    peer_end, core_end = rig.channel(2)
    rig.core.go()
    hostile = rig.hostile("silent", peer_end.fileno(), core_end.fileno(), count, 2,
                          fds=(peer_end.fileno(), core_end.fileno()))
    peer_end.close()  # the peer holds its end, and a copy of the core's
    assert line_from(hostile).startswith("sent")
    served(w, 40, 1)
    answered(honest, 50)
    bounded(rig.core.stats, "stats")
    ev = rig.wait_event(lambda e: e.ident == 2 and e.kind == SC_FAILED, "drop of the peer",
                        DEADLINE + TIMEOUT)
    assert ev.err == err, ev
    with pytest.raises(BrokenPipeError):  # closed for good, not kept queuing
        core_end.send(b"x", socket.MSG_DONTWAIT)
    served(w, 41, 2)  # and the core serves on
    answered(honest, 51)
    assert [e for e in rig.take_events() if e.kind == SC_FAILED and e.ident != 2] == []


@needs_root
def test_a_peer_that_clears_o_nonblock_on_a_lent_uffd_blocks_nothing(rig: Rig) -> None:
    """The agent that lent a uffd shares its file description, and clears O_NONBLOCK on it
    (again whenever it is set): the core reads it without waiting whatever its flags, serves
    its faults and everyone else's, and its lock stays free."""
    shared = rig.writer(1)
    honest = rig.writer(2)
    rig.core.go()
    hostile = rig.hostile("clear_nonblock", shared.fd, fds=(shared.fd,))
    assert line_from(hostile) == "cleared"
    assert not fcntl.fcntl(shared.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    served(honest, 40, 1)
    served(shared, 41, 2)
    served(honest, 42, 3)
    bounded(rig.core.stats, "stats")
    assert not [e for e in rig.take_events() if e.kind == SC_FAILED]


@needs_root
def test_a_flooding_peer_does_not_starve_the_others(rig: Rig) -> None:
    """A peer that floods valid duplicate faults, and drains every answer, gets a budget per
    round like everyone else: the honest writer's faults are served and the core's calls
    return while it floods."""
    w = rig.writer(1)
    ours, _ = rig.channel(2)
    rig.core.go()
    assert rig.core.save_page(0)  # the flood's page: every fault after is a duplicate
    hostile = rig.hostile("flood", ours.fileno(), fds=(ours.fileno(),))
    ours.close()
    assert line_from(hostile) == "flooding"
    before = bounded(rig.core.stats, "stats").duplicates
    deadline = time.monotonic() + TIMEOUT
    writes = during = 0
    while writes < 8 or during < 20000:  # until the flood has gone on across our writes
        assert time.monotonic() < deadline, f"{during} duplicate faults: the flood stopped"
        page = 40 + writes % 16
        served(w, page, writes % 250 + 1)
        bounded(lambda page=page: rig.core.claim(page * PAGE, PAGE), "claim")
        writes += 1
        during = bounded(rig.core.stats, "stats").duplicates - before
    assert hostile.poll() is None  # still flooding, still connected
    assert not [e for e in rig.take_events() if e.kind == SC_FAILED]


def test_a_round_reads_one_buffer_per_channel(tmp_path: Path) -> None:
    """The budget itself, deterministically (the flood above may well pause long enough for an
    unbudgeted core to find its socket empty): with a thousand faults waiting on a channel, one
    round of the core's work (sc_poll, the fault thread's round run here) takes one buffer's
    worth (snapcore.c CHAN_IN, 4 KiB), and the next rounds take the rest; the old core read
    until the socket was empty, all of it with its lock held."""
    r = Rig(tmp_path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lib = r.core._lib  # (add_channel would start the fault thread: this test is the thread)
        assert lib.sc_add_channel(r.core._p(), 1, theirs.fileno()) == 0
        r.core.go()
        frame = fault(0)
        ours.sendall(frame * 1000)
        r.core.poll(0)
        first = r.core.stats().faults
        assert 0 < first <= 4096 // len(frame), f"{first} faults read in one round"
        rounds = 1
        while r.core.stats().faults < 1000:
            assert rounds < 1000, "the rounds stopped reading"
            r.core.poll(0)
            rounds += 1
        assert rounds >= 1000 * len(frame) // 4096
        assert not [e for e in r.take_events() if e.kind == SC_FAILED]
    finally:
        r.close()
        ours.close()
        theirs.close()


@needs_root
def test_a_peer_over_the_held_limit_is_closed_and_the_others_served_at_t(rig: Rig) -> None:
    """Before T, a peer sends more faults than any workload blocks on: its channel is closed
    (one failure, not one per frame) and nothing more is read from it; the honest writer's
    fault, held meanwhile, is served at T."""
    w = rig.writer(1)
    ours, _ = rig.channel(2)
    w.write(40 * PAGE, 7)  # held: T is not declared yet
    hostile = rig.hostile("overlimit", ours.fileno(), 70 * 1024, fds=(ours.fileno(),))
    ours.close()
    assert line_from(hostile) == "closed", "the peer's channel was left open"
    failures = [e for e in rig.take_events() if e.kind == SC_FAILED]
    assert [(e.ident, e.err) for e in failures] == [(2, errno.EOVERFLOW)]
    bounded(rig.core.go, "go")
    assert w.report() == f"wrote {40 * PAGE} 7", "the held fault was not served at T"
    served(w, 41, 8)


def test_fuzz_the_fault_channel_parser_and_the_api() -> None:
    """helpers/fuzz_snapcore.c, a differential fuzzer with its own reference parser and a
    model of the saved map, against the library these tests load (in CI's sanitizer step:
    AddressSanitizer and UBSan builds). A few seconds here; UFFDSNAP_FUZZ_SECONDS for more,
    UFFDSNAP_FUZZ_SEED to replay a seed."""
    from uffdsnap.native import core_library
    from uffdsnap.testing.build import build

    seconds = float(os.environ.get("UFFDSNAP_FUZZ_SECONDS", "3"))
    seed = int(os.environ.get("UFFDSNAP_FUZZ_SEED", str(time.time_ns() % 1_000_000_007)))
    proc = subprocess.run([str(build("fuzz_snapcore")), str(core_library()), str(seconds),
                           str(seed)], capture_output=True, text=True,
                          timeout=seconds + 60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"seed {seed}:\n{proc.stdout}{proc.stderr}"
    assert ": ok" in proc.stdout, proc.stdout


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    args = [int(a) for a in rest]
    {"silent": silent_peer, "flood": flooding_peer, "overlimit": over_limit_peer,
     "clear_nonblock": nonblock_clearer}[mode](*args)
