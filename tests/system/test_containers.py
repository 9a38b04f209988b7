"""Coordinator and targets in different PID and mount namespaces, as with containers
(docs/containers.md): real namespaces made with unshare(1), real writers, the consistency
checker on every image.

- Workloads in a "container" (a new PID+mount namespace with its own /proc) enlist through the
  coordinator's socket bind-mounted into it, naming themselves by their own namespace's pid;
  the coordinator finds them through NSpid, and a peer of another namespace never speaks for a
  host process that happens to carry the number it names.
- `snapshot --shm` on the host attaches to processes living in containers (one as uid 65534),
  naming the object through /proc/PID/root.
- The coordinator itself in a PID+mount namespace (a privileged container) snapshots the
  processes it sees, one of them in a namespace nested below its own.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import SPAWNED, make_workload
from procutil import wait_line
from uffdsnap import native
from uffdsnap import workload as wl
from uffdsnap.image import manifest_path

NOBODY = 65534
UNSHARE = shutil.which("unshare")
SETPRIV = shutil.which("setpriv")
DEADLINE = 30.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: new PID and mount namespaces"),
    pytest.mark.skipif(not UNSHARE or not SETPRIV, reason="needs unshare(1) and setpriv(1)"),
]


# ---- a container: a new PID and mount namespace with its own /proc ---------------------------


def in_container(argv: list[str], setup: str = "") -> list[str]:
    """argv run as pid 1 of a new PID and mount namespace with its own /proc, after the shell
    commands `setup` ran there (mounts made in it stay in it). Killing the returned command
    kills the whole namespace (--kill-child)."""
    script = f"set -eu; {setup} exec \"$@\""
    return [UNSHARE or "unshare", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "sh", "-c", script, "sh", *argv]


def bind_socket(host_sock: str, inner_dir: str) -> str:
    """Setup that shows the coordinator's socket inside a container at INNER_DIR/c.sock, and
    hides the host's directory of it: the bind mount is the only way in."""
    inner, host_dir = shlex.quote(inner_dir), shlex.quote(os.path.dirname(host_sock))
    return (f"mount -t tmpfs uffdsnap {inner}; touch {inner}/c.sock; "
            f"mount --bind {shlex.quote(host_sock)} {inner}/c.sock; "
            f"mount -t tmpfs uffdsnap {host_dir};")


def private_shm(host_object: str, name: str = "obj") -> str:
    """Setup that gives a container its own /dev/shm holding only the object, as /dev/shm/NAME
    (the host path of it is hidden there)."""
    return (f"exec 3<{shlex.quote(host_object)}; mount -t tmpfs uffdsnap /dev/shm; "
            f"touch /dev/shm/{name}; mount --bind /proc/self/fd/3 /dev/shm/{name}; exec 3<&-;")


def host_pid(proc: subprocess.Popen[str]) -> int:
    """Our pid of the process an in_container() command runs (unshare's only child)."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        children = f.read().split()
    assert len(children) == 1, children
    return int(children[0])


def start_in_container(argv: list[str], setup: str, index: int) -> wl.WriterProcess:
    """A writer (argv) in a container of its own, once it says it is writing."""
    proc = subprocess.Popen(in_container(argv, setup), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    SPAWNED.append(proc)
    writer = wl.WriterProcess(proc, index, "python" if "uffdsnap.workload" in argv else "c")
    writer.wait_ready(DEADLINE)
    return writer


def stop(path: str, writers: list[wl.WriterProcess]) -> None:
    wl.set_stop(path)
    for w in writers:
        w.wait(DEADLINE)


@contextmanager
def coordinator(shm_path: str, *options: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`uffdsnap coordinator` on the host, listening in a directory of its own."""
    where = tempfile.mkdtemp(prefix="uffdsnap-containers-")
    os.chmod(where, 0o711)
    sock = os.path.join(where, "c.sock")
    proc = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm", shm_path,
                             "--listen", sock, *options], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    SPAWNED.append(proc)
    try:
        wait_line(proc.stdout, "listening", DEADLINE)
        yield sock, proc
    finally:
        proc.terminate()
        proc.wait(DEADLINE)
        shutil.rmtree(where, ignore_errors=True)


def snapshot(*argv: str) -> dict:
    """`uffdsnap snapshot ARGV --json`: its summary (exit 0 asserted)."""
    done = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", *argv, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_consistent(out: str, pids: list[int]) -> None:
    """The image is one instant of the workload, and the processes that took part are exactly
    `pids` (our pids)."""
    result = wl.check_file(out)
    assert result.ok, result.summary()
    with open(manifest_path(out)) as f:
        manifest = json.load(f)
    assert sorted(p["pid"] for p in manifest["processes"]) == sorted(pids)


# ---- enlisting across namespaces --------------------------------------------------------------


def test_workloads_in_containers_enlist_through_a_bind_mounted_socket(
        shm_path: str, tmp_path: Path) -> None:
    """Two Python writers, each pid 1 of a container of its own, and one on the host, enlist
    with a host coordinator (the containers reach it only through the socket bind-mounted into
    them); two snapshots of all three are consistent and name them by our pids."""
    make_workload(shm_path, 3, 256)
    inner = str(tmp_path / "inner")
    os.mkdir(inner)
    writers: list[wl.WriterProcess] = []
    with coordinator(shm_path) as (sock, _proc):
        try:
            for index in range(2):
                argv = wl.writer_command(shm_path, index, impl="python",
                                         enlist=f"{inner}/c.sock")
                writers.append(start_in_container(argv, bind_socket(sock, inner), index))
                assert writers[-1].ready_line.startswith("ready pid=1 ")  # its own namespace's
            writers.append(wl.spawn_writer(shm_path, 2, impl="python", enlist=sock))
            SPAWNED.append(writers[-1].proc)
            writers[-1].wait_ready(DEADLINE)
            pids = [host_pid(w.proc) for w in writers[:2]] + [writers[2].pid]
            for n in range(2):
                out = str(tmp_path / f"enlisted{n}.img")
                assert snapshot("--coordinator", sock, "-o", out)["processes_count"] == 3
                assert_consistent(out, pids)
        finally:
            stop(shm_path, writers)


# A peer in a container (pid 1 there), uid 65534 once connected, saying hello as the agent of
# the pid in argv[2] ("self": its own): prints the coordinator's answer.
PEER = """
import os, socket, sys
from uffdsnap.protocol import PROTOCOL_VERSION, Abort, Connection, Hello, Role, Welcome
claim = os.getpid() if sys.argv[2] == "self" else int(sys.argv[2])
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
conn = Connection(Role.AGENT)
s.sendall(conn.send(Hello(PROTOCOL_VERSION, Role.AGENT.value, claim, "enlist", "peer")))
msg = None
while msg is None:
    msg = conn.next_message()
    if msg is None:
        data = s.recv(65536)
        if not data:
            sys.exit("closed")
        conn.receive_data(data)
print(f"abort {msg.reason}" if isinstance(msg, Abort) else
      "welcome" if isinstance(msg, Welcome) else f"other {msg.TYPE}", flush=True)
"""


def peer_answer(sock: str, inner: str | None, claim: str) -> str:
    """The answer to a uid-65534 agent claiming `claim`, from a container (through the socket
    bind-mounted at INNER/c.sock) or, with `inner` None, from the host."""
    argv = [sys.executable, "-c", PEER]
    command = (in_container([*argv, f"{inner}/c.sock", claim], bind_socket(sock, inner))
               if inner else [*argv, sock, claim])
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE)
    return done.stdout.strip() or done.stderr.strip()


def test_a_peer_in_a_container_names_pids_of_its_own_namespace(shm_path: str) -> None:
    """A uid-65534 agent in a container may speak for itself (pid 1 there; our pid 1 is root's
    init), and not for a uid-65534 process of the host whose pid it names: that number means
    nothing in its namespace. The control: the same claim made from the host is welcome (the
    refusal is the namespace's, not the uid's)."""
    make_workload(shm_path, 1, 16)
    inner = tempfile.mkdtemp(prefix="uffdsnap-inner-")  # (tmp_path is not uid 65534's way)
    os.chmod(inner, 0o711)
    host_proc = subprocess.Popen(["sleep", "600"], user=NOBODY, group=NOBODY, extra_groups=[])
    SPAWNED.append(host_proc)
    with coordinator(shm_path, "--socket-group", str(NOBODY)) as (sock, _proc):
        assert peer_answer(sock, inner, "self") == "welcome"
        answer = peer_answer(sock, inner, str(host_proc.pid))
        assert answer == (f"abort refused: pid {host_proc.pid}: no such process in its PID "
                          "namespace"), answer
        assert peer_answer(sock, None, str(host_proc.pid)) == "welcome"  # the control
    os.rmdir(inner)


# ---- attach across namespaces: snapshot --shm from the host -----------------------------------


@contextmanager
def nobody_writer_binary() -> Iterator[str]:
    """The native writer where uid 65534 may run it (the build cache is root's)."""
    where = tempfile.mkdtemp(prefix="uffdsnap-writer-")
    try:
        os.chmod(where, 0o755)
        yield shutil.copy(native.program(native.WRITER), where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


@contextmanager
def writers_in_containers(shm_path: str) -> Iterator[tuple[list[int], str]]:
    """Native writers 0 and 1 in two containers, each with a /dev/shm of its own holding the
    object (writer 1 as uid 65534), and writer 2 on the host: (our pids of them, the object's
    name as the first container sees it, through /proc/PID/root). Stopped on leaving."""
    writers: list[wl.WriterProcess] = []
    with nobody_writer_binary() as nobody_writer:
        try:
            plain = [str(native.program(native.WRITER)), "--object", "/dev/shm/obj"]
            as_nobody = [SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                         "--clear-groups", nobody_writer, "--object", "/dev/shm/obj"]
            for index, argv in enumerate((plain, as_nobody)):
                writers.append(start_in_container([*argv, "--index", str(index)],
                                                  private_shm(shm_path), index))
            writers.append(wl.spawn_writer(shm_path, 2))
            SPAWNED.append(writers[-1].proc)
            writers[-1].wait_ready(DEADLINE)
            pids = [host_pid(w.proc) for w in writers[:2]] + [writers[2].pid]
            yield pids, f"/proc/{pids[0]}/root/dev/shm/obj"
        finally:
            stop(shm_path, writers)


def test_snapshot_from_the_host_attaches_processes_in_containers(shm_path: str,
                                                                 tmp_path: Path) -> None:
    """`snapshot --shm /proc/PID/root/dev/shm/obj` names the object as the container sees it,
    attaches the writers of both containers (one by the /dev/userfaultfd route, across
    namespaces) and the host's, and the image is consistent."""
    make_workload(shm_path, 3, 256)
    with writers_in_containers(shm_path) as (pids, name):
        out = str(tmp_path / "attached.img")
        summary = snapshot("--shm", name, "-o", out)
        assert sorted(p["pid"] for p in summary["processes"]) == sorted(pids)
        assert_consistent(out, pids)


def test_control_unprotected_copy_across_namespaces_is_caught(shm_path: str,
                                                              tmp_path: Path) -> None:
    """The checker's control in this setting: the same snapshot copying without protecting
    (test hooks no_protect, scan_delay_s) gives images it rejects."""
    make_workload(shm_path, 3, 256)
    hooks = json.dumps({"no_protect": True, "scan_delay_s": 0.002})
    with writers_in_containers(shm_path) as (_pids, name):
        for n in range(10):
            out = str(tmp_path / f"unprotected{n}.img")
            snapshot("--shm", name, "-o", out, "--test-hooks", hooks)
            if not wl.check_file(out).ok:
                return
            os.unlink(out)
    pytest.fail("an unprotected copy of running writers in containers passed the checker 10 "
                "times")


# ---- the coordinator in a container -----------------------------------------------------------

# Runs as pid 1 of a container: a coordinator there (attaching what it sees), a native writer
# beside it, and the command in argv[4] (JSON: a Python writer in a container nested in this
# one, enlisting through the socket bind-mounted there); one snapshot. Prints a JSON report:
# the snapshot's exit code and output, this process's NSpid, and the writers' pids here.
INSIDE = """
import json, os, subprocess, sys
from uffdsnap import workload as wl
shm, out, sock, nested = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
coord = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm", shm,
                          "--listen", sock, "--attach"], stdout=subprocess.PIPE, text=True)
writers = []
try:
    assert "listening" in coord.stdout.readline()
    writers.append(wl.spawn_writer(shm, 0))
    proc = subprocess.Popen(nested, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    writers.append(wl.WriterProcess(proc, 1, "python"))
    for w in writers:
        w.wait_ready(30)
    pids = [writers[0].pid,
            int(open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()[0])]
    done = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--coordinator", sock,
                           "-o", out, "--json"], capture_output=True, text=True, timeout=120)
    print(json.dumps({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                      "nspid": open("/proc/self/status").read().split("NSpid:")[1]
                      .splitlines()[0].split(),
                      "pids": pids}), flush=True)
finally:
    wl.set_stop(shm)
    for w in writers:
        w.wait(30)
    coord.terminate()
    coord.wait(30)
"""


def test_coordinator_in_a_container_snapshots_what_it_sees(shm_path: str,
                                                           tmp_path: Path) -> None:
    """A coordinator in a PID+mount namespace of its own attaches a writer beside it and takes
    the enlisting of one in a namespace nested below its own (named there by pid 1): the
    snapshot is consistent and names both by the coordinator's pids."""
    make_workload(shm_path, 2, 256)
    out = str(tmp_path / "inside.img")
    where, inner = tempfile.mkdtemp(prefix="uffdsnap-inside-"), str(tmp_path / "inner")
    os.mkdir(inner)
    sock = os.path.join(where, "c.sock")
    nested = in_container(wl.writer_command(shm_path, 1, impl="python",
                                            enlist=f"{inner}/c.sock"), bind_socket(sock, inner))
    try:
        done = subprocess.run(in_container([sys.executable, "-c", INSIDE, shm_path, out, sock,
                                            json.dumps(nested)]),
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.splitlines()[-1])
        assert report["nspid"] == ["1"]  # (it really ran as pid 1 of a namespace)
        assert report["rc"] == 0, report["stderr"]
        assert json.loads(report["stdout"])["processes_count"] == 2
        assert_consistent(out, report["pids"])
    finally:
        shutil.rmtree(where, ignore_errors=True)
