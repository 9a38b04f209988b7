"""The way to T at the highest share we may take (priority.py), with busy writers: the
coordinator's event loop and its agent host's are urgent while writers are held, and back at
the command's own share for the copy, which runs at that share even in a worker thread born
while the event loop was urgent. The image is still one instant."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from conftest import (
    at_priority,
    make_workload,
    needs_root,
    running_coordinator,
    start_writers,
    stop_writers,
)
from uffdsnap import priority
from uffdsnap import workload as wl
from uffdsnap.cli import DEFAULT_NICE
from uffdsnap.coordinator import _copy
from uffdsnap.priority import URGENT_NICE

pytestmark = needs_root


async def test_writers_held_wait_on_urgent_threads_and_the_copy_runs_at_our_share(
        shm_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_workload(shm_path, 4, data_pages=256)
    writers = await trio.to_thread.run_sync(lambda: start_writers(shm_path, native=4))
    seen: dict[str, tuple[int, int]] = {}
    copied_at: list[int] = []
    copy_loop = _copy._copy_loop

    def observed_copy_loop(*args: object) -> str:  # (the real copy, its thread's share noted)
        copied_at.append(priority.this_thread())
        return copy_loop(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_copy, "_copy_loop", observed_copy_loop)
    try:
        with at_priority(DEFAULT_NICE):
            async with running_coordinator(shm_path, tmp_path) as (coordinator, _sock):
                def shares() -> tuple[int, int]:  # (ours, our agent host's)
                    host = coordinator.attacher.host_pid if coordinator.attacher else None
                    assert host
                    return priority.this_thread(), os.getpriority(os.PRIO_PROCESS, host)

                async def protecting() -> None:  # (every writer protected, T not declared)
                    seen["protecting"] = shares()
                    # a worker thread born urgent, left idle in trio's cache: the next one
                    # used (the copy's) unless the copy sets its own share
                    await trio.to_thread.run_sync(lambda: None)

                async def copying() -> None:
                    seen["copying"] = shares()

                coordinator.test_hooks["at_phase"] = {"protecting": protecting,
                                                      "copying": copying}
                await coordinator.snapshot(str(tmp_path / "u.img"))
        assert seen["protecting"] == (URGENT_NICE, URGENT_NICE)
        assert seen["copying"] == (DEFAULT_NICE, DEFAULT_NICE)
        assert copied_at and set(copied_at) == {DEFAULT_NICE}
        result = wl.check_file(str(tmp_path / "u.img"))
        assert result.ok, result.summary()
    finally:
        await trio.to_thread.run_sync(stop_writers, shm_path, writers)
