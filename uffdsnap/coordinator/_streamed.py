"""A snapshot streamed to a receiver (`snapshot --to`): connect first (a receiver that is not
there costs the writers nothing), save into a local staging file whose faulted pages may not
exceed --staging, stream as the copy goes (_copy.py `stream_all`), then END with the manifest
fields and the receiver's `ok`; on any failure, ABORT (writers are released by the run
itself, before anything here touches the network again)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio

from uffdsnap.coordinator._copy import StreamJob, staging_full, staging_overflowed
from uffdsnap.coordinator._report import manifest_fields
from uffdsnap.errors import SnapshotFailed
from uffdsnap.native.core import SnapCore
from uffdsnap.stream import StreamOptions, StreamSender, open_staging

if TYPE_CHECKING:
    from uffdsnap.coordinator._server import Coordinator


async def snapshot_streamed(coord: Coordinator, options: StreamOptions,
                            incremental: bool = False) -> dict[str, Any]:
    """One snapshot of coord's object as a stream to `options.to`; its summary (with a
    `stream` part) once the receiver has published it, or SnapshotFailed/UserError."""
    obj, ps = coord.obj, coord.page_size
    staging = options.staging_bytes(obj.size, ps)
    sender = await StreamSender.open(options)
    try:
        fd, where = open_staging(obj.size, staging, coord.chunk_bytes)
    except BaseException:
        await sender.aclose()
        raise
    fields = manifest_fields(obj, {"snapshot_time_unix_ns": 0, "processes": [],
                                   "processes_gone": []})["object"]
    job = StreamJob(sender, fd, staging,
                    {k: v for k, v in fields.items() if k not in ("size", "page_size")}, where)
    core: SnapCore | None = None
    try:
        core = SnapCore(obj.fd, fd, obj.size, ps)
        core.set_fault_saved_limit(job.fault_limit(ps))
        summary = await coord.take(core, stream=job, incremental=incremental)
        fields = manifest_fields(obj, summary)
        await sender.finish({"processes": fields["processes"], "stats": fields["stats"]})
    except BaseException as e:
        error: BaseException = e
        # the core's words for it ("serving faults: ENOBUFS ..."), in the user's; only if it
        # was the first failure (faults saved while a failed run releases may overflow too)
        if isinstance(e, SnapshotFailed) and "ENOBUFS" in str(e) and core is not None \
                and staging_overflowed(core):
            error = SnapshotFailed(staging_full(job))
        reason = str(error) if isinstance(error, SnapshotFailed | OSError) else (
            "interrupted" if isinstance(error, KeyboardInterrupt | trio.Cancelled)
            else f"{type(error).__name__}: {error}")
        with trio.CancelScope(shield=True):
            await sender.abort(reason)
        if error is e:
            raise
        raise error from None
    finally:
        if core is not None:
            core.close()
        os.close(fd)
    summary["stream"] = {**sender.describe(), "staging_bytes": staging,
                         "staging_in": where, "faulted_pages_sent": job.faulted_sent,
                         "staging_peak_bytes": job.peak_bytes}
    return summary
