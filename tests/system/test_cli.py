"""Bad input to the orchestration commands: one clear line on stderr, non-zero exit, no
traceback, nothing written."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_workload


def uffdsnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uffdsnap", *args], capture_output=True,
                          text=True, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("uffdsnap: error: ") and needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needle", [
    (["snapshot", "--shm", "/dev/shm/does-not-exist-uffdsnap", "-o", "{tmp}/x.img"],
     "no such object"),
    (["snapshot", "--shm", "/etc/hostname", "-o", "{tmp}/x.img"], "not shared memory"),
    (["snapshot", "--shm", "/dev/shm", "-o", "{tmp}/x.img"], "not a regular"),
    (["snapshot", "--shm", "{shm}", "-o", "{tmp}/no/such/dir/x.img"], "no such directory"),
    (["snapshot", "--shm", "{shm}", "-o", "{tmp}/x.img", "--timeout", "-1"], "positive"),
    (["snapshot", "--shm", "{shm}"], "required"),
    (["snapshot", "--shm", "{shm}", "--coordinator", "{tmp}/c.sock", "-o", "{tmp}/x.img"],
     "not allowed with"),
    (["snapshot", "--coordinator", "{tmp}/none.sock", "-o", "{tmp}/x.img"],
     "cannot reach coordinator"),
    (["coordinator", "--shm", "/dev/shm/does-not-exist-uffdsnap", "--listen", "{tmp}/c.sock"],
     "no such object"),
    (["agent", "--coordinator", "{tmp}/c.sock", "--attach", "0"], "not a process id"),
    (["agent", "--coordinator", "{tmp}/c.sock", "--attach", "999999999"], "pid"),
    (["agent", "--coordinator", "{tmp}/c.sock"], "one of the arguments"),
    (["agent", "--coordinator", "{tmp}/c.sock", "--host", "--nice", "40"], "between -20 and 19"),
    (["agent", "--coordinator", "{tmp}/c.sock", "--host", "--nice=-x"], "invalid int value"),
    (["snapshot", "--shm", "{shm}", "-o", "{tmp}/x.img", "--nice", "-21"], "between -20 and 19"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(args: list[str], needle: str, shm_path: str, tmp_path: Path) -> None:
    make_workload(shm_path, 1, 16)
    argv = [a.format(tmp=tmp_path, shm=shm_path) for a in args]
    proc = uffdsnap(*argv)
    assert_one_line_error(proc, needle)
    assert not list(tmp_path.glob("*.img*"))


def test_existing_output_is_not_replaced(shm_path: str, tmp_path: Path) -> None:
    make_workload(shm_path, 1, 16)
    out = tmp_path / "x.img"
    out.write_bytes(b"precious")
    proc = uffdsnap("snapshot", "--shm", shm_path, "-o", str(out))
    assert_one_line_error(proc, "--force")
    assert out.read_bytes() == b"precious"
    proc = uffdsnap("snapshot", "--shm", shm_path, "-o", str(out), "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    assert out.stat().st_size == os.stat(shm_path).st_size


def test_force_never_replaces_special_files(shm_path: str, tmp_path: Path) -> None:
    """--force replaces a regular file only: a FIFO or a symbolic link at -o (or at its
    manifest's name) is refused in one line before any snapshot, and left as it was."""
    make_workload(shm_path, 1, 16)
    fifo = tmp_path / "fifo.img"
    os.mkfifo(fifo)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "link.img"
    link.symlink_to(victim)
    manifest_link = tmp_path / "m.img.json"
    manifest_link.symlink_to(victim)
    for out, needle in ((fifo, "not a regular file"), (link, "symbolic link"),
                        (tmp_path / "m.img", "symbolic link")):
        proc = uffdsnap("snapshot", "--shm", shm_path, "-o", str(out), "--force")
        assert_one_line_error(proc, needle)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert manifest_link.is_symlink() and victim.read_bytes() == b"precious"
    assert not (tmp_path / "m.img").exists()


def test_json_failure_is_one_object(tmp_path: Path) -> None:
    proc = uffdsnap("snapshot", "--shm", "/dev/shm/does-not-exist-uffdsnap", "-o",
                    str(tmp_path / "x.img"), "--json")
    assert proc.returncode != 0
    result = json.loads(proc.stdout)
    assert result["ok"] is False and "no such object" in result["error"]


def test_snapshots_need_no_compiler(shm_path: str, tmp_path: Path) -> None:
    """The native core ships in the package (built when it was installed): a snapshot works
    with no C compiler anywhere on PATH."""
    make_workload(shm_path, 1, 16)
    proc = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path,
                           "-o", str(tmp_path / "x.img")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "CC": "/nonexistent/cc",
                                           "PATH": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.img").is_file()


def test_coordinator_replaces_a_dead_coordinators_socket(shm_path: str, tmp_path: Path) -> None:
    """A socket left behind by a coordinator that died (nobody listens) does not block a
    restart; a live coordinator's socket, or a file that is not a socket, is refused."""
    make_workload(shm_path, 1, 16)
    sock = tmp_path / "c.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))  # bound, never listening, then gone: what a SIGKILL leaves
    dead.close()
    argv = [sys.executable, "-m", "uffdsnap", "coordinator", "--shm", shm_path, "--listen",
            str(sock)]
    coord = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert coord.stdout is not None
        assert "listening" in coord.stdout.readline()
        assert_one_line_error(uffdsnap(*argv[3:]), "another coordinator is listening")
    finally:
        coord.terminate()
        assert coord.wait(timeout=20) == 0
    plain = tmp_path / "plain"
    plain.write_bytes(b"mine")
    assert_one_line_error(uffdsnap("coordinator", "--shm", shm_path, "--listen", str(plain)),
                          "not a socket")
    assert plain.read_bytes() == b"mine"
