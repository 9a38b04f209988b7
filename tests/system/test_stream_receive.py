"""The migration stream's receiver, for real: over a rate-limited veth link between network
namespaces (uffdsnap/testing/netns.py), TCP and Unix sockets on this host, pipes and files; fed
streams our encoder made from real images (a live snapshot of running writers, and images built
the way the coordinator builds them). Every way a stream can go wrong publishes nothing and
leaves no file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import make_workload, needs_root, start_writers, stop_writers
from procutil import finish, wait_line
from uffdsnap import workload as wl
from uffdsnap.image import ImageWriter, extent_checksum, load_manifest, manifest_path, verify
from uffdsnap.stream import (
    Encoder,
    Output,
    ReceiveResult,
    Reply,
    encode_image,
    parse_address,
    read_reply,
    receive_stream,
)
from uffdsnap.testing.netns import NetLink, netns_link

P = 4096
MIB = 1 << 20
T = 1_700_000_000_123_456_789
FIELDS = {"object": {"source": "/dev/shm/vm", "kind": "shm", "dev": 25, "inode": 1234},
          "snapshot_time": T,
          "processes": [{"pid": 4242, "comm": "writer", "mode": "attach", "mappings": 1}],
          "stats": {"faults": 2}}
WAIT_S = 30  # every wait here is bounded by this (or less)
UFFDSNAP = [sys.executable, "-m", "uffdsnap"]


def build_image(path: str, *, size: int = 6 * MIB + 2 * P + 100, seed: int = 1,
                t_unix_ns: int = T) -> str:
    """An image made the way the coordinator makes one: one extent per 1 MiB data window
    (random pages, repetitive pages, zero pages), a window that was a hole, a partial end."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for page in range(size // P):
        kind = page % 7
        if kind < 3:
            data[page * P:(page + 1) * P] = rnd.randbytes(P)
        elif kind < 5:
            data[page * P:(page + 1) * P] = bytes([page % 251]) * P
    data[3 * MIB:4 * MIB] = bytes(MIB)  # a hole at T
    data[size - 100:] = rnd.randbytes(100)
    with ImageWriter(path, size, P) as w:
        for win in range(0, size, MIB):
            if win == 3 * MIB:
                continue
            chunk = bytes(data[win:min(size, win + MIB)])
            w.write(win, chunk)
            w.record_extent(win, len(chunk), extent_checksum(chunk))
        w.publish({**FIELDS, "snapshot_time": t_unix_ns})
    return path


def faulted_first(image: str, faults: list[int], *, compress: bool = True) -> list[bytes]:
    """The stream a sender makes of `image`: the pages at `faults` (offsets) first, as writers
    faulted on them, then the scan's windows in pieces around them, holes for the gaps."""
    m = load_manifest(manifest_path(image))
    blob = Path(image).read_bytes()
    enc = Encoder()
    out = [enc.header(m.object.size, m.object.page_size, m.snapshot_unix_ns,
                      {k: v for k, v in m.object.to_dict().items()
                       if k not in ("size", "page_size")})]
    for off in faults:
        out.append(enc.pages(off, blob[off:off + P], compress))
    pos = 0
    for e in m.extents:
        if e.offset > pos:
            out.append(enc.hole(pos, e.offset - pos))
        cuts = [e.offset] + [f for f in sorted(faults) if e.offset <= f < e.end] + [e.end]
        for a, b in pairwise(cuts):
            start = a + P if a in faults else a
            if start < b:
                out.append(enc.pages(start, blob[start:b], compress))
        pos = e.end
    if pos < m.object.size:
        out.append(enc.hole(pos, m.object.size - pos))
    out.append(enc.end({"processes": list(m.processes), "stats": m.stats}))
    return out


def assert_same_image(got: str, want: str) -> None:
    """The received image is the local one: bytes, manifest file, verify."""
    assert Path(got).read_bytes() == Path(want).read_bytes()
    assert Path(manifest_path(got)).read_bytes() == Path(manifest_path(want)).read_bytes()
    assert verify(got).ok
    assert os.stat(got).st_mode & 0o777 == 0o600


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))  # temporaries (dot files) included


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_image(str(tmp_path_factory.mktemp("src") / "local.img"))


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


# ---- in-process: the receiver over a socketpair ---------------------------------------------


async def receive_parts(parts: list[bytes], out: str, *, ending: str = "reply",
                        idle_timeout: float = WAIT_S) -> tuple[ReceiveResult, Reply | None]:
    """Send `parts` to receive_stream over a real Unix socketpair; then close the sending side
    and read the reply (`reply`), close (`close`: the sender died), or go quiet and wait for
    the reply (`stall`)."""
    a, b = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(a), trio.SocketStream(b)
    reply: list[Reply] = []
    results: list[ReceiveResult] = []

    async def send() -> None:
        try:
            for part in parts:
                await sender.send_all(part)
            if ending == "reply":
                await sender.send_eof()  # the stream is complete
        except trio.BrokenResourceError:
            pass  # refused mid-stream: the reply says why
        if ending == "close":
            await sender.aclose()
        else:  # (stalled: the receiver gives up, and says so)
            reply.append(await read_reply(sender, WAIT_S))
            await sender.aclose()  # as a sender does: the receiver stops lingering

    async def receive() -> None:
        results.append(await receive_stream(receiver, Output(out), peer="test",
                                            idle_timeout=idle_timeout, reply_to=receiver))

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    await receiver.aclose()
    await sender.aclose()
    return results[0], (reply[0] if reply else None)


async def test_faulted_pages_first_publish_what_a_local_snapshot_does(image: str,
                                                                      out_dir: Path) -> None:
    """Pages sent ahead of the scan, windows in pieces around them, compressed where it helps:
    the receiver publishes the local image's exact bytes and manifest, and says its sha256."""
    parts = faulted_first(image, [5 * P, 2 * MIB + 7 * P, 2 * MIB + 8 * P, 6 * MIB + P])
    out = str(out_dir / "got.img")
    result, reply = await receive_parts(parts, out)
    assert result.ok, result.error
    assert_same_image(out, image)
    assert reply == Reply(True, manifest_sha256=sha256_of(manifest_path(image)),
                          image="got.img")
    assert result.compressed_records > 0
    assert leftovers(out_dir) == ["got.img", "got.img.json"]


def _flip(parts: list[bytes], index: int, at: int) -> list[bytes]:
    bad = bytearray(parts[index])
    bad[at] ^= 0x40
    return parts[:index] + [bytes(bad)] + parts[index + 1:]


def _records(image: str, compress: bool = False) -> list[bytes]:
    return faulted_first(image, [5 * P, 6 * MIB], compress=compress)


def _other_digest(end: bytes) -> bytes:
    """END with a well-formed digest that is not the stream's."""
    at = end.index(b"xxh3_128:") + 9
    hexdigits = end[at:at + 32]
    return end[:at] + (b"0" * 32 if hexdigits != b"0" * 32 else b"1" * 32) + end[at + 32:]


def _pack(kind: int, payload: bytes, offset: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">2sBBIQ", b"US", kind, flags, len(payload), offset) + payload


Mangle = Callable[[list[bytes], str], list[bytes]]  # (a good stream's records, its image)
HOSTILE: list[tuple[str, Mangle, str]] = [
    ("bad magic", lambda r, _: _flip(r, 0, 0), "bad magic"),
    ("bad version", lambda r, _: [r[0].replace(b"\xa7version\x01", b"\xa7version\x02")] + r[1:],
     "unsupported stream version 2"),
    ("unaligned offset", lambda r, _: r[:2] + [_pack(2, bytes(P), 100)] + r[2:],
     "not a multiple of the page size"),
    ("outside the object", lambda r, _: r[:2] + [_pack(2, bytes(P), 1 << 40)] + r[2:],
     "past the object's end"),
    ("repeated page", lambda r, _: r[:2] + [r[1]] + r[2:], "already sent"),
    ("overlapping pages", lambda r, _: r[:2] + [_pack(2, bytes(2 * P), 4 * P)] + r[2:],
     "the page at 0x5000 was already sent"),
    ("oversized record", lambda r, _: r[:2] + [struct.pack(">2sBBIQ", b"US", 2, 0, 1 << 31, 0)],
     "over the limit"),
    ("garbage compressed",
     lambda r, _: r[:2] + [_pack(2, struct.pack(">I", P) + b"junk" * 9, 0, 1)] + r[2:],
     "not a zstd frame"),
    ("flipped data", lambda r, _: _flip(r, 3, len(r[3]) // 2), "checksum mismatch"),
    ("flipped compressed data", lambda _, image: _flip(faulted_first(image, [5 * P]), 2, 40),
     "corrupt zstd data"),
    ("end before all data", lambda r, _: r[:4] + r[-1:], "END before all the object was sent"),
    ("lost record", lambda r, _: r[:3] + r[4:], "END before all the object was sent"),
    ("end digest", lambda r, _: r[:-1] + [_other_digest(r[-1])], "checksum mismatch"),
    ("record after end", lambda r, _: r + [r[1]], "after the stream's last record"),
    ("sender abort", lambda r, _: r[:3] + [Encoder().abort("snapshot failed: disk gone")],
     "the sender aborted: snapshot failed: disk gone"),
]


@pytest.mark.parametrize("mangle,needle", [(m, n) for _, m, n in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
async def test_hostile_streams_publish_nothing(image: str, out_dir: Path,
                                               mangle: Mangle, needle: str) -> None:
    out = str(out_dir / "got.img")
    result, reply = await receive_parts(mangle(_records(image), image), out)
    assert not result.ok and needle in result.error, result.error
    assert reply is not None and not reply.ok and needle in reply.error
    assert leftovers(out_dir) == []


async def test_truncated_at_every_record_boundary_and_mid_record(image: str,
                                                                 out_dir: Path) -> None:
    """The sender's connection ends (EOF) after each record, inside each record's header and
    inside each payload: never published, never a file left."""
    blob = b"".join(_records(image))
    bounds = [0]
    for part in _records(image):
        bounds.append(bounds[-1] + len(part))
    cuts = sorted({c for a, b in pairwise(bounds) for c in (a, a + 7, (a + b) // 2)
                   if c < len(blob)})
    out = str(out_dir / "got.img")
    for cut in cuts:
        result, _ = await receive_parts([blob[:cut]], out, ending="close")
        assert not result.ok and "the stream ended" in result.error, (cut, result.error)
        assert leftovers(out_dir) == [], cut
    result, _ = await receive_parts([blob], out)  # and whole, it is published
    assert result.ok


async def test_a_stalled_sender_is_given_up(image: str, out_dir: Path) -> None:
    parts = _records(image)
    result, reply = await receive_parts(parts[:3] + [parts[3][:100]], str(out_dir / "x.img"),
                                        ending="stall", idle_timeout=0.5)
    assert not result.ok and "stalled: nothing arrived for 0.5 s" in result.error
    assert reply is not None and "stalled" in reply.error
    assert leftovers(out_dir) == []


# ---- the command, on this host --------------------------------------------------------------


def start_receiver(*args: str, link: NetLink | None = None) -> tuple[subprocess.Popen[str], str]:
    """`uffdsnap receive ARGS` (inside `link`'s receiver namespace if given); returns it once it
    listens, with the address it listens on."""
    argv = [*UFFDSNAP, "receive", *args]
    kw: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
                          "stdin": subprocess.DEVNULL}
    proc = link.popen(argv, **kw) if link else subprocess.Popen(argv, **kw)
    line = wait_line(proc.stdout, "listening", timeout=WAIT_S)
    shown = json.loads(line)["listening"] if line.startswith("{") else line.split()[-1]
    return proc, shown


async def send_to(address: tuple[str, int] | str, parts: list[bytes],
                  sock: socket.socket | None = None, stall: bool = False) -> Reply:
    """Connect (TCP or Unix), send, close the sending side (unless `stall`: go quiet), read
    the one-line reply."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    raw = trio.socket.from_stdlib_socket(sock) if sock else trio.socket.socket(family)
    with trio.fail_after(WAIT_S):
        await raw.connect(address)
        stream = trio.SocketStream(raw)
        try:
            for part in parts:
                await stream.send_all(part)
            if not stall:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # refused mid-stream: the reply says why
        reply = await read_reply(stream, WAIT_S)
        await stream.aclose()
    return reply


@pytest.mark.parametrize("how", ["tcp", "unix", "stdin", "file"])
async def test_the_command_over_each_transport(how: str, image: str, tmp_path: Path,
                                               out_dir: Path) -> None:
    out = str(out_dir / "got.img")
    stream = b"".join(encode_image(image, compress=True))
    if how in ("tcp", "unix"):
        listen = "127.0.0.1:0" if how == "tcp" else f"unix:{tmp_path}/r.sock"
        proc, shown = start_receiver("--listen", listen, "-o", out, "--json")
        where = parse_address(shown)
        address = (where.host, where.port) if how == "tcp" else where.path
        reply = await send_to(address, [stream])
        stdout, stderr = finish(proc, WAIT_S)
        assert reply.ok and reply.manifest_sha256 == sha256_of(manifest_path(image))
        assert not os.path.exists(f"{tmp_path}/r.sock")
    else:
        src = tmp_path / "s.stream"
        src.write_bytes(stream)
        argv = [*UFFDSNAP, "receive", "-i", "-" if how == "stdin" else str(src), "-o", out,
                "--json"]
        with open(src, "rb") as f:
            done = subprocess.run(argv, stdin=f if how == "stdin" else subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=WAIT_S)
        stdout, stderr = done.stdout, done.stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["ok"] and result["image"] == out, stderr
    assert result["manifest_sha256"] == sha256_of(manifest_path(image))
    assert stderr == ""
    assert_same_image(out, image)
    info = subprocess.run([*UFFDSNAP, "info", out, "--json"], capture_output=True, text=True,
                          timeout=WAIT_S)
    assert json.loads(info.stdout)["extents"] == len(load_manifest(manifest_path(image)).extents)


def test_a_bad_stream_is_one_line_and_exit_1(image: str, out_dir: Path, tmp_path: Path) -> None:
    parts = _records(image)
    src = tmp_path / "bad.stream"
    src.write_bytes(b"".join(parts[:-1] + [parts[1]]))
    for extra in ([], ["--json"]):
        done = subprocess.run([*UFFDSNAP, "receive", "-i", str(src), "-o",
                               str(out_dir / "x.img"), *extra],
                              capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("uffdsnap: error: stream from ")
        assert "already sent" in lines[0] and lines[0].endswith("nothing published")
        if extra:
            assert json.loads(done.stdout) == {"ok": False, "error": lines[0][17:]}
        assert leftovers(out_dir) == []


@pytest.mark.parametrize("args,needle", [
    (["-o", "{out}/x.img"], "one of the arguments"),
    (["--listen", "127.0.0.1:0"], "required"),
    (["--listen", "127.0.0.1:0", "-i", "-", "-o", "{out}/x.img"], "not allowed with"),
    (["-i", "-", "--keep-listening", "-o", "{out}"], "needs --listen"),
    (["--listen", "127.0.0.1:0", "--keep-listening", "-o", "{out}/nodir"], "existing directory"),
    (["--listen", "127.0.0.1:0", "--keep-listening", "--force", "-o", "{out}"], "--force"),
    (["--listen", "127.0.0.1:0", "-o", "{out}/no/such/x.img"], "no such directory"),
    (["--listen", "127.0.0.1:0", "-o", "{out}"], "is a directory"),
    (["--listen", "127.0.0.1:0", "-o", "{out}/x.img", "--idle-timeout", "0"], "positive"),
    (["--listen", "127.0.0.1:0", "-o", "{out}/x.img", "--idle-timeout", "nan"], "positive"),
    (["--listen", "localhost", "-o", "{out}/x.img"], "not an address"),
    (["--listen", "udp://h:1", "-o", "{out}/x.img"], "unknown scheme"),
    (["--listen", "-", "-o", "{out}/x.img"], "use -i -"),
    (["--listen", "198.18.255.1:7000", "-o", "{out}/x.img"], "cannot listen"),
    (["--listen", "unix:{out}/exists", "-o", "{out}/x.img"], "exists"),
    (["-i", "{out}/none.stream", "-o", "{out}/x.img"], "cannot read"),
    (["-i", "{out}", "-o", "{out}/x.img"], "is a directory"),
    (["-i", "-", "-o", "{out}/exists"], "use --force"),
])
def test_bad_arguments(args: list[str], needle: str, out_dir: Path) -> None:
    (out_dir / "exists").write_bytes(b"precious")
    done = subprocess.run([*UFFDSNAP, "receive", *[a.format(out=out_dir) for a in args]],
                          capture_output=True, text=True, timeout=WAIT_S,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("uffdsnap: error: ") and needle in lines[0], lines[0]
    assert leftovers(out_dir) == ["exists"]
    assert (out_dir / "exists").read_bytes() == b"precious"


async def test_keep_listening_serves_stream_after_stream(image: str, tmp_path: Path,
                                                         out_dir: Path) -> None:
    """Good, hostile, stalled, good with the same T, good over a name taken by someone else:
    each good one published under a name of its own, nothing replaced, the others discarded,
    and it goes on listening until SIGTERM (exit 0, its socket removed)."""
    other = build_image(str(tmp_path / "other.img"), seed=2, t_unix_ns=T + 1)
    foreign = out_dir / "snapshot-20231114T221320.123456790Z.img"  # the name `other` would get
    foreign.write_bytes(b"not ours")
    sock = f"{tmp_path}/r.sock"
    proc, _ = start_receiver("--listen", f"unix:{sock}", "--keep-listening", "-o",
                             str(out_dir), "--idle-timeout", "1", "--json")
    good = list(encode_image(image))
    replies = [await send_to(sock, good)]
    replies.append(await send_to(sock, good[:-1] + [good[1]]))
    replies.append(await send_to(sock, good[:2], stall=True))  # given up after 1 s
    replies.append(await send_to(sock, good))
    replies.append(await send_to(sock, list(encode_image(other))))
    results = [json.loads(wait_line(proc.stdout, '"ok"', timeout=WAIT_S)) for _ in replies]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc, WAIT_S)
    assert proc.returncode == 0, stderr
    assert [r.ok for r in replies] == [True, False, False, True, True]
    assert [r["ok"] for r in results] == [True, False, False, True, True]
    assert "already sent" in replies[1].error and "stalled" in replies[2].error
    names = [os.path.basename(r["image"]) for r in results if r["ok"]]
    assert names == ["snapshot-20231114T221320.123456789Z.img",
                     "snapshot-20231114T221320.123456789Z-2.img",
                     "snapshot-20231114T221320.123456790Z-2.img"]
    for name in names[:2]:
        assert_same_image(str(out_dir / name), image)
    assert_same_image(str(out_dir / names[2]), other)
    assert foreign.read_bytes() == b"not ours"
    assert leftovers(out_dir) == sorted([foreign.name] + names + [n + ".json" for n in names])
    assert not os.path.exists(sock)


# ---- over a real, shaped link between network namespaces (root) -----------------------------


@pytest.fixture(scope="module")
def live_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A snapshot of four live writers (`uffdsnap snapshot --shm`), the local reference."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = f"/dev/shm/uffdsnap-test-stream-{os.getpid()}"
    out = str(tmp_path_factory.mktemp("live") / "local.img")
    try:
        make_workload(path, 4, data_pages=2048)
        writers = start_writers(path, native=4)
        try:
            done = subprocess.run([*UFFDSNAP, "snapshot", "--shm", path, "-o", out],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
        finally:
            stop_writers(path, writers)
    finally:
        os.unlink(path)
    yield out


@needs_root
async def test_live_snapshot_streamed_over_a_shaped_link(live_image: str,
                                                         out_dir: Path) -> None:
    """A real snapshot of running writers, streamed from the sender's namespace to the
    receiver's over a 100 Mbit/s veth link, pages faulted first and compressed: the receiver
    publishes the local image and manifest byte for byte, and the checker still proves it one
    instant."""
    m = load_manifest(manifest_path(live_image))
    faults = [e.offset + P for e in m.extents[1::3] if e.length > 2 * P][:20]
    parts = faulted_first(live_image, faults)
    out = str(out_dir / "got.img")
    with netns_link(rate_bits=100_000_000) as link:
        proc, _ = start_receiver("--listen", f"{link.receiver_addr}:7000", "-o", out,
                                 link=link)
        reply = await send_to((link.receiver_addr, 7000), parts, sock=link.socket())
        stdout, stderr = finish(proc, WAIT_S)
    assert proc.returncode == 0, stderr
    assert reply == Reply(True, manifest_sha256=sha256_of(manifest_path(live_image)),
                          image="got.img")
    assert "receiving from 198.18.0.1:" in stdout and "received " + out in stdout
    assert_same_image(out, live_image)
    assert wl.check_file(out).ok
    restored = f"/dev/shm/uffdsnap-test-restored-{os.getpid()}"
    try:
        subprocess.run([*UFFDSNAP, "restore", out, "--to", restored], check=True,
                       capture_output=True, timeout=WAIT_S)
        assert Path(restored).read_bytes() == Path(live_image).read_bytes()
    finally:
        os.unlink(restored)


@needs_root
@pytest.mark.parametrize("failure", ["sender killed", "link stalled", "reset"])
async def test_link_failures_publish_nothing(failure: str, image: str, out_dir: Path,
                                             tmp_path: Path) -> None:
    """Mid-stream on the veth link: the sending process is SIGKILLed, the link goes down (the
    receiver's idle timeout fires), or the sender resets the connection."""
    parts = _records(image)
    src = tmp_path / "half.stream"
    src.write_bytes(b"".join(parts[:4]))
    with netns_link(rate_bits=50_000_000) as link:
        proc, _ = start_receiver("--listen", f"{link.receiver_addr}:7000", "-o",
                                 str(out_dir / "x.img"), "--idle-timeout", "1", link=link)
        if failure == "sender killed":
            sender = link.popen([sys.executable, "-c", SEND_AND_HANG, link.receiver_addr, "7000",
                                 str(src)], side="sender", stdout=subprocess.PIPE, text=True)
            wait_line(sender.stdout, "sent", timeout=WAIT_S)
            wait_line(proc.stdout, "receiving from", timeout=WAIT_S)
            sender.kill()
            sender.wait(timeout=WAIT_S)
        else:
            sock = link.socket()
            with trio.fail_after(WAIT_S):
                raw = trio.socket.from_stdlib_socket(sock)
                await raw.connect((link.receiver_addr, 7000))
                await trio.SocketStream(raw).send_all(src.read_bytes())
            wait_line(proc.stdout, "receiving from", timeout=WAIT_S)
            if failure == "link stalled":
                link.set_up(False)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        _, stderr = finish(proc, WAIT_S)
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("nothing published"), stderr
    want = {"sender killed": "ended", "link stalled": "stalled: nothing arrived for 1 s",
            "reset": "connection lost"}[failure]
    assert want in lines[0], lines[0]
    assert leftovers(out_dir) == []


SEND_AND_HANG = """\
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(open(sys.argv[3], "rb").read())
print("sent", flush=True)
time.sleep(60)
"""


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
async def test_receiver_killed_mid_stream_leaves_nothing(signum: int, image: str,
                                                         out_dir: Path) -> None:
    """While a stream is received the image has no name: killed even by SIGKILL, the receiver
    leaves no file. (Shown mid-stream: the receiver holds the unnamed image open.)"""
    parts = _records(image)
    with netns_link(rate_bits=50_000_000) as link:
        proc, _ = start_receiver("--listen", f"{link.receiver_addr}:7000", "-o",
                                 str(out_dir / "x.img"), link=link)
        sock = link.socket()
        with trio.fail_after(WAIT_S):
            raw = trio.socket.from_stdlib_socket(sock)
            await raw.connect((link.receiver_addr, 7000))
            await trio.SocketStream(raw).send_all(b"".join(parts[:4]))
        wait_line(proc.stdout, "receiving from", timeout=WAIT_S)
        fd_dir = f"/proc/{proc.pid}/fd"
        fds = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
        assert any(f.startswith(f"{out_dir}/#") and f.endswith("(deleted)") for f in fds), fds
        assert leftovers(out_dir) == []
        proc.send_signal(signum)
        _, stderr = finish(proc, WAIT_S)
        raw.close()
    assert proc.returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 1)
    if signum == signal.SIGTERM:
        assert stderr.strip() == "uffdsnap: error: stopped by SIGTERM; nothing published"
    assert leftovers(out_dir) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for one test, unmounted after."""
    import ctypes

    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    where = tmp_path / "small"
    where.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", os.fsencode(where), b"tmpfs", 0, b"size=2m") != 0:
        pytest.fail(f"mount tmpfs: {os.strerror(ctypes.get_errno())}")
    try:
        yield where
    finally:
        if libc.umount2(os.fsencode(where), 0) != 0:
            libc.umount2(os.fsencode(where), 2)  # MNT_DETACH


@needs_root
async def test_a_full_disk_discards_and_the_next_stream_is_served(image: str, tmp_path: Path,
                                                                  small_disk: Path) -> None:
    small = build_image(str(tmp_path / "small.img"), size=64 * P + 10, seed=3)
    with netns_link(rate_bits=200_000_000) as link:  # disk full, then the next stream served
        proc, _ = start_receiver("--listen", f"{link.receiver_addr}:7000", "--keep-listening",
                                 "-o", str(small_disk), link=link)
        full = await send_to((link.receiver_addr, 7000), list(encode_image(image)),
                             sock=link.socket())
        assert not full.ok and "No space left on device" in full.error
        assert leftovers(small_disk) == []
        fine = await send_to((link.receiver_addr, 7000), list(encode_image(small)),
                             sock=link.socket())
        assert fine.ok
        wait_line(proc.stdout, "received", timeout=WAIT_S)
        proc.send_signal(signal.SIGTERM)
        _, stderr = finish(proc, WAIT_S)
    assert proc.returncode == 0
    assert "No space left on device" in stderr
    names = leftovers(small_disk)
    assert len(names) == 2 and names[1] == names[0] + ".json"
    assert_same_image(str(small_disk / names[0]), small)
