"""The receiver (trio): take one stream, or stream after stream, check every record, write the
image through uffdsnap.image, publish only what ended complete and verified, then answer.

Whatever goes wrong (a hostile or broken stream, a sender that dies, a reset, a stall, a full
disk) ends the same way: the image is discarded (it never had a name, see image._unnamed), the
sender is told why if it can hear it, and the result says so in one line. Serving several
streams, one failure never stops the next.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.image import (
    ImageWriter,
    UnnamedImageWriter,
    extent_checksum,
    iso8601_utc,
    manifest_path,
)
from uffdsnap.stream._address import Address
from uffdsnap.stream._decoder import StreamDecoder
from uffdsnap.stream._records import (
    Abort,
    End,
    Hole,
    Pages,
    Reply,
    StreamError,
    StreamHeader,
    encode_reply,
)
from uffdsnap.stream._transport import (
    close_listener,
    describe,
    linger,
    open_listener,
    peer_name,
    send_line,
)

IDLE_TIMEOUT_S = 60.0  # longer than a snapshot's protect phase, when a sender may be quiet
READ_PIECE = 1 << 20
REPLY_TIMEOUT_S = 10.0
LINGER_S = 2.0
MAX_NAME_TRIES = 1000

log = logging.getLogger(__name__)


@dataclass
class ReceiveResult:
    """One stream's outcome: published (`ok`, with the image and its manifest's sha256) or
    discarded (`error`, one line)."""

    ok: bool
    peer: str
    image: str | None = None
    manifest: str | None = None
    manifest_sha256: str | None = None
    error: str | None = None
    object_size: int | None = None
    page_size: int | None = None
    snapshot_time: str | None = None
    pages: int = 0
    holes: int = 0
    data_bytes: int = 0
    wire_bytes: int = 0
    compressed_records: int = 0
    duration_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Output:
    """Where streams are published: one fixed path, or (`directory`) a directory in which each
    stream gets a name of its own, `snapshot-<T>.img` (`-2`, `-3`... when T repeats). Existing
    files are never replaced unless `overwrite` (fixed path only)."""

    def __init__(self, path: str, *, directory: bool = False, overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.directory = directory
        self.overwrite = overwrite and not directory

    def open(self, header: StreamHeader) -> ImageWriter:
        if not self.directory:
            return UnnamedImageWriter(self.path, header.size, header.page_size,
                                      overwrite=self.overwrite)
        stamp = iso8601_utc(header.t_unix_ns).replace("-", "").replace(":", "")
        for n in range(1, MAX_NAME_TRIES + 1):
            name = os.path.join(self.path, f"snapshot-{stamp}{f'-{n}' if n > 1 else ''}.img")
            if os.path.lexists(name) or os.path.lexists(manifest_path(name)):
                continue
            return UnnamedImageWriter(name, header.size, header.page_size)
        raise UserError(f"{self.path}: {MAX_NAME_TRIES} images of T {stamp} already; refusing "
                        "to overwrite")


OnHeader = Callable[[StreamHeader, str, str], None]  # header, image path, peer


async def receive_stream(source: trio.abc.ReceiveStream, output: Output, *, peer: str,
                         idle_timeout: float = IDLE_TIMEOUT_S,
                         reply_to: trio.abc.Stream | None = None,
                         on_header: OnHeader | None = None) -> ReceiveResult:
    """Receive one stream from `source` and publish it at `output`, or discard it.

    Expected failures come back as a result with ok=False (never raised). The stream is
    complete at END followed by the end of input (the sender closes its sending side). With
    `reply_to` (a bidirectional transport) the sender is answered: `ok SHA256 NAME` once
    published (NAME: the image's name in its directory), or `error: REASON`.
    """
    session = _Session(source, output, peer, idle_timeout, on_header)
    reply: Reply
    try:
        await session.run()
        reply = Reply(True, manifest_sha256=session.result.manifest_sha256 or "",
                      image=os.path.basename(session.result.image or ""))
    except (StreamError, SnapshotFailed, UserError) as e:
        reply = session.failed(str(e))
    except OSError as e:  # the disk: full, gone, read-only
        what = e.strerror or str(e)  # (ImageWriter's own say where: "writing image X at ...")
        reply = session.failed(what if what.startswith("writing image") else
                               f"cannot write the image: {what}")
    finally:
        session.close()
    if reply_to is not None:
        sent = await send_line(reply_to, encode_reply(reply), REPLY_TIMEOUT_S)
        if sent and not reply.ok:
            await linger(reply_to, LINGER_S)
    return session.result


class _Session:
    """One stream being received: the decoder, the image being written, the result."""

    def __init__(self, source: trio.abc.ReceiveStream, output: Output, peer: str,
                 idle_timeout: float, on_header: OnHeader | None):
        self.source = source
        self.output = output
        self.idle_timeout = idle_timeout
        self.on_header = on_header
        self.decoder = StreamDecoder()
        self.writer: ImageWriter | None = None
        self.started = time.monotonic_ns()
        self.result = ReceiveResult(ok=False, peer=peer)

    async def run(self) -> None:
        while True:
            record = self.decoder.next_record()
            if record is None:
                self.decoder.receive_data(await self._read(self.decoder.wanted()))
            elif isinstance(record, StreamHeader):
                self._start(record)
            elif isinstance(record, Pages):
                assert self.writer is not None
                self.writer.write(record.offset, record.data)
                self.writer.record_extent(record.offset, len(record.data),
                                          extent_checksum(record.data))
            elif isinstance(record, Hole):
                pass  # zeros at T: the image is sparse there already
            elif isinstance(record, Abort):
                raise StreamError(f"the sender aborted: {record.reason}")
            elif isinstance(record, End):
                await self._finish(record)
                return

    async def _read(self, wanted: int, waiting: str = "") -> bytes:
        with trio.move_on_after(self.idle_timeout) as scope:
            try:
                return await self.source.receive_some(min(max(wanted, 1 << 16), READ_PIECE))
            except trio.BrokenResourceError as e:
                raise StreamError(f"connection lost: {describe(e)} (after "
                                  f"{self.decoder.progress()})") from None
        assert scope.cancelled_caught
        raise StreamError(f"stalled: nothing arrived for {self.idle_timeout:g} s, --idle-timeout "
                          f"({waiting or 'after ' + self.decoder.progress()})")

    def _start(self, header: StreamHeader) -> None:
        self.writer = self.output.open(header)
        r = self.result
        r.image, r.manifest = self.writer.path, manifest_path(self.writer.path)
        r.object_size, r.page_size = header.size, header.page_size
        r.snapshot_time = iso8601_utc(header.t_unix_ns)
        if self.on_header:
            self.on_header(header, self.writer.path, r.peer)

    async def _finish(self, end: End) -> None:
        # Only the end of input may follow END: waiting for it, rather than looking at what
        # happens to have arrived, makes a stream with bytes after END always refused.
        while True:
            self.decoder.next_record()  # refuses bytes that came after END
            data = await self._read(1 << 16, "after END, the sender must close its side")
            if not data:
                break
            self.decoder.receive_data(data)
        assert self.writer is not None and self.decoder.header is not None
        fields = dict(end.manifest)
        if self.decoder.header.parent is not None:  # a delta: its manifest names the parent
            fields["parent"] = self.decoder.header.parent
        try:
            manifest = self.writer.publish(fields)
        except ValueError as e:  # the decoder checked these fields already: a bug if it lets
            raise StreamError(f"END: {e}") from None  # one through, but never publish it
        text = manifest.to_json().encode("ascii")  # the manifest file's bytes
        self._tally()
        self.result.ok = True
        self.result.manifest_sha256 = hashlib.sha256(text).hexdigest()

    def failed(self, error: str) -> Reply:
        self._tally()
        self.result.ok = False
        self.result.error = f"{error}; nothing published"
        self.result.image = self.result.manifest = None
        log.debug("stream from %s discarded: %s", self.result.peer, error)
        return Reply(False, error=error)

    def _tally(self) -> None:
        d, r = self.decoder, self.result
        r.pages, r.holes, r.data_bytes = d.pages, d.holes, d.data_bytes
        r.wire_bytes, r.compressed_records = d.wire_bytes, d.compressed
        r.duration_ns = time.monotonic_ns() - self.started

    def close(self) -> None:
        if self.writer is not None:
            self.writer.abort()  # nothing once published; else the image and temporaries go


async def serve(address: Address, output: Output, *, keep_listening: bool = False,
                idle_timeout: float = IDLE_TIMEOUT_S,
                on_listening: Callable[[str], None] | None = None,
                on_header: OnHeader | None = None,
                on_result: Callable[[ReceiveResult], None] | None = None) -> ReceiveResult:
    """Listen at `address` and receive one stream (or, `keep_listening`, one after another
    until cancelled: each failure is reported and the next sender served). Streams are taken
    one at a time; later senders wait in the listen backlog. Returns the last result."""
    listener, shown = await open_listener(address)
    try:
        if on_listening:
            on_listening(shown)
        while True:
            stream = await listener.accept()
            peer = peer_name(stream, address)
            async with stream:
                try:
                    result = await receive_stream(stream, output, peer=peer,
                                                  idle_timeout=idle_timeout, reply_to=stream,
                                                  on_header=on_header)
                except Exception as e:  # a bug: report it, and keep serving if asked to
                    if not keep_listening:
                        raise
                    log.debug("internal error", exc_info=True)
                    result = ReceiveResult(ok=False, peer=peer, error=f"internal error: "
                                           f"{type(e).__name__}: {e}; nothing published")
            if on_result:
                on_result(result)
            if not keep_listening:
                return result
    finally:
        close_listener(listener, address)
