"""Publishing a snapshot: into an image file (kept unnamed until it is complete), or streamed to
a receiver (_streamed.py); and, while writes are tracked (_tracking.py), what each outcome means
for the next delta: a published image is its parent, named by where it went."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uffdsnap.coordinator._report import manifest_fields
from uffdsnap.coordinator._streamed import snapshot_streamed
from uffdsnap.coordinator._tracking import Parent
from uffdsnap.image import ImageWriter, PassedImageWriter, UnnamedImageWriter
from uffdsnap.native.core import SnapCore
from uffdsnap.stream import StreamOptions

if TYPE_CHECKING:
    from uffdsnap.coordinator._server import Coordinator


async def snapshot_to_file(coord: Coordinator, output: str, overwrite: bool,
                           incremental: bool, files: tuple[int, int] | None = None
                           ) -> dict[str, Any]:
    """One snapshot published at `output` (a delta when asked for and proven), or (`files`)
    into a client's unnamed image and manifest files, which it names; its summary."""
    obj = coord.obj
    # unnamed until published: a coordinator killed mid-copy leaves no temporary behind
    writer: ImageWriter = (
        PassedImageWriter(output, obj.size, obj.page_size, *files) if files is not None
        else UnnamedImageWriter(output, obj.size, obj.page_size, overwrite=overwrite))
    try:
        core = SnapCore(obj.fd, writer.fd, obj.size, obj.page_size)
    except BaseException:
        writer.abort()
        raise
    published: Parent | None = None
    failure = "not published"
    try:
        summary = await coord.take(core, writer=writer, incremental=incremental)
        fields = manifest_fields(obj, summary)
        tracked = coord.last_run.tracked if coord.last_run is not None else None
        plan = tracked.plan if tracked is not None else None
        if plan is not None and plan.delta and plan.parent is not None:
            fields["parent"] = plan.parent.reference(output)
        writer.publish(fields)
        published = Parent(output, writer.manifest_sha256, summary["snapshot_time_unix_ns"])
        return summary
    except BaseException as e:
        failure = str(e) or type(e).__name__
        writer.abort()
        raise
    finally:
        core.close()
        _tracked(coord, published, failure)


async def snapshot_to_receiver(coord: Coordinator, stream: StreamOptions,
                               incremental: bool) -> dict[str, Any]:
    """One snapshot streamed to a receiver; while tracking writes, the receiver's answer names
    the image, the parent of the next delta streamed there."""
    published: Parent | None = None
    failure = "not published"
    try:
        summary = await snapshot_streamed(coord, stream, incremental)
        st = summary["stream"]
        if st.get("image") and st.get("manifest_sha256"):
            published = Parent(st["image"], st["manifest_sha256"],
                               summary["snapshot_time_unix_ns"], st["to"])
        else:
            failure = ""
        return summary
    except BaseException as e:
        failure = str(e) or type(e).__name__
        raise
    finally:
        _tracked(coord, published, failure)


def _tracked(coord: Coordinator, published: Parent | None, failure: str) -> None:
    """After a tracked run (if the last one was): the record goes on from its result
    (`failure` "" with nothing published: published where no one named it)."""
    run = coord.last_run
    if run is None or run.tracked is None:
        return
    coord.tracking.end(run.tracked.plan, run.core.written,
                       released_kept=run.tracked.kept_agents,
                       published=published, failure=run.failure or failure)
    if published is None and not failure:
        coord.tracking.unnamed()
