"""Bad input to the orchestration commands: one clear line on stderr, non-zero exit, no
traceback, nothing written."""

from __future__ import annotations

import json
import os
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
