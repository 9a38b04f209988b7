"""Who may ask what of a root coordinator whose socket is open to another group
(`coordinator --socket-group`): peers are judged by the kernel's record of who connected
(SO_PEERCRED), never by what they say. Each peer here is a real process running as uid 65534
(forked from the test, then setuid) speaking the real protocol to a real coordinator."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import make_workload
from uffdsnap.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Connection,
    Hello,
    Message,
    Role,
    Welcome,
)

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: peers run as uid 65534")


def _as_nobody(sock_path: str, role: Role, pid: int | None) -> str:
    """In a child running as uid/gid 65534: connect, say hello as `role` for `pid` (None: the
    child itself), and report the coordinator's answer as one word and its reason."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # (nothing of pytest's runs here: os._exit on every path)
        answer = "error"
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            answer = _hello(sock_path, role, os.getpid() if pid is None else pid)
        except BaseException as e:
            answer = f"error {type(e).__name__}: {e}"
        finally:
            os.write(w, answer.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(child, 0)
    return answer


def _hello(sock_path: str, role: Role, pid: int) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(sock_path)
    conn = Connection(role)
    with s:
        s.sendall(conn.send(Hello(PROTOCOL_VERSION, role.value, pid, "enlist", "test")))
        msg: Message | None = None
        while msg is None:
            msg = conn.next_message()
            if msg is None:
                data = s.recv(65536)
                if not data:
                    return "closed"
                conn.receive_data(data)
    if isinstance(msg, Abort):
        return f"abort {msg.reason}"
    return "welcome" if isinstance(msg, Welcome) else f"other {msg.TYPE}"


@contextmanager
def _coordinator(shm_path: str, *options: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A root coordinator whose socket is open to group 65534, with `options`."""
    make_workload(shm_path, 1, 16)
    where = tempfile.mkdtemp(prefix="uffdsnap-trust-")  # (pytest's tmp_path is root's alone)
    os.chmod(where, 0o711)
    sock = os.path.join(where, "c.sock")
    proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm", shm_path,
                             "--listen", sock, "--socket-group", str(NOBODY), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        yield sock, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def coordinator(shm_path: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with _coordinator(shm_path) as running:
        yield running


def test_a_clients_group_member_may_ask(shm_path: str) -> None:
    """With --clients-group, that group's members are clients too (the refusal's control)."""
    with _coordinator(shm_path, "--clients-group", str(NOBODY)) as (sock, _proc):
        assert _as_nobody(sock, Role.CLIENT, None) == "welcome"


def test_another_users_client_is_refused(coordinator: tuple[str, subprocess.Popen[str]]
                                         ) -> None:
    """uid 65534 may enlist through the group-open socket, but may not ask for snapshots (a
    root coordinator would create the image wherever it was told)."""
    sock, _proc = coordinator
    answer = _as_nobody(sock, Role.CLIENT, None)
    assert answer.startswith("abort refused: uid 65534 may not ask"), answer


def test_an_agent_may_not_speak_for_another_users_process(
        coordinator: tuple[str, subprocess.Popen[str]]) -> None:
    """An agent of uid 65534 claiming a root process (here the coordinator itself) is refused;
    claiming its own process it is welcome (the negative control of the refusal)."""
    sock, proc = coordinator
    answer = _as_nobody(sock, Role.AGENT, proc.pid)
    assert answer.startswith(f"abort refused: uid 65534 may not speak for pid {proc.pid}"), \
        answer
    assert _as_nobody(sock, Role.AGENT, None) == "welcome"


def test_the_socket_is_open_to_the_named_group_only(
        coordinator: tuple[str, subprocess.Popen[str]]) -> None:
    sock, _proc = coordinator
    st = os.stat(sock)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == NOBODY and st.st_uid == 0
