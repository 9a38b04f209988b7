"""`uffdsnap demo`: the whole thing on an embedded workload, in one command.

Creates a shared-memory object, starts unmodified native writers (attached with ptrace) and Python
writers that enlist, takes a snapshot from a coordinator while all of them keep writing, then
proves the image is one point-in-time state with the workload's checker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import trio

from uffdsnap import native
from uffdsnap import workload as wl
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.hosted import hosted
from uffdsnap.image import verify
from uffdsnap.native.libc import KernelError
from uffdsnap.native.uffd import create_uffd
from uffdsnap.procfs import open_object
from uffdsnap.stats import ns_text, size_text

NATIVE_WRITERS = 4
ENLISTED_WRITERS = 2
DATA_PAGES = 2048  # 8 MiB per writer


def preflight() -> None:
    """Fail early, in one line, where snapshots cannot work at all."""
    try:
        fd, _ = create_uffd()
        os.close(fd)
    except KernelError as e:
        raise UserError(f"userfaultfd is not available here: {e}") from None
    if os.geteuid() != 0:
        raise UserError("the demo attaches to its writers with ptrace: run it as root "
                        "(see `uffdsnap doctor`)")


def run_demo(keep: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; return a result dict (ok, summary, checks). `keep` keeps the image in that
    directory; otherwise it is removed with the rest."""
    preflight()
    native.program(native.WRITER)  # shipped in the package: fail now if it is missing
    workdir = tempfile.mkdtemp(prefix="uffdsnap-demo-")
    shm = f"/dev/shm/uffdsnap-demo-{uuid.uuid4().hex[:8]}"
    writers: list[wl.WriterProcess] = []
    try:
        fd, size = wl.create_object(shm, NATIVE_WRITERS + ENLISTED_WRITERS, DATA_PAGES)
        os.close(fd)
        say(f"created {shm}: {size_text(size)} of shared memory, "
            f"{NATIVE_WRITERS + ENLISTED_WRITERS} writer regions")
        try:
            result = trio.run(_run, shm, workdir, writers, say)
        except wl.WorkloadError as e:
            raise UserError(f"the demo's workload failed: {e}") from None
        image = result["summary"]["image"]
        if keep:
            os.makedirs(keep, exist_ok=True)
            for suffix in ("", ".json"):
                shutil.move(image + suffix, os.path.join(keep, os.path.basename(image) + suffix))
            result["summary"]["image"] = os.path.join(keep, os.path.basename(image))
            say(f"image kept at {result['summary']['image']}")
        return result
    finally:
        if writers:
            wl.set_stop(shm)
            for w in writers:
                try:
                    w.wait(timeout=10)
                except wl.WorkloadError:
                    w.kill()
        if os.path.exists(shm):
            os.unlink(shm)
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(shm: str, workdir: str, writers: list[wl.WriterProcess],
               say: Callable[[str], None]) -> dict[str, Any]:
    obj = open_object(shm)
    try:
        async with hosted(obj, socket_path=os.path.join(workdir, "coordinator.sock")) as host:
            sock = host.socket_path
            say(f"coordinator listening on {sock}")
            await trio.to_thread.run_sync(_start_writers, shm, sock, writers)
            say(f"started {NATIVE_WRITERS} native writers (unmodified; pids "
                f"{', '.join(str(w.pid) for w in writers[:NATIVE_WRITERS])}) and "
                f"{ENLISTED_WRITERS} Python writers that enlisted (pids "
                f"{', '.join(str(w.pid) for w in writers[NATIVE_WRITERS:])})")
            before = wl.read_live_seqs(shm)
            say("taking a snapshot while every writer keeps writing ...")
            out = os.path.join(workdir, "demo.img")
            summary = await host.coordinator.snapshot(out)
            after = wl.read_live_seqs(shm)
    finally:
        obj.close()
    summary["image"] = out
    return _report(out, summary, before, after, say)


def _start_writers(shm: str, sock: str, writers: list[wl.WriterProcess]) -> None:
    for i in range(NATIVE_WRITERS):
        writers.append(wl.spawn_writer(shm, i, impl="c"))
    for i in range(NATIVE_WRITERS, NATIVE_WRITERS + ENLISTED_WRITERS):
        writers.append(wl.spawn_writer(shm, i, impl="python", enlist=sock))
    for w in writers:
        w.wait_ready()


def _report(out: str, summary: dict[str, Any], before: list[int], after: list[int],
            say: Callable[[str], None]) -> dict[str, Any]:
    fs = summary["fault_service"]
    say(f"snapshot done at T = {summary['snapshot_time']}: {len(summary['processes'])} "
        f"processes joined in {ns_text(summary['join_ns'])} and protected in "
        f"{ns_text(summary['protect_phase_ns'])}, "
        f"{summary['faults']} write faults served (p50 {ns_text(fs['p50_ns'])}, "
        f"max {ns_text(fs['max_ns'])}), {size_text(summary['bytes_scanned'])} copied in "
        f"{ns_text(summary['copy_ns'])}")
    report = verify(out)
    say(f"verify: {'OK' if report.ok else 'CORRUPT'} ({report.extents} extents checksummed)")
    check = wl.check_file(out)
    for w in check.writers:
        say(f"  writer {w.index} ({w.impl:6}): step {before[w.index]:>9} when the snapshot "
            f"began, {w.seq:>9} in the image, {after[w.index]:>9} when it ended")
    if not check.ok:
        raise SnapshotFailed(f"the image is NOT one point-in-time state: {check.summary()}")
    if not report.ok:
        raise SnapshotFailed(f"the image does not match its manifest: {report.problem}")
    say("consistency check: OK — every writer's pages, and what each writer had seen of the "
        "others, agree with one instant T")
    return {"ok": True, "summary": summary, "verify": report.to_dict(),
            "consistency": check.to_dict()}
