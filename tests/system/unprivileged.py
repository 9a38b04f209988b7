"""The unprivileged attacker of the trust and security tests: a process forked from the test
that drops to uid/gid 65534 (no supplementary groups) and speaks the real protocol over real
Unix sockets to a real root coordinator (or listens where one should be). Also the root
coordinator it attacks, its socket open to group 65534 as `coordinator --socket-group` does."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from uffdsnap.native.pidfd import pidfd_open
from uffdsnap.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Connection,
    Hello,
    Message,
    Result,
    Role,
    Snap,
    Welcome,
)

NOBODY = 65534
WAIT_S = 60.0  # bound of every wait on the attacker


class Link:
    """The attacker's side of its pipes to the test: say lines, wait for the test's go."""

    def __init__(self, up: int, down: int):
        self._up, self._down = up, down

    def say(self, line: str) -> None:
        os.write(self._up, " ".join(line.split()).encode() + b"\n")

    def wait_go(self) -> None:
        if select.select([self._down], [], [], WAIT_S)[0]:
            os.read(self._down, 64)


class Nobody:
    """`fn(link, *args)` running in a forked child as uid/gid 65534; the test reads what it
    says (`line`), lets it go on (`go`) and waits for it to end (`finish`). Whatever it raises
    is said as one `error ...` line."""

    def __init__(self, fn: Callable[..., None], *args: Any):
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # (nothing of pytest's runs here: os._exit on every path)
            code = 1
            try:
                os.close(up_r)
                os.close(down_w)
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                fn(Link(up_w, down_r), *args)
                code = 0
            except BaseException as e:
                try:
                    Link(up_w, down_r).say(f"error {type(e).__name__}: {e}")
                except BaseException:
                    pass
            finally:
                os._exit(code)
        os.close(up_w)
        os.close(down_r)
        self.pid, self.code = pid, -1
        self._up, self._down = up_r, down_w
        self._pidfd = pidfd_open(pid)
        self._buf = b""

    def line(self, timeout: float = WAIT_S) -> str:
        """The next line it says (AssertionError if none within `timeout`)."""
        while b"\n" not in self._buf:
            ready = select.select([self._up], [], [], timeout)[0]
            chunk = os.read(self._up, 65536) if ready else b""
            assert chunk, f"the unprivileged peer said nothing more ({self._buf!r})"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def go(self) -> None:
        os.write(self._down, b"go\n")

    def finish(self, timeout: float = WAIT_S) -> int:
        """Wait (bounded) for it to end; its exit status."""
        ended = select.select([self._pidfd], [], [], timeout)[0]
        code = self.close()
        assert ended, "the unprivileged peer did not end (killed)"
        return code

    def close(self) -> int:
        """End it (SIGKILL if it still runs: a failed test's cleanup) and reap it."""
        if self.pid:
            if not select.select([self._pidfd], [], [], 0)[0]:
                os.kill(self.pid, signal.SIGKILL)
            self.code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            self.pid = 0
            for fd in (self._up, self._down, self._pidfd):
                os.close(fd)
        return self.code


def as_nobody(fn: Callable[..., str], *args: Any) -> str:
    """fn(*args) in a child running as uid 65534; what it returns (one line)."""
    peer = Nobody(lambda link, *a: link.say(fn(*a)), *args)
    try:
        return peer.line()
    finally:
        peer.close()


def dial(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT_S)
    s.connect(sock_path)
    return s


def read_message(s: socket.socket, conn: Connection) -> Message | None:
    """The peer's next message (None: it closed the connection first)."""
    while True:
        msg = conn.next_message()
        if msg is not None:
            return msg
        data = s.recv(65536)
        if not data:
            return None
        conn.receive_data(data)


def describe(msg: Message | None) -> str:
    """A coordinator's answer as one word and its reason."""
    if msg is None:
        return "closed"
    if isinstance(msg, Abort):
        return f"abort {msg.reason}"
    if isinstance(msg, Result):
        return "ok" if msg.ok else f"failed {msg.reason}"
    return "welcome" if isinstance(msg, Welcome) else f"other {msg.TYPE}"


def hello(s: socket.socket, role: Role, pid: int | None = None) -> tuple[Connection, str]:
    """Say hello on `s` as `role` for `pid` (None: ourselves); the connection and the answer."""
    conn = Connection(role)
    s.sendall(conn.send(Hello(PROTOCOL_VERSION, role.value,
                              os.getpid() if pid is None else pid, "enlist", "test")))
    return conn, describe(read_message(s, conn))


def hello_answer(sock_path: str, role: Role, pid: int | None = None) -> str:
    """Connect, say hello, and report the coordinator's answer."""
    with dial(sock_path) as s:
        return hello(s, role, pid)[1]


def request(sock_path: str, output: str, files: bool = True) -> str:
    """Ask for a snapshot into `output` as a client: `ok`, `failed REASON`, or what else came.
    With `files` (as `uffdsnap snapshot --coordinator` does) the image goes into two unnamed
    files we create beside `output` and name once told it is good; where we cannot create
    them, or without `files`, the coordinator is asked to create `output` itself."""
    from uffdsnap.errors import UserError
    from uffdsnap.image import open_unnamed, publish_unnamed
    from uffdsnap.native import scm

    fds: tuple[int, int] | None = None
    if files:
        try:
            fds = open_unnamed(output)
        except (UserError, ValueError):
            fds = None
    try:
        with dial(sock_path) as s:
            conn, answer = hello(s, Role.CLIENT)
            if answer != "welcome":
                return answer
            data = conn.send(Snap(output, False, files=fds is not None))
            if fds is not None:
                sent = s.sendmsg([data], scm.fds_ancillary(list(fds)))
                data = data[sent:]
            s.sendall(data)
            answer = describe(read_message(s, conn))
        if answer == "ok" and fds is not None:
            try:
                publish_unnamed(*fds, output, False)
            except (UserError, ValueError, OSError) as e:  # naming is ours: so is its failure
                return f"failed {' '.join(str(e).split())}"
        return answer
    finally:
        for fd in fds or ():
            os.close(fd)


class Served:
    """A running root coordinator: its socket path, process, and what it logged so far."""

    def __init__(self, sock: str, proc: subprocess.Popen[str], log: Any):
        self.sock, self.proc, self._log = sock, proc, log

    def logged(self) -> str:
        """All the coordinator has logged so far. Read with pread: the coordinator's stderr
        shares the file's offset, which a seek of ours would move under its next write."""
        fd, chunks, at = self._log.fileno(), [], 0
        while chunk := os.pread(fd, 1 << 16, at):
            chunks.append(chunk)
            at += len(chunk)
        return b"".join(chunks).decode(errors="replace")


@contextmanager
def root_coordinator(shm_path: str, *options: str,
                     preexec: Callable[[], None] | None = None) -> Iterator[Served]:
    """A root `uffdsnap coordinator` for `shm_path` whose socket is open to group 65534, with
    `options` (and `preexec` run in it before it starts). It must exit 0 on SIGTERM, with no
    traceback in its log (a file: a pipe nobody reads could fill up and stall it)."""
    where = tempfile.mkdtemp(prefix="uffdsnap-trust-")  # (pytest's tmp_path is root's alone)
    os.chmod(where, 0o711)
    sock = os.path.join(where, "c.sock")
    # (its stderr shares the file's offset with us: logged() reads with pread, never moving
    # it, and the file is O_APPEND, which TemporaryFile("a+") alone does not set)
    with tempfile.TemporaryFile("a+") as log:
        fcntl.fcntl(log.fileno(), fcntl.F_SETFL,
                    fcntl.fcntl(log.fileno(), fcntl.F_GETFL) | os.O_APPEND)
        proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm",
                                 shm_path, "--listen", sock, "--socket-group", str(NOBODY),
                                 *options], stdout=subprocess.PIPE, stderr=log, text=True,
                                preexec_fn=preexec)
        served = Served(sock, proc, log)
        try:
            assert proc.stdout is not None
            assert "listening" in proc.stdout.readline(), served.logged()
            yield served
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            finally:
                shutil.rmtree(where, ignore_errors=True)
        assert proc.returncode == 0 and "Traceback" not in served.logged(), served.logged()
