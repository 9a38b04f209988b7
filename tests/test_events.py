"""Tracking through process lifecycle: late mappers, fork, mremap, munmap during a snapshot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import make_workload, needs_root, start_writers, stop_writers
from procutil import assert_nothing_published, assert_writers_resume, paused_snapshot
from uffdsnap import workload as wl
from uffdsnap.image import verify

pytestmark = needs_root


def test_mapper_arriving_before_t_is_attached(shm_path: str, tmp_path: Path) -> None:
    """A process that maps the object while the others are being protected is found by the
    rescan before T, attached and protected: the snapshot covers it."""
    make_workload(shm_path, 4, data_pages=256)
    writers = start_writers(shm_path, native=3)
    out = str(tmp_path / "late.img")
    proc = paused_snapshot(shm_path, out, "protecting")
    try:
        late = start_writers(shm_path, native=1, first_index=3)
        writers += late
        os.kill(proc.pid, signal.SIGUSR1)  # end the pause: the rescan before T finds it
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 0, stderr
        summary = json.loads(stdout)
        assert late[0].pid in [p["pid"] for p in summary["processes"]]
        result = wl.check_file(out)
        assert result.ok, result.summary()
    finally:
        stop_writers(shm_path, writers)


def test_mapper_arriving_after_t_fails_the_snapshot(shm_path: str, tmp_path: Path) -> None:
    """A process that maps the object after T could have written unsaved pages untracked: the
    snapshot fails, naming it, and publishes nothing; every writer carries on."""
    make_workload(shm_path, 4, data_pages=256)
    writers = start_writers(shm_path, native=3)
    out = str(tmp_path / "late.img")
    proc = paused_snapshot(shm_path, out, "copying")
    try:
        late = start_writers(shm_path, native=1, first_index=3)
        writers += late
        os.kill(proc.pid, signal.SIGUSR1)  # end the pause: the check after the copy finds it
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 1
        assert str(late[0].pid) in stderr.strip().splitlines()[-1], stderr
        assert_nothing_published(out)
        assert_writers_resume(shm_path, writers)
    finally:
        stop_writers(shm_path, writers)


def test_verify_after_fork_free_run(shm_path: str, tmp_path: Path) -> None:
    """Baseline for this file: the events negotiated (fork/remap/unmap/remove) do not disturb an
    ordinary snapshot."""
    make_workload(shm_path, 2, data_pages=256)
    writers = start_writers(shm_path, native=2)
    out = str(tmp_path / "plain.img")
    try:
        proc = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--shm", shm_path,
                               "-o", out], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert wl.check_file(out).ok and verify(out).ok
    finally:
        stop_writers(shm_path, writers)
