"""The escape audit at T (uffdsnap/escapes.py), end to end: real writers, real processes
that hold the object open, a real mapper in another PID namespace, the real `snapshot`,
`coordinator` and `doctor` commands. Each finding has its control: the same setup without the
escape (a read-only opener; the other namespace's mapper seen from where it is visible) reports
nothing, and `--strict` passes a clean workload that it refuses with the escape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SPAWNED, make_workload, needs_root, start_writers, stop_writers
from procutil import assert_nothing_published, assert_writers_resume, wait_line
from uffdsnap import escapes
from uffdsnap.image import manifest_path
from uffdsnap.procfs import open_object

pytestmark = needs_root
TIMEOUT = 120
NOBODY = 65534


def uffdsnap(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "uffdsnap", *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


def snapshot(shm: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return uffdsnap("snapshot", "--shm", shm, "-o", str(out), "--no-progress", *extra)


def opener(path: str, mode: str) -> subprocess.Popen[str]:
    """A process that holds `path` open (`<>` read-write, `<` read-only) and maps nothing of
    it: `sleep`, once the shell has opened fd 3."""
    proc = subprocess.Popen(["sh", "-c", f'exec 3{mode}"$0"; echo ready; exec sleep 600', path],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    SPAWNED.append(proc)
    wait_line(proc.stdout, "ready")
    return proc


@pytest.fixture
def workload(shm_path: str) -> Iterator[list[Any]]:
    make_workload(shm_path, 2, 256)
    writers = start_writers(shm_path, native=2)
    yield writers
    stop_writers(shm_path, writers)


def findings(summary: dict[str, Any]) -> list[str]:
    return list(summary["escapes"]["findings"])


def test_a_plain_workload_reports_nothing(shm_path: str, workload: list[Any],
                                          tmp_path: Path) -> None:
    """The control for every finding below: writers that map the object (and hold it open
    read-write, as they do) are tracked, not escapes; --strict takes the snapshot."""
    proc = snapshot(shm_path, tmp_path / "a.img", "--json", "--strict")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["escapes"]["audited"] is True
    assert findings(summary) == []
    hidden = summary["escapes"]["hidden_mappers"]
    assert hidden["checked"] and hidden["pages_compared"] > 0 and hidden["pages_with_excess"] == 0


def test_a_writable_opener_is_reported(shm_path: str, workload: list[Any],
                                       tmp_path: Path) -> None:
    """A process with the object open O_RDWR that does not map it could write() into it
    untracked: named in the summary (a warning line), in --json and in the manifest; the
    snapshot itself is published (without --strict)."""
    holder = opener(shm_path, "<>")
    out = tmp_path / "a.img"
    proc = snapshot(shm_path, out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["escapes"]["writable_openers"] == [f"{holder.pid} (sleep)"]
    assert any(f"writable opener: {holder.pid} (sleep)" in f for f in findings(summary))
    with open(manifest_path(str(out))) as f:
        stats = json.load(f)["stats"]
    assert stats["escapes"]["writable_openers"] == [f"{holder.pid} (sleep)"]
    text = snapshot(shm_path, tmp_path / "b.img")
    assert text.returncode == 0, text.stderr
    warnings = [line for line in text.stdout.splitlines() if line.startswith("  warning")]
    assert len(warnings) == 1 and f"writable opener: {holder.pid} (sleep)" in warnings[0], \
        text.stdout


def test_a_read_only_opener_is_not_reported(shm_path: str, workload: list[Any],
                                            tmp_path: Path) -> None:
    opener(shm_path, "<")
    proc = snapshot(shm_path, tmp_path / "a.img", "--json", "--strict")
    assert proc.returncode == 0, proc.stderr
    assert findings(json.loads(proc.stdout)) == []


def test_strict_refuses_a_writable_opener(shm_path: str, workload: list[Any],
                                          tmp_path: Path) -> None:
    """--strict fails the snapshot (after the copy) with the finding as the one error line: nothing
    published, every writer released."""
    holder = opener(shm_path, "<>")
    out = tmp_path / "a.img"
    proc = snapshot(shm_path, out, "--strict")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uffdsnap: error: --strict: writable opener: "
                                                   f"{holder.pid} (sleep)"), proc.stderr
    assert_nothing_published(str(out))
    assert_writers_resume(shm_path, workload)


def test_a_long_running_coordinator_with_strict_refuses(shm_path: str, workload: list[Any],
                                                        tmp_path: Path) -> None:
    """`coordinator --strict`: its client's snapshot fails with the finding; the client that
    asked a coordinator without --strict gets the warning line (from the flattened answer)."""
    holder = opener(shm_path, "<>")
    for strict in (True, False):
        sock = tmp_path / f"c{int(strict)}.sock"
        coord = subprocess.Popen([sys.executable, "-m", "uffdsnap", "coordinator", "--shm",
                                  shm_path, "--listen", str(sock), "--attach",
                                  *(["--strict"] if strict else [])],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        SPAWNED.append(coord)
        try:
            wait_line(coord.stdout, "listening")
            out = tmp_path / f"{int(strict)}.img"
            proc = uffdsnap("snapshot", "--coordinator", str(sock), "-o", str(out))
        finally:
            coord.terminate()
            coord.wait(timeout=30)
        if strict:
            assert proc.returncode != 0
            assert f"--strict: writable opener: {holder.pid} (sleep)" in proc.stderr
            assert_nothing_published(str(out))
        else:
            assert proc.returncode == 0, proc.stderr
            assert f"  warning      writable opener: {holder.pid} (sleep)" in proc.stdout


# ---- a mapper in another PID namespace ---------------------------------------------------------

# Runs as PID 1 of a new PID namespace with its own /proc (`unshare --pid --fork --mount-proc`):
# a writer of its own (visible there), then `uffdsnap ARGS`, whose output it passes on; with no
# ARGS, it says "ready" and keeps its writer until its stdin closes.
_INSIDE = """
import subprocess, sys
from uffdsnap import workload as wl
path = sys.argv[1]
w = wl.spawn_writer(path, 1)
w.wait_ready()
try:
    if len(sys.argv) == 2:
        print("ready", flush=True)
        sys.stdin.read()
        sys.exit(0)
    proc = subprocess.run([sys.executable, "-m", "uffdsnap", *sys.argv[2:]],
                          capture_output=True, text=True, timeout=100)
finally:
    w.kill()
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)
sys.exit(proc.returncode)
"""
_NAMESPACE = ("unshare", "--pid", "--fork", "--mount-proc")


def in_namespace(shm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`uffdsnap ARGS` inside a new PID namespace whose /proc shows only its own processes,
    beside a writer that lives there; every process outside is hidden from it."""
    return subprocess.run([*_NAMESPACE, sys.executable, "-c", _INSIDE, shm, *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture
def hidden_writer(shm_path: str) -> Iterator[list[Any]]:
    """Writer 0 outside, the snapshot (with writer 1) inside its own PID namespace."""
    make_workload(shm_path, 2, 256)
    writers = start_writers(shm_path, native=1)
    yield writers
    stop_writers(shm_path, writers)


def test_a_mapper_in_another_pid_namespace_is_reported(shm_path: str, hidden_writer: list[Any],
                                                       tmp_path: Path) -> None:
    """The snapshot sees only writer 1; the kernel's map counts show writer 0's mappings too."""
    out = tmp_path / "a.img"
    proc = in_namespace(shm_path, "snapshot", "--shm", shm_path, "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert len(summary["processes"]) == 1  # writer 1 only: writer 0 is invisible in there
    hidden = summary["escapes"]["hidden_mappers"]
    assert hidden["checked"] and hidden["pages_with_excess"] > 0, hidden
    offset, kernel, ours = hidden["example"]
    assert kernel > ours
    assert any(f.startswith("hidden mapper: ") for f in findings(summary))
    with open(manifest_path(str(out))) as f:
        assert json.load(f)["stats"]["escapes"]["hidden_mappers"]["pages_with_excess"] > 0


def test_strict_refuses_a_hidden_mapper(shm_path: str, hidden_writer: list[Any],
                                        tmp_path: Path) -> None:
    out = tmp_path / "a.img"
    proc = in_namespace(shm_path, "snapshot", "--shm", shm_path, "-o", str(out), "--strict")
    assert proc.returncode != 0
    assert "uffdsnap: error: --strict: hidden mapper: " in proc.stderr, proc.stderr
    assert_nothing_published(str(out))
    assert_writers_resume(shm_path, hidden_writer)


def test_the_same_mappers_seen_from_outside_are_not_hidden(shm_path: str,
                                                           hidden_writer: list[Any]) -> None:
    """The control: with writer 1 in its own namespace as above, the audit from the namespace
    that sees both writers finds the counts match."""
    inside = subprocess.Popen([*_NAMESPACE, sys.executable, "-c", _INSIDE, shm_path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    SPAWNED.append(inside)
    try:
        wait_line(inside.stdout, "ready")
        obj = open_object(shm_path)
        try:
            found = escapes.audit(obj)
            both = escapes.look(obj.object_id).writable_mappers()
        finally:
            obj.close()
    finally:
        assert inside.stdin is not None
        inside.stdin.close()
        inside.wait(timeout=30)
    assert len(both) == 2 and hidden_writer[0].pid in both  # (writer 1 is visible from here)
    assert found.hidden.checked and found.hidden.pages_compared > 0
    assert found.findings() == []


# ---- doctor --shm -----------------------------------------------------------------------------


def test_doctor_shm_shows_the_audit(shm_path: str, workload: list[Any]) -> None:
    holder = opener(shm_path, "<>")
    proc = uffdsnap("doctor", "--json", "--shm", shm_path)
    assert proc.returncode == 0, proc.stderr  # (escapes do not make snapshots impossible)
    result = json.loads(proc.stdout)
    assert result["escapes"]["writable_openers"] == [f"{holder.pid} (sleep)"]
    checks = {c["name"]: c for c in result["checks"]}
    assert not checks["writable openers"]["ok"] and f"{holder.pid} (sleep)" in \
        checks["writable openers"]["detail"]
    assert checks["hidden mappers"]["ok"]
    text = uffdsnap("doctor", "--shm", shm_path)
    assert "writable openers" in text.stdout and f"{holder.pid} (sleep)" in text.stdout


def test_doctor_shm_in_another_namespace_shows_the_hidden_mapper(
        shm_path: str, hidden_writer: list[Any]) -> None:
    proc = in_namespace(shm_path, "doctor", "--shm", shm_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "hidden mappers" in line]
    assert len(rows) == 1 and "hidden mapper: " in rows[0] and "!" in rows[0], proc.stdout


def test_doctor_shm_bad_object_is_one_line(tmp_path: Path) -> None:
    proc = uffdsnap("doctor", "--shm", str(tmp_path / "none"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"uffdsnap: error: {tmp_path / 'none'}: no such object"]


# ---- what cannot be compared ------------------------------------------------------------------


def test_hugetlbfs_pages_are_not_checked(hugetlbfs: Path) -> None:
    """A huge page's map count is not compared per page: "not checked", with the reason, never
    a finding."""
    path = str(hugetlbfs / "obj")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 4 << 20)
        obj = open_object(path)
        try:
            found = escapes.audit(obj)
        finally:
            obj.close()
    finally:
        os.close(fd)
    assert not found.hidden.checked and "hugetlbfs" in found.hidden.reason
    # (the fd above is ours, and we are the auditor: not an opener)
    assert found.findings() == []
    assert any("hidden mappers not checked: hugetlbfs" in n for n in found.notes())


def test_without_root_hidden_mappers_are_not_checked(shm_path: str, workload: list[Any]) -> None:
    """As uid 65534 the kernel hides map counts and PFNs: "not checked", with the reason; the
    root writers we may not inspect are listed as not audited, never silently skipped."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # (nothing of pytest's runs here: os._exit on every path)
        answer: dict[str, Any] = {"error": "unknown"}
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            obj = open_object(shm_path)
            answer = escapes.audit(obj).to_json()
        except BaseException as e:
            answer = {"error": f"{type(e).__name__}: {e}"}
        finally:
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = json.loads(f.read())
    os.waitpid(child, 0)
    assert "error" not in answer, answer
    assert answer["hidden_mappers"]["checked"] is False
    assert "CAP_SYS_ADMIN" in answer["hidden_mappers"]["reason"]
    assert answer["findings"] == []
    for writer in workload:
        assert any(u.startswith(f"{writer.pid} ") for u in answer["unreadable"])
