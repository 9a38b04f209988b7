"""The workload never hangs because of us: SIGKILL of the coordinator or of an agent at every
phase, a writer exiting mid-snapshot, and malformed messages from a peer."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from conftest import make_workload, needs_root, start_writers, stop_writers
from procutil import (
    assert_nothing_published,
    assert_writers_resume,
    blocked_on_fault,
    children_agents,
    finish,
    paused_snapshot,
    wait_gone,
    wait_until,
)
from uffdsnap import workload as wl
from uffdsnap.image import verify
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


@pytest.fixture
def writers(shm_path: str) -> Iterator[list[wl.WriterProcess]]:
    make_workload(shm_path, 4, data_pages=512)
    ws = start_writers(shm_path, native=4)
    yield ws
    stop_writers(shm_path, ws)


def assert_held_if_protecting(phase: str, writers: list[wl.WriterProcess]) -> None:
    """Paused while protecting (faults are held until T), every writer is blocked on a
    write-protect fault in the kernel: a liveness check after a kill then shows a release, not
    writers that were never held."""
    if phase == "protecting":
        wait_until(lambda: all(blocked_on_fault(w.pid) for w in writers),
                   "every writer to block on a held fault")


@pytest.mark.parametrize("phase", PHASES)
def test_coordinator_killed(phase: str, shm_path: str, writers: list[wl.WriterProcess],
                            tmp_path: Path) -> None:
    out = str(tmp_path / "x.img")
    proc = paused_snapshot(shm_path, out, phase)
    agents = children_agents(proc.pid)
    assert len(agents) == 1  # one agent host, the agent of all 4 writers
    assert_held_if_protecting(phase, writers)
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
    assert_held_if_protecting(phase, writers)
    os.kill(agents[0], signal.SIGKILL)
    stdout, stderr = finish(proc)
    assert proc.returncode == 1, stdout
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert "left while its process lives" in lines[-1] or "lost" in lines[-1], lines
    assert json.loads(stdout)["ok"] is False
    assert_writers_resume(shm_path, writers)
    wait_gone(agents)
    assert_nothing_published(out)


@pytest.mark.parametrize("phase,mode", [("protecting", "agents"), ("copying", "agents"),
                                        ("copying", "delegated")])
def test_writer_exit_does_not_fail_the_snapshot(phase: str, mode: str, shm_path: str,
                                                writers: list[wl.WriterProcess],
                                                tmp_path: Path) -> None:
    out = str(tmp_path / "x.img")
    proc = paused_snapshot(shm_path, out, phase, mode)
    victim = writers.pop(0)
    victim.kill()  # SIGKILL: the process is gone, its agent reports it and leaves
    stdout, stderr = finish(proc)
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
        wait_until(lambda: blocked_on_fault(writer.pid), "the writer to block on a fault")
        frozen = wl.read_live_seqs(shm_path)[0]
        conn.sendall(fake.send(Unprotect(((0, layout.page_size),))))  # a valid one first
        conn.sendall(MALFORMED[kind])
        # ...and the agent must drop us and release it
        _, stderr = agent.communicate(timeout=30)
        assert agent.returncode != 0
        assert stderr.count("\n") == 1 and "protocol error" in stderr, stderr
        assert_writers_resume(shm_path, [writer])
        assert wl.read_live_seqs(shm_path)[0] > frozen
        conn.close()
    finally:
        if agent.poll() is None:
            agent.kill()
        listener.close()
        stop_writers(shm_path, [writer])


@pytest.mark.parametrize("phase", ["protecting", "copying"])
def test_delegated_agent_killed(phase: str, shm_path: str, writers: list[wl.WriterProcess],
                                tmp_path: Path) -> None:
    """Delegated mode: the coordinator holds a copy of the dead agent's uffd, so the agent's
    death alone would not release its process. The snapshot fails and the coordinator drops its
    copies: every writer resumes."""
    out = str(tmp_path / "x.img")
    proc = paused_snapshot(shm_path, out, phase, mode="delegated")
    agents = children_agents(proc.pid)
    assert_held_if_protecting(phase, writers)
    os.kill(agents[0], signal.SIGKILL)
    stdout, stderr = finish(proc)
    assert proc.returncode == 1, stdout
    assert json.loads(stdout)["ok"] is False
    assert_writers_resume(shm_path, writers)
    wait_gone(agents)
    assert_nothing_published(out)


def test_delegated_coordinator_killed(shm_path: str, writers: list[wl.WriterProcess],
                                      tmp_path: Path) -> None:
    out = str(tmp_path / "x.img")
    proc = paused_snapshot(shm_path, out, "copying", mode="delegated")
    agents = children_agents(proc.pid)
    proc.kill()
    proc.wait()
    assert_writers_resume(shm_path, writers)
    wait_gone(agents)
    assert_nothing_published(out)


# ---- a (fake) agent that passes the coordinator the wrong kind of fd -------------------------


@pytest.mark.parametrize("delegate", [True, False], ids=["delegate", "faults"])
async def test_passed_fd_of_the_wrong_kind_is_refused(delegate: bool, shm_path: str,
                                                      tmp_path: Path) -> None:
    """A uffd delegated to the coordinator must be a userfaultfd, a fault channel a Unix stream
    socket: a pipe instead drops that agent and fails the snapshot, naming why."""
    import trio

    from conftest import running_coordinator
    from uffdsnap.channel import PeerClosed, connect
    from uffdsnap.errors import SnapshotFailed
    from uffdsnap.protocol import PROTOCOL_VERSION, Delegate, FaultChannel, Hello, Protect, Role

    make_workload(shm_path, 1, 16)
    r, w = os.pipe()
    try:
        async with running_coordinator(shm_path, tmp_path, attach=False,
                                       delegate=delegate) as (coordinator, sock):
            chan = await connect(sock, Role.AGENT)
            await chan.send(Hello(PROTOCOL_VERSION, "agent", os.getpid(), "enlist", "fake"))
            await chan.receive()  # welcome

            async def fake_agent() -> None:
                msg, _fds = await chan.receive()
                assert isinstance(msg, Protect)
                bad = (Delegate(1, os.getpid(), ()) if delegate else
                       FaultChannel(msg.snapshot))
                await chan.send(bad, fds=[r])
                with pytest.raises(PeerClosed):
                    while True:  # an abort naming the problem, then the connection closes
                        await chan.receive()

            with trio.fail_after(20):  # (without the check, the snapshot would wait for us)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fake_agent)
                    with pytest.raises(SnapshotFailed) as failed:
                        await coordinator.snapshot(str(tmp_path / "x.img"))
            assert ("not a userfaultfd" if delegate else "not a Unix stream socket") in str(
                failed.value)
            assert not list(tmp_path.glob("x.img*"))
            chan.close()
    finally:
        os.close(r)
        os.close(w)


# ---- a long-running coordinator outlives whatever one peer or request does -------------------


def _talk(sock_path: str, role: Role, *frames: bytes) -> socket.socket:
    """Connect, send our hello (as `role`) and then `frames` verbatim; return the socket."""
    from uffdsnap.protocol import Hello

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock_path)
    conn = Connection(role)
    s.sendall(conn.send(Hello(PROTOCOL_VERSION, role.value, os.getpid(), "enlist", "fake")))
    for frame in frames:
        s.sendall(frame)
    return s


def _request(sock_path: str, output: str) -> object:
    """A client's snapshot request over the raw protocol; the coordinator's answer."""
    from uffdsnap.protocol import Hello, Result, Snap

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(sock_path)
    conn = Connection(Role.CLIENT)
    with s:
        s.sendall(conn.send(Hello(PROTOCOL_VERSION, Role.CLIENT.value, os.getpid())))
        while True:
            msg = conn.next_message()
            if isinstance(msg, Welcome):
                s.sendall(conn.send(Snap(output, False)))
            elif isinstance(msg, Result):
                return msg
            elif msg is None:
                data = s.recv(65536)
                assert data, "the coordinator closed the connection without a result"
                conn.receive_data(data)


def test_long_running_coordinator_survives_bad_peers_and_requests(
        shm_path: str, writers: list[wl.WriterProcess], tmp_path: Path) -> None:
    """Malformed frames from a peer, a peer that vanishes mid-handshake or mid-snapshot, and
    requests whose output cannot be written each end that connection or request only: the
    coordinator (trio's strict exception groups and all) keeps serving, and the next snapshot
    is consistent."""
    sock = str(tmp_path / "c.sock")
    coord = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm",
                              shm_path, "--listen", sock, "--attach"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in coord.stdout.readline()
        # peers that speak garbage, as an agent and as a client, or hang up at once
        for kind, frame in MALFORMED.items():
            for role in (Role.AGENT, Role.CLIENT):
                with _talk(sock, role, frame) as s:
                    assert s.recv(1 << 16) is not None, kind  # dropped, not a dead server
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(sock)  # connects, vanishes
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(sock)
        raw.sendall(b"\x00\x00")  # half a frame header, then gone
        raw.close()
        # outputs that cannot be written: one failed result each, nothing created
        for bad in (str(tmp_path / "missing" / "x.img"), str(tmp_path), "/proc/x.img",
                    str(tmp_path / "nul\0.img")):
            result = _request(sock, bad)
            assert result.ok is False and result.reason, bad
            assert "\n" not in result.reason
        assert coord.poll() is None
        # and it still takes consistent snapshots for the next client
        for n in range(2):
            out = str(tmp_path / f"ok{n}.img")
            result = _request(sock, out)
            assert result.ok, result.reason
            assert wl.check_file(out).ok and verify(out).ok
    finally:
        coord.send_signal(signal.SIGTERM)
        _, stderr = coord.communicate(timeout=30)
    assert coord.returncode == 0, stderr
    assert "Traceback" not in stderr


# ---- failures in the middle of a snapshot, from real processes (in-process coordinator) -------


async def _snapshot_outcome(coordinator, out: str) -> str:
    """"" if the snapshot succeeded (its summary is kept in LAST_SUMMARY, for messages), else
    its one-line reason."""
    from uffdsnap.errors import SnapshotFailed

    try:
        LAST_SUMMARY[:] = [await coordinator.snapshot(out)]
    except SnapshotFailed as e:
        assert "\n" not in str(e)
        return str(e)
    return ""


LAST_SUMMARY: list[dict] = []


async def test_full_disk_fails_cleanly(shm_path: str, tmp_path: Path) -> None:
    """The image's filesystem fills up mid-copy (a 1 MiB tmpfs for an 8 MiB object): one line
    names it, every writer resumes, and no image, manifest or temporary file is left."""
    import ctypes

    from conftest import running_coordinator

    make_workload(shm_path, 4, data_pages=512)
    ws = start_writers(shm_path, native=4)
    small = tmp_path / "small"
    small.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(b"tmpfs", os.fsencode(small), b"tmpfs", 0, b"size=1m") == 0, \
        os.strerror(ctypes.get_errno())
    try:
        async with running_coordinator(shm_path, tmp_path) as (coordinator, _):
            why = await _snapshot_outcome(coordinator, str(small / "x.img"))
        assert "No space left" in why or "ENOSPC" in why, why
        assert_writers_resume(shm_path, ws)
        assert os.listdir(small) == []
    finally:
        libc.umount2(os.fsencode(small), 2)
        stop_writers(shm_path, ws)


async def test_enlisting_after_t_refuses_the_snapshot(shm_path: str, tmp_path: Path) -> None:
    """A workload that enlists after T could have written unsaved pages untracked before: the
    snapshot is refused, naming it, and every writer resumes."""
    import trio

    from conftest import running_coordinator

    make_workload(shm_path, 3, data_pages=256)
    ws = start_writers(shm_path, native=2)
    late: list[wl.WriterProcess] = []
    async with running_coordinator(shm_path, tmp_path) as (coordinator, sock):
        async def during_copy() -> None:
            late.extend(await trio.to_thread.run_sync(
                lambda: start_writers(shm_path, native=0, enlisted=1, first_index=2,
                                      enlist=sock)))

        coordinator.test_hooks["at_phase"] = {"copying": during_copy}
        try:
            why = await _snapshot_outcome(coordinator, str(tmp_path / "x.img"))
            assert "after T" in why and str(late[0].pid) in why, why
            assert_nothing_published(str(tmp_path / "x.img"))
            assert_writers_resume(shm_path, ws + late)
        finally:
            await trio.to_thread.run_sync(stop_writers, shm_path, ws + late)


async def test_protect_timeout_bounds_a_silent_agent(shm_path: str, tmp_path: Path) -> None:
    """An agent that never protects (held by a test hook) while the others have: their writers
    wait on held faults only until the protect timeout, then the snapshot fails naming the
    silent one and every writer resumes."""
    import trio

    from conftest import running_coordinator
    from procutil import await_until

    make_workload(shm_path, 3, data_pages=256)
    ws = start_writers(shm_path, native=3)
    fifo = tmp_path / "hold.fifo"
    os.mkfifo(fifo)
    silent = ws[2]
    hooks = {"agent": {"hold_protect": {"pid": silent.pid, "fifo": str(fifo)}}}
    try:
        async with running_coordinator(shm_path, tmp_path, hooks=hooks,
                                       protect_timeout=2.0) as (coordinator, _):
            reasons: list[str] = []

            async def take() -> None:
                reasons.append(await _snapshot_outcome(coordinator, str(tmp_path / "x.img")))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                from test_controls import read_fifo_line

                line = await trio.to_thread.run_sync(read_fifo_line, fifo)
                assert "agent=" in line, repr(line)
                held = int(line.split("agent=")[1].split()[0])
                await await_until(lambda: all(blocked_on_fault(w.pid) for w in ws[:2]),
                                  "the protected writers to block on held faults")
                await await_until(lambda: coordinator.run is None or
                                  coordinator.run.failure is not None, "the protect timeout")
                os.kill(held, signal.SIGUSR1)  # let the held agent go, so it can release
        assert "did not protect within 2 s" in reasons[0] and str(silent.pid) in reasons[0]
        assert_writers_resume(shm_path, ws)
    finally:
        stop_writers(shm_path, ws)


async def test_garbage_while_writers_are_protected(shm_path: str, tmp_path: Path) -> None:
    """While every writer is protected (held in the copy), fake agents and clients connect and
    send malformed frames: each is dropped, and the snapshot goes on to one instant."""
    import trio

    from conftest import running_coordinator

    make_workload(shm_path, 3, data_pages=256)
    ws = start_writers(shm_path, native=3)
    try:
        async with running_coordinator(shm_path, tmp_path) as (coordinator, sock):
            def garbage() -> None:
                for frame in MALFORMED.values():
                    for role in (Role.AGENT, Role.CLIENT):
                        with _talk(sock, role, frame) as s:
                            s.settimeout(10)
                            while s.recv(65536):  # until the coordinator hangs up
                                pass

            async def during_copy() -> None:
                await trio.to_thread.run_sync(garbage)

            coordinator.test_hooks["at_phase"] = {"copying": during_copy}
            out = str(tmp_path / "x.img")
            assert await _snapshot_outcome(coordinator, out) == ""
        assert wl.check_file(out).ok and verify(out).ok
    finally:
        stop_writers(shm_path, ws)


async def test_stopped_agent(shm_path: str, tmp_path: Path) -> None:
    """The agent host is stopped (SIGSTOP) mid-copy while an enlisted writer's agent (another
    process) is not: the enlisted writer's faults are still served (it runs whole passes
    meanwhile); the snapshot fails, naming the stopped agents' processes; the coordinator kills
    the host that stopped answering, which releases its writers too: every writer resumes."""
    import trio

    from conftest import running_coordinator
    from procutil import await_until

    make_workload(shm_path, 3, data_pages=256)
    stopped: list[int] = []
    ws: list[wl.WriterProcess] = []
    try:
        async with running_coordinator(shm_path, tmp_path) as (coordinator, sock):
            ws = await trio.to_thread.run_sync(
                lambda: start_writers(shm_path, native=2, enlisted=1, enlist=sock))

            async def during_copy() -> None:
                host = coordinator.attacher.host_pid
                os.kill(host, signal.SIGSTOP)
                stopped.append(host)
                base = wl.read_live_seqs(shm_path)
                await await_until(lambda: wl.read_live_seqs(shm_path)[2] >= base[2] + 512,
                                  "the enlisted writer to keep being served")

            coordinator.test_hooks["at_phase"] = {"copying": during_copy}
            with trio.fail_after(60):
                why = await _snapshot_outcome(coordinator, str(tmp_path / "x.img"))
            assert why and str(ws[0].pid) in why, (why, stopped, LAST_SUMMARY)
            wait_gone(stopped)  # killed by the coordinator
            assert_writers_resume(shm_path, ws)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if ws:
            stop_writers(shm_path, ws)


async def test_object_resized_during_the_snapshot_fails_it(shm_path: str,
                                                          tmp_path: Path) -> None:
    """Write-protect does not see ftruncate: an object that changes size during the copy has no
    one state at T, so the snapshot fails naming it, nothing is published, writers resume."""
    import trio

    from conftest import running_coordinator

    make_workload(shm_path, 2, data_pages=256)
    ws = start_writers(shm_path, native=2)
    size = os.stat(shm_path).st_size
    async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
        async def during_copy() -> None:
            os.truncate(shm_path, size + 64 * 4096)  # (growing it: the writers keep their pages)

        coordinator.test_hooks["at_phase"] = {"copying": during_copy}
        try:
            why = await _snapshot_outcome(coordinator, str(tmp_path / "x.img"))
            assert "changed size during the snapshot" in why, why
            assert_nothing_published(str(tmp_path / "x.img"))
            assert_writers_resume(shm_path, ws)
        finally:
            await trio.to_thread.run_sync(stop_writers, shm_path, ws)
