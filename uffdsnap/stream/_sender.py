"""The sending end of a live stream (trio): where it goes and how (`StreamOptions`), the local
staging file the native core saves pages into, the pace (`TokenBucket`), and `StreamSender`,
which writes records with a bound on how long the link may stall, ends the stream and reads
the receiver's answer, or aborts it.

The coordinator drives it (coordinator/_copy.py `stream_all`): faulted pages are saved into
the staging file by the native core, never onto the network, and are sent from there (then
punched out of it); the scan copies one window at a time and sends it before copying the next,
so it follows the link's pace. docs/stream-format.md, "The sender".
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import struct
import tempfile
import termios
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from uffdsnap import priority
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.stream._address import Address, parse_address
from uffdsnap.stream._encoder import Encoder
from uffdsnap.stream._records import MAX_REPLY, Reply, StreamError, data_limit, decode_reply
from uffdsnap.stream._transport import connect, describe

MiB = 1 << 20
STREAM_TIMEOUT_S = 5.0  # default --stream-timeout: the link may not stall longer
REPLY_TIMEOUT_S = 60.0  # once every byte has left us: the receiver fsyncs and publishes
ABORT_TIMEOUT_S = 2.0  # to finish a torn record and send ABORT, to read a refusal's reason
SEND_PIECE = 64 << 10  # bytes per write: the stall bound and the pace apply per piece
FLUSH_BYTES = 256 << 10  # records are queued and written this many at a time
THREAD_COMPRESS_BYTES = 256 << 10  # larger records are compressed in a worker thread
MIN_STAGING = 64 * MiB
_TICK_S = 0.25  # how often a wait for the reply looks at what is still unsent


class StreamFailed(SnapshotFailed):
    """The stream could not be delivered (link lost, stalled, refused by the receiver)."""


def default_staging(size: int, page_size: int) -> int:
    """--staging's default: min(object size, max(64 MiB, 1/8 of the object)), at least a
    page."""
    return max(page_size, min(size, max(MIN_STAGING, size // 8)))


@dataclass(frozen=True)
class StreamOptions:
    """A snapshot streamed to `to` instead of written to a file (`snapshot --to`)."""

    to: str
    compress: bool = False
    max_rate: int = 0  # bytes per second on the wire; 0: no limit
    staging: int = 0  # bytes of faulted pages that may wait to be sent; 0: default_staging
    stream_timeout: float = STREAM_TIMEOUT_S
    # `-`: the fd the stream goes to, handed over (closing it ends the stream); -1: a copy of
    # standard output, which is then pointed at /dev/null. Never sent to a coordinator.
    fd: int = field(default=-1, compare=False)

    def check(self, *, remote: bool = False) -> Address:
        """The parsed address; UserError (one line) for anything unusable. `remote`: the
        request goes to a coordinator, whose standard output is no place for a stream."""
        address = parse_address(self.to)
        if remote and address.kind == "stdio":
            raise UserError("--to - streams to this command's standard output: not with "
                            "--coordinator (the coordinator sends the stream; give it "
                            "tcp://HOST:PORT or unix:PATH)")
        if self.max_rate < 0:
            raise UserError("--max-rate must be positive")
        if self.staging < 0:
            raise UserError("--staging must be positive")
        if not (math.isfinite(self.stream_timeout) and self.stream_timeout > 0):
            raise UserError("--stream-timeout must be a positive number of seconds")
        return address

    def staging_bytes(self, size: int, page_size: int) -> int:
        want = self.staging or default_staging(size, page_size)
        return max(page_size, want - want % page_size)


def take_stdout() -> int:
    """Standard output for a stream of our own: returns a copy of fd 1 and points fd 1 at
    /dev/null, so that nothing else writes into the stream (a stray print, a process forked
    later) and closing our copy ends it."""
    fd = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(null, 1)
    os.close(null)
    os.set_inheritable(fd, False)
    return fd


def open_staging(size: int, staging: int, window: int) -> tuple[int, str]:
    """The staging file: an unnamed sparse file of the object's size in the temporary
    directory (TMPDIR), or a memfd where that directory cannot hold one; (fd, where). Nothing
    is left behind whatever happens to us. UserError if there is no room for `staging` bytes
    plus one scan window."""
    directory = tempfile.gettempdir()
    fd, where = -1, f"{directory} (unnamed)"
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    if fd < 0:
        fd, where = os.memfd_create("uffdsnap-staging", os.MFD_CLOEXEC), "memory (memfd)"
    try:
        os.ftruncate(fd, size)
        st = os.fstatvfs(fd)
        room = st.f_bavail * st.f_frsize
        if where != "memory (memfd)" and room < staging + window:
            raise UserError(f"staging: {directory} has {room >> 20} MiB free, less than "
                            f"--staging ({staging >> 20} MiB) plus one scan window: free "
                            "some room, point TMPDIR elsewhere, or lower --staging")
    except BaseException:
        os.close(fd)
        raise
    return fd, where


class TokenBucket:
    """--max-rate: at most `rate` bytes per second on average, in bursts of `burst`."""

    def __init__(self, rate: int, burst: int = 0):
        self.rate = rate
        self.burst = max(burst or rate // 20, SEND_PIECE)
        self.tokens = float(self.burst)
        self.stamp = trio.current_time()

    async def take(self, n: int) -> None:
        """Wait until `n` bytes may go (n may exceed the burst: the debt is waited out)."""
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            await trio.sleep((n - self.tokens) / self.rate)
            now = trio.current_time()
            self.tokens += (now - self.stamp) * self.rate
            self.stamp = now
        self.tokens -= n


class StreamSender:
    """One stream to a receiver: records out, the stall bound, END and the reply, or ABORT."""

    def __init__(self, options: StreamOptions, address: Address, out: trio.abc.Stream):
        self.options = options
        self.address = address
        self.out = out
        self.encoder = Encoder()
        self.bucket = TokenBucket(options.max_rate) if options.max_rate else None
        self.started: float | None = None  # when HEADER (T) was made
        self.sent_at: float | None = None  # when END left us
        self.acked_at: float | None = None  # when the receiver answered (None on a pipe)
        self.reply: Reply | None = None
        self._queue: list[bytes] = []  # whole records not written yet
        self._queued = 0
        self._torn: memoryview | None = None  # the rest of a write a failure interrupted
        self._broken = ""  # why the stream cannot go on

    @classmethod
    async def open(cls, options: StreamOptions) -> StreamSender:
        """Connect (before anything is protected: a receiver that is not there costs the
        writers nothing). UserError if it cannot be reached."""
        address = options.check()
        if address.kind == "stdio" and options.fd >= 0:
            return cls(options, address, trio.lowlevel.FdStream(options.fd))
        out = await connect(address, timeout=max(options.stream_timeout, 10.0))
        if address.kind == "stdio":
            take_stdout()
        return cls(options, address, out)

    @property
    def wire_bytes(self) -> int:
        return self.encoder.wire_bytes

    # ---- records --------------------------------------------------------------------------

    async def header(self, size: int, page_size: int, t_unix_ns: int,
                     object_fields: dict[str, Any],
                     parent: dict[str, Any] | None = None) -> None:
        """HEADER; with `parent` (a manifest's parent field), the stream is a delta."""
        self.started = time.monotonic()
        await self._emit(self.encoder.header(size, page_size, t_unix_ns, object_fields, parent))

    async def pages(self, offset: int, data: memoryview) -> None:
        """PAGES records for `data` at `offset` (cut to the record limit), compressed in a
        thread if asked."""
        assert self.encoder.header_record is not None
        limit = data_limit(self.encoder.header_record.page_size)
        for start in range(0, len(data), limit):
            piece = data[start:start + limit]
            if self.options.compress and len(piece) >= THREAD_COMPRESS_BYTES:
                record = await priority.in_worker_thread(self.encoder.pages, offset + start,
                                                         piece, True)
            else:  # (a faulted page compresses faster than a hand-off to a thread)
                record = self.encoder.pages(offset + start, piece, self.options.compress)
            await self._emit(record)

    async def hole(self, offset: int, length: int) -> None:
        await self._emit(self.encoder.hole(offset, length))

    async def _emit(self, record: bytes) -> None:
        """Queue a record; write the queue once it holds FLUSH_BYTES (small records, a
        faulted page each, go out many to a write)."""
        self._queue.append(record)
        self._queued += len(record)
        if self._queued >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        """Write every queued record. A receiver that gave the stream up answers at once
        (`error: ...`, then it discards what still comes for a moment): we stop there, with
        its reason."""
        if self._queue and _readable(self.out):
            self._broken = await self._lost(None)
            raise StreamFailed(self._broken)
        if self._queue:
            data = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
            self._queue, self._queued = [], 0
            await self._send(data)

    async def _send(self, records: bytes) -> None:
        """Write whole records, piece by piece, each piece within the stall bound (and the
        pace). StreamFailed if the link is lost or stalls; records cut short by that, or by
        cancellation, are kept for abort() to complete."""
        if self._broken:
            raise StreamFailed(self._broken)
        view = memoryview(records)
        timeout = self.options.stream_timeout
        self._torn = view
        try:
            while view:
                piece = view[:SEND_PIECE]
                if self.bucket is not None:
                    await self.bucket.take(len(piece))
                # a piece goes whole or the stream is broken: cancellation waits for it (no
                # longer than the stall bound), so a record cut short ends on a known byte
                with trio.CancelScope(shield=True), trio.fail_after(timeout):
                    await self.out.send_all(piece)
                view = view[len(piece):]
                self._torn = view
            self._torn = None
        except trio.TooSlowError:
            self._broken = (f"streaming to {self.address}: the link stalled (nothing could be "
                            f"sent for {timeout:g} s, --stream-timeout)")
            raise StreamFailed(self._broken) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._broken = await self._lost(e)
            raise StreamFailed(self._broken) from None

    async def _lost(self, e: BaseException | None) -> str:
        """Why the stream broke: the receiver's own word if it sent one (a refused record, its
        disk full), else how the connection ended."""
        self._torn = None
        why = describe(e) if e is not None else "the receiver closed the connection"
        if self.address.kind != "stdio":
            with contextlib.suppress(StreamError, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                reply = await _read_reply_within(self.out, ABORT_TIMEOUT_S)
                if reply is not None and not reply.ok:
                    return f"the receiver at {self.address} refused the stream: {reply.error}"
        if self.address.kind == "stdio":
            return f"streaming to standard output: {why} (the reader went away)"
        return f"streaming to {self.address}: connection lost ({why})"

    # ---- the end ----------------------------------------------------------------------------

    async def finish(self, manifest_fields: dict[str, Any]) -> Reply | None:
        """END, the end of our side, and the receiver's answer (None on a pipe: no answer).
        StreamFailed unless it says `ok`."""
        await self._emit(self.encoder.end(manifest_fields))
        await self.flush()
        self.sent_at = time.monotonic()
        if self.address.kind == "stdio":
            await self.out.aclose()
            return None
        try:
            await self.out.send_eof()  # type: ignore[attr-defined]
            reply = await self._await_reply()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise StreamFailed(f"streaming to {self.address}: no answer from the receiver "
                               f"({describe(e)})") from None
        except StreamError as e:
            raise StreamFailed(f"streaming to {self.address}: {e}") from None
        self.reply, self.acked_at = reply, time.monotonic()
        if not reply.ok:
            raise StreamFailed(f"the receiver at {self.address} did not publish: "
                               f"{reply.error}")
        return reply

    async def _await_reply(self) -> Reply:
        """The reply, waiting while what we sent still drains through the link (as long as
        it moves: a stall bound as for sending), then up to REPLY_TIMEOUT_S for the receiver
        to publish."""
        line = b""
        timeout = self.options.stream_timeout
        last_unsent, moved, drained = _unsent(self.out), time.monotonic(), None
        while True:
            with trio.move_on_after(_TICK_S):
                piece = await self.out.receive_some(MAX_REPLY)  # type: ignore[attr-defined]
                if not piece:
                    raise StreamError("the receiver closed the connection without a reply")
                line += piece
                if b"\n" in line or len(line) > MAX_REPLY:
                    return decode_reply(line.split(b"\n", 1)[0] + b"\n")
                continue
            now, unsent = time.monotonic(), _unsent(self.out)
            if unsent != last_unsent:
                last_unsent, moved = unsent, now
            if unsent:
                if now - moved > timeout:
                    raise StreamError(f"the link stalled with {unsent} bytes unsent for "
                                      f"{timeout:g} s (--stream-timeout)")
                continue
            drained = drained or now
            if now - drained > max(REPLY_TIMEOUT_S, timeout):
                raise StreamError(f"no reply from the receiver within "
                                  f"{max(REPLY_TIMEOUT_S, timeout):g} s of the stream's end")

    async def abort(self, reason: str) -> None:
        """Best effort, bounded: complete a record a failure cut short, send ABORT, close.
        (A receiver that gets neither discards the stream when it ends short.)"""
        with trio.move_on_after(ABORT_TIMEOUT_S), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._queue, self._queued = [], 0  # never written: the stream ends before them
            if not self._broken:
                if self._torn is not None:
                    await self.out.send_all(self._torn)
                    self._torn = None
                await self.out.send_all(self.encoder.abort(reason))
                if self.address.kind != "stdio":
                    await self.out.send_eof()  # type: ignore[attr-defined]
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.out.aclose()

    def describe(self) -> dict[str, Any]:
        """The stream's part of the snapshot's summary. `seconds`: from HEADER (at T) to the
        receiver's `ok` (on a pipe: to END written)."""
        now = time.monotonic()
        seconds = max((self.acked_at or self.sent_at or now) - (self.started or now), 1e-9)
        enc = self.encoder
        return {"to": str(self.address), "compress": self.options.compress,
                "max_rate": self.options.max_rate, "data_bytes": enc.bytes_sent,
                "wire_bytes": enc.wire_bytes, "pages": enc.pages_sent,
                "seconds": round(seconds, 3),
                "wire_bytes_per_s": math.floor(enc.wire_bytes / seconds),
                "manifest_sha256": self.reply.manifest_sha256 if self.reply else "",
                "image": self.reply.image if self.reply else ""}


async def _read_reply_within(stream: trio.abc.Stream, timeout: float) -> Reply | None:
    line = b""
    with trio.move_on_after(timeout):
        while b"\n" not in line and len(line) <= MAX_REPLY:
            piece = await stream.receive_some(MAX_REPLY)  # type: ignore[attr-defined]
            if not piece:
                break
            line += piece
    if b"\n" not in line:
        return None
    return decode_reply(line.split(b"\n", 1)[0] + b"\n")


def _unsent(stream: trio.abc.Stream) -> int:
    """Bytes we wrote that the peer has not taken yet (TIOCOUTQ; 0 where unknown)."""
    return _queue_bytes(stream, termios.TIOCOUTQ)


def _readable(stream: trio.abc.Stream) -> bool:
    """Has the receiver said something (FIONREAD)? Mid-stream, that is its refusal."""
    return _queue_bytes(stream, termios.FIONREAD) > 0


def _queue_bytes(stream: trio.abc.Stream, request: int) -> int:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0" * 4)
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])
