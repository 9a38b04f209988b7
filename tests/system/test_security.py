"""Attacks by an unprivileged local user (uid 65534, forked from the test, then setuid) on a
root coordinator and root agents, through real Unix sockets: a listener squatting the
coordinator's path, requests whose output fails, descriptors parked with messages, too many
connections, descriptor exhaustion. After each, the coordinator still takes a consistent
snapshot that counts every enlisted process (docs/security.md lists them all)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
import trio
from unprivileged import (
    NOBODY,
    WAIT_S,
    Link,
    Nobody,
    Served,
    describe,
    dial,
    hello,
    hello_answer,
    read_message,
    request,
    root_coordinator,
)

from conftest import make_workload, start_writers, stop_writers
from procutil import assert_nothing_published, assert_writers_resume, wait_until
from uffdsnap import workload as wl
from uffdsnap.channel import Channel
from uffdsnap.coordinator._run import RELEASE_TIMEOUT_S
from uffdsnap.enlist import EnlistError, enlist
from uffdsnap.groups import unwrap_group
from uffdsnap.image import verify
from uffdsnap.native import scm
from uffdsnap.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Delegate,
    Hello,
    Protect,
    Protected,
    RemoteProtocolError,
    Role,
    Tracked,
    Welcome,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: attackers run as uid "
                                                          "65534 against root peers")
LIMIT = 8  # --max-connections of the coordinator under attack
ENLISTED = 2  # enlisted writers it serves throughout (their agents hold 2 connections)


def _private_dir(owner: int = 0) -> str:
    where = tempfile.mkdtemp(prefix="uffdsnap-sec-")
    os.chown(where, owner, owner)
    os.chmod(where, 0o755)
    return where


# ---- a hostile listener at the coordinator's path --------------------------------------------


def _squat(link: Link, path: str, welcome: Welcome) -> None:
    """The attacker: listen at `path` before any coordinator does; report what the first peer
    sends (bytes, and what each passed descriptor is). It plays a coordinator: `welcome` (in
    delegated mode) the agent and ask it to protect, which makes an agent that trusts us lend
    its uffd."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(WAIT_S)
    link.say("listening")
    peer, _ = listener.accept()
    peer.settimeout(WAIT_S)
    conn = Connection(Role.COORDINATOR)
    received, lent = 0, []
    with peer:
        while True:
            data, anc, flags, _ = peer.recvmsg(65536, scm.ancillary_space(16))
            for fd in scm.fds_from_ancillary(anc, flags):
                lent.append(os.readlink(f"/proc/self/fd/{fd}"))
                os.close(fd)
            if not data:
                break
            received += len(data)
            conn.receive_data(data)
            msg = conn.next_message()
            while msg is not None:
                if isinstance(msg, Hello):
                    peer.sendall(conn.send(welcome) + conn.send(Protect(1)))
                if isinstance(msg, Protected):
                    break
                msg = conn.next_message()
            if isinstance(msg, Protected):
                break
    link.say(json.dumps({"bytes": received, "lent": lent}))


def _welcome_for(shm_path: str) -> Welcome:
    st = os.stat(shm_path)
    return Welcome(PROTOCOL_VERSION, st.st_size, 4096, os.major(st.st_dev), os.minor(st.st_dev),
                   st.st_ino, True)


@pytest.fixture
def squat_dir() -> Iterator[str]:
    """A directory the attacker may create its socket in (a shared /run, a stale /tmp path)."""
    where = _private_dir(NOBODY)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def _squatter(squat_dir: str, shm_path: str) -> tuple[Nobody, str]:
    """The attacker listening at a coordinator's path, playing coordinator for `shm_path`."""
    path = os.path.join(squat_dir, "c.sock")
    attacker = Nobody(_squat, path, _welcome_for(shm_path))
    assert attacker.line() == "listening"
    return attacker, path


def _what_it_got(attacker: Nobody) -> dict:
    try:
        line = attacker.line()
        assert attacker.finish() == 0, line
    finally:
        attacker.close()
    return json.loads(line)


def test_an_enlisting_workload_lends_nothing_to_a_hostile_listener(
        shm_path: str, squat_dir: str) -> None:
    """A root workload enlists at a path where uid 65534 listens: its agent reads the
    listener's credentials and refuses before sending a byte (the listener sees no hello and
    no descriptor). Control: told to trust uid 65534 (coordinator_user), the same agent says
    hello and, asked to protect in delegated mode, hands that user a uffd of the workload's
    address space: exactly what the check prevents."""
    make_workload(shm_path, 1, 16)
    attacker, path = _squatter(squat_dir, shm_path)
    with pytest.raises(EnlistError) as refused:
        enlist(path, timeout=WAIT_S)
    assert "refusing to talk to" in str(refused.value) and "uid 65534" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert _what_it_got(attacker) == {"bytes": 0, "lent": []}
    os.unlink(path)  # (the squatter is gone; its socket file is not)

    attacker, path = _squatter(squat_dir, shm_path)
    enlistment = enlist(path, timeout=WAIT_S, coordinator_user=NOBODY)
    try:
        got = _what_it_got(attacker)
    finally:
        enlistment.close()
    assert got["bytes"] > 0 and got["lent"] == ["anon_inode:[userfaultfd]"], got


def test_an_attach_agent_lends_nothing_to_a_hostile_listener(
        shm_path: str, squat_dir: str) -> None:
    """`uffdsnap agent --attach` as root, pointed at a path where uid 65534 listens: one line,
    exit 2, the listener gets nothing, and the target writes on. Control: with
    `--coordinator-user 65534` the agent talks to it (hello, then a uffd)."""
    make_workload(shm_path, 1, 16)
    writers = start_writers(shm_path, native=1)
    try:
        for trusted, code in (([], 2), (["--coordinator-user", str(NOBODY)], None)):
            attacker, path = _squatter(squat_dir, shm_path)
            agent = subprocess.run(
                [sys.executable, "-m", "uffdsnap", "agent", "--coordinator", path, *trusted,
                 "--attach", str(writers[0].proc.pid)], capture_output=True, text=True,
                timeout=WAIT_S)
            got = _what_it_got(attacker)
            os.unlink(path)
            if code is not None:
                assert agent.returncode == code, agent.stderr
                assert agent.stderr.count("\n") == 1 and "refusing to talk to" in agent.stderr
                assert got == {"bytes": 0, "lent": []}
            else:
                assert got["bytes"] > 0 and got["lent"] == ["anon_inode:[userfaultfd]"], got
            assert_writers_resume(shm_path, writers)
    finally:
        stop_writers(shm_path, writers)


def test_a_client_says_nothing_to_a_hostile_listener(shm_path: str, squat_dir: str) -> None:
    """`uffdsnap snapshot --coordinator PATH` as root, where uid 65534 listens: one line, exit
    2, and the listener never learns even the output path."""
    make_workload(shm_path, 1, 16)
    attacker, path = _squatter(squat_dir, shm_path)
    client = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--coordinator", path,
                             "-o", os.path.join(squat_dir, "x.img")], capture_output=True,
                            text=True, timeout=WAIT_S)
    assert client.returncode == 2 and client.stderr.count("\n") == 1, client.stderr
    assert "refusing to talk to" in client.stderr and "uid 65534" in client.stderr
    assert _what_it_got(attacker) == {"bytes": 0, "lent": []}


def test_enlisting_with_the_root_coordinator_works(shm_path: str) -> None:
    """The check's other side: a root coordinator at the path is trusted and joined."""
    make_workload(shm_path, 1, 16)
    with root_coordinator(shm_path) as served:
        enlist(served.sock, timeout=WAIT_S).close()


# ---- a long-running coordinator under attack --------------------------------------------------


@pytest.fixture
def served(shm_path: str) -> Iterator[Served]:
    """A root coordinator (socket open to group 65534, which may also ask for snapshots) with
    ENLISTED enlisted writers; they must still be enlisted when the test ends."""
    yield from _served(shm_path)


def _served(shm_path: str, limit: int = LIMIT,
            preexec: Callable[[], None] | None = None) -> Iterator[Served]:
    make_workload(shm_path, ENLISTED, 16)
    with root_coordinator(shm_path, "--clients-group", str(NOBODY), "--max-connections",
                          str(limit), preexec=preexec) as served:
        writers = start_writers(shm_path, native=0, enlisted=ENLISTED, enlist=served.sock)
        try:
            yield served
            _still_serving(served, shm_path)
        finally:
            stop_writers(shm_path, writers)


def _still_serving(served: Served, shm_path: str) -> None:
    """The coordinator lives and takes a consistent snapshot of every enlisted process."""
    assert served.proc.poll() is None, served.logged()
    where = _private_dir()
    try:
        out = os.path.join(where, "after.img")
        proc = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--coordinator",
                               served.sock, "-o", out, "--json"], capture_output=True,
                              text=True, timeout=WAIT_S)
        assert proc.returncode == 0, proc.stderr + served.logged()
        assert json.loads(proc.stdout)["processes_count"] == ENLISTED
        assert wl.check_file(out).ok and verify(out).ok
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _ask_each(link: Link, sock: str, outputs: list[str]) -> None:
    for output in outputs:
        link.say(request(sock, output))


def test_outputs_that_fail_come_back_as_failed_results(served: Served) -> None:
    """A client of uid 65534 (--clients-group) asks for outputs that cannot be written: an
    existing manifest, a directory, a missing directory, a NUL byte, a name too long (whose
    error is longer than a reason may be). Each gets one failed result of one line, nothing
    is created or changed, and the coordinator serves on. Control: a good output is ok."""
    where = _private_dir(NOBODY)
    try:
        taken = os.path.join(where, "taken.img")
        with open(taken + ".json", "w") as f:
            f.write("{}")
        bad = [taken, where, os.path.join(where, "missing", "x.img"),
               os.path.join(where, "nul\0.img"), os.path.join(where, "n" * 4000 + ".img")]
        attacker = Nobody(_ask_each, served.sock, [*bad, os.path.join(where, "good.img")])
        try:
            answers = [attacker.line() for _ in range(len(bad) + 1)]
            assert attacker.finish() == 0
        finally:
            attacker.close()
        for output, answer in zip(bad, answers, strict=False):
            assert answer.startswith("failed ") and len(answer) < 4200, (output[:80], answer)
        assert answers[-1] == "ok", answers[-1]
        assert sorted(os.listdir(where)) == ["good.img", "good.img.json", "taken.img.json"]
        with open(taken + ".json") as f:
            assert f.read() == "{}"
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def small_tmpfs() -> Iterator[str]:
    where = tempfile.mkdtemp(prefix="uffdsnap-sec-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0777", "tmpfs", where],
                   check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", where]).returncode != 0:
            subprocess.run(["umount", "-l", where])
        os.rmdir(where)


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_at_the_manifest_is_a_failed_result(served: Served, shm_path: str,
                                                        small_tmpfs: str) -> None:
    """The image fits, its manifest does not (a tmpfs filled to leave exactly the image's
    pages free): a failed result naming the lack of space, nothing published, no temporary
    left. Control: one page more free, and the same request succeeds (so it was the
    manifest's page that was missing)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first = os.path.join(small_tmpfs, "first.img")
    assert _request_as_nobody(served.sock, first) == "ok"
    image_bytes = os.stat(first).st_blocks * 512
    assert image_bytes == os.stat(shm_path).st_size, "the object is not fully written yet"
    os.unlink(first)
    os.unlink(first + ".json")
    filler = os.path.join(small_tmpfs, "filler")
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, _free_bytes(small_tmpfs) - image_bytes)
    assert _free_bytes(small_tmpfs) == image_bytes

    out = os.path.join(small_tmpfs, "full.img")
    answer = _request_as_nobody(served.sock, out)
    assert answer.startswith("failed ") and "No space left" in answer, answer
    assert_nothing_published(out)
    os.truncate(filler, os.stat(filler).st_size - page)  # the control: one page more
    assert _request_as_nobody(served.sock, out) == "ok"
    assert verify(out).ok


def _request_as_nobody(sock: str, output: str) -> str:
    attacker = Nobody(_ask_each, sock, [output])
    try:
        return attacker.line()
    finally:
        attacker.close()


# ---- descriptors and connections -------------------------------------------------------------


def _reader_left(w: int) -> bool:
    """Whether a pipe still has a reader (its read end open anywhere, in flight included)."""
    try:
        os.write(w, b"x")
        return True
    except BrokenPipeError:
        return False


def _park(link: Link, sock: str) -> None:
    """The attacker: send the read end of a pipe with messages that carry no descriptor, and
    report the coordinator's answer and whether the pipe still has a reader afterwards (it is
    ours alone to close otherwise: the coordinator must have closed its copy)."""
    for how in ("with hello", "20 at once", "with a partial hello"):
        conn = Connection(Role.AGENT)
        hello_bytes = conn.send(Hello(PROTOCOL_VERSION, Role.AGENT.value, os.getpid(), "enlist",
                                      "park"))
        r, w = os.pipe()
        s = dial(sock)
        with s:
            if how == "20 at once":
                s.sendmsg([hello_bytes], scm.fds_ancillary([r] * 20))
            elif how == "with hello":
                s.sendmsg([hello_bytes], scm.fds_ancillary([r]))
            else:  # legal so far: the message it may belong to is not whole yet
                s.sendmsg([hello_bytes[:1]], scm.fds_ancillary([r]))
            os.close(r)
            if how == "with a partial hello":
                link.say(f"{how}: reader left {_reader_left(w)}")
                s.sendall(hello_bytes[1:])
            answer = describe(read_message(s, conn))
        link.say(f"{how}: {answer}: reader left {_reader_left(w)}")
        os.close(w)


def test_descriptors_parked_with_messages_are_closed(served: Served) -> None:
    """Descriptors sent with messages that carry none (a hello with a pipe attached, 20 at
    once, one ahead of a hello that then carries none) are refused with the reason, and the
    coordinator closes every one it received (the pipe has no reader left). Control: while
    the message it came with is not whole, the descriptor is still held."""
    attacker = Nobody(_park, served.sock)
    try:
        lines = [attacker.line() for _ in range(4)]
        assert attacker.finish() == 0, lines
    finally:
        attacker.close()
    carried_none = "abort protocol error: 1 file descriptor(s) sent that no message carries"
    assert lines[0] == f"with hello: {carried_none} (closed): reader left False", lines
    assert lines[1].startswith("20 at once: abort protocol error: file descriptors "
                               "(MSG_CTRUNC) truncated") and \
        lines[1].endswith("reader left False"), lines
    assert lines[2] == "with a partial hello: reader left True", lines
    assert lines[3] == f"with a partial hello: {carried_none} (closed): reader left False", \
        lines


def _crowd(link: Link, sock: str) -> None:
    """The attacker: open client connections (it may: --clients-group) and keep them idle
    until refused; report how many were welcome and the refusal; on go, close one and try
    again; on go, leave."""
    held = []
    answer = "welcome"
    while answer == "welcome" and len(held) <= 2 * LIMIT:
        s = dial(sock)
        answer = hello(s, Role.CLIENT)[1]
        if answer == "welcome":
            held.append(s)
        else:
            s.close()
    link.say(f"{len(held)} welcome, then {answer}")
    link.wait_go()
    held.pop().close()
    deadline = time.monotonic() + WAIT_S
    while True:  # (the coordinator notices the close when it next reads: retry, bounded)
        answer = hello_answer(sock, Role.CLIENT)
        if answer == "welcome" or time.monotonic() > deadline:
            break
    link.say(f"after one left: {answer}")
    link.wait_go()
    for s in held:
        s.close()


def test_connections_past_the_limit_are_refused_with_the_reason(served: Served,
                                                                shm_path: str) -> None:
    """uid 65534 opens idle client connections until refused: past --max-connections
    (counting the enlisted agents' two) it gets the reason. Meanwhile root still gets a snapshot of
    every enlisted process (root and the coordinator's own user are never turned away).
    Control: once one of its connections ends, the next is welcome again."""
    attacker = Nobody(_crowd, served.sock)
    try:
        assert attacker.line() == (f"{LIMIT - ENLISTED} welcome, then abort refused: the "
                                   f"coordinator serves {LIMIT} connections, its limit "
                                   "(--max-connections)")
        _still_serving(served, shm_path)
        attacker.go()
        assert attacker.line() == "after one left: welcome"
        attacker.go()
        assert attacker.finish() == 0
    finally:
        attacker.close()


def _exhaust(link: Link, sock: str, count: int) -> None:
    """The attacker: open up to `count` connections, each saying hello as its own agent, as
    fast as they are taken; hold them until go."""
    held = []
    hello_bytes = Connection(Role.AGENT).send(Hello(PROTOCOL_VERSION, Role.AGENT.value,
                                                    os.getpid(), "enlist", "exhaust"))
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)  # the listen backlog is full: enough
        try:
            s.connect(sock)
            s.sendall(hello_bytes)
        except OSError:
            s.close()
            break
        held.append(s)
    link.say(f"holding {len(held)}")
    link.wait_go()
    for s in held:
        s.close()


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


@pytest.fixture
def starved(shm_path: str) -> Iterator[Served]:
    """`served`, but the coordinator may open only 128 descriptors and serve 1000
    connections (with the defaults, 1024 and 256, an attacker never reaches the first)."""
    yield from _served(shm_path, 1000, _few_descriptors)


def test_descriptor_exhaustion_pauses_accepting_and_nothing_else(starved: Served) -> None:
    """uid 65534 opens connections until the coordinator has no descriptor left for the next
    one (it logs so, once); the coordinator lives, and once the attacker leaves it accepts
    again and snapshots every enlisted process (checked by the fixture)."""
    coordinator = starved.proc.pid
    attacker = Nobody(_exhaust, starved.sock, 400)
    try:
        holding = attacker.line()
        wait_until(lambda: "cannot accept connections: Too many open files"
                   in starved.logged(), "the coordinator to run out of descriptors")
        assert starved.proc.poll() is None
        assert len(os.listdir(f"/proc/{coordinator}/fd")) >= 120, holding
        attacker.go()
        assert attacker.finish() == 0
    finally:
        attacker.close()
    wait_until(lambda: "accepting connections again" in starved.logged(),
               "the coordinator to accept again")
    assert starved.logged().count("cannot accept connections") == 1


def test_no_message_carries_more_descriptors_than_a_read_has_room_for() -> None:
    """The Channel gives each read room for MAX_FDS_PER_MESSAGE descriptors (more is a peer
    parking them): a message type that carried more would be refused. Keep them in step."""
    from uffdsnap.channel import MAX_FDS_PER_MESSAGE
    from uffdsnap.protocol import MESSAGES, Event, Snap

    assert max(cls.fds for cls in MESSAGES.values()) <= MAX_FDS_PER_MESSAGE
    assert Event(1, "fork").fd_count() <= MAX_FDS_PER_MESSAGE
    assert Snap("x.img", files=True).fd_count() <= MAX_FDS_PER_MESSAGE


def test_listener_refusal_reasons() -> None:
    """The pure rule: root, our user and the named user are trusted listeners, no one else."""
    from uffdsnap.channel import listener_refusal

    assert listener_refusal(0, 1000, None) is None
    assert listener_refusal(1000, 1000, None) is None
    assert listener_refusal(65534, 0, 65534) is None
    assert "runs as uid 65534, not root" in (listener_refusal(65534, 0, None) or "")
    assert "not root, uid 1000, uid 7" in (listener_refusal(65534, 1000, 7) or "")


async def test_honest_descriptors_pass_the_parking_check() -> None:
    """The parking check's other side (real sockets, the real Channel): two `delegate`s back
    to back, each over a megabyte so that its descriptor arrives many reads before its last
    byte, each get their own descriptor. Control: the same with a `tracked` between them that
    carries a descriptor it should not is refused."""
    pipes = [os.pipe() for _ in range(3)]
    try:
        got = await _two_delegates([r for r, _w in pipes], extra=False)
        assert got == [(1, os.fstat(pipes[0][0]).st_ino), (2, os.fstat(pipes[1][0]).st_ino)]
        with pytest.raises(RemoteProtocolError, match="sent that no message carries"):
            with unwrap_group():
                await _two_delegates([r for r, _w in pipes], extra=True)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


async def _two_delegates(fds: list[int], extra: bool) -> list[tuple[int, ...]]:
    """An agent sends two big `delegate`s with fds[0] and fds[1] (and, with `extra`, a
    `tracked` with fds[2] between them); what the coordinator's Channel receives: (tracker,
    inode of the descriptor) of each."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    agent, coordinator = Channel(a, Role.AGENT), Channel(b, Role.COORDINATOR)
    got: list[tuple[int, ...]] = []

    async def take_two() -> None:
        for _ in range(2):
            msg, passed = await coordinator.receive()
            assert isinstance(msg, Delegate)
            got.append((msg.tracker, *(os.fstat(fd).st_ino for fd in passed)))
            for fd in passed:
                os.close(fd)

    try:
        await agent.send(Hello(PROTOCOL_VERSION, Role.AGENT.value, os.getpid()))
        await coordinator.receive()
        await coordinator.send(Welcome(PROTOCOL_VERSION, 1 << 30, 4096, 0, 0, 0, True))
        await coordinator.send(Protect(1))
        await agent.receive()
        await agent.receive()
        maps = tuple((n << 12, 4096, n << 12) for n in range(60000))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_two)
            await agent.send(Delegate(1, 0, maps), fds=[fds[0]])
            if extra:
                await agent.sock.sendmsg([agent.conn.send(Tracked((1,)))],
                                         scm.fds_ancillary([fds[2]]))
            await agent.send(Delegate(2, 0, maps), fds=[fds[1]])
    finally:
        agent.close()
        coordinator.close()
    return got


def _silent_agent(link: Link, sock: str) -> None:
    """The attacker: enlist an agent for itself (it may), then answer nothing; report what
    the coordinator sent until it closed the connection."""
    with dial(sock) as s:
        conn, answer = hello(s, Role.AGENT)
        link.say(answer)
        seen = []
        while (msg := read_message(s, conn)) is not None:
            seen.append(msg.TYPE)
        link.say(f"closed after {' '.join(seen)}")


def test_a_silent_agent_of_another_user_fails_one_snapshot_and_is_dropped(
        served: Served) -> None:
    """uid 65534 enlists an agent for its own process (allowed) that never protects: the next
    snapshot fails naming it (after the fault deadline and the wait for agents to release),
    the coordinator drops that agent, and serves on (the fixture's snapshot of every enlisted
    process). What remains is the attacker's power to fail snapshots by enlisting again
    (docs/security.md)."""
    attacker = Nobody(_silent_agent, served.sock)
    try:
        assert attacker.line() == "welcome"
        where = _private_dir()
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--coordinator",
                               served.sock, "-o", os.path.join(where, "x.img")],
                              capture_output=True, text=True, timeout=WAIT_S)
        took = time.monotonic() - started
        shutil.rmtree(where, ignore_errors=True)
        assert proc.returncode == 1 and f"{attacker.pid}" in proc.stderr, proc.stderr
        # (bound: the fault deadline, then the wait for agents to release; margin 10 s)
        assert took < 2 + RELEASE_TIMEOUT_S + 10, f"the snapshot took {took:.1f} s to fail"
        assert attacker.line().startswith("closed after protect")
        assert attacker.finish() == 0
    finally:
        attacker.close()
