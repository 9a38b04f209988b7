"""The migration stream's sender, for real: `uffdsnap snapshot --to` of live writers to a `uffdsnap
receive` in another network namespace over a veth link (uffdsnap/testing/netns.py, optionally
rate-limited with tbf), over Unix sockets and a pipe, from `snapshot --shm` and from a
long-running coordinator. The consistency checker proves every received image is one instant;
every way the stream can fail (receiver killed, link stalled, receiver's disk full, staging
overflow, sender killed) fails with one line, releases the writers, and publishes nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import make_workload, needs_root, running_coordinator, start_writers, stop_writers
from procutil import assert_writers_resume, finish, wait_line
from uffdsnap import workload as wl
from uffdsnap.image import load_manifest, manifest_path, verify
from uffdsnap.stream import StreamOptions
from uffdsnap.testing.netns import NetLink, netns_link

pytestmark = needs_root

WAIT_S = 60  # every wait here is bounded by this (or less)
FAIL_S = 15  # "within a few seconds": a failure is reported well within this
UFFDSNAP = [sys.executable, "-m", "uffdsnap"]
PORT = 7000
MBIT = 1_000_000


# ---- helpers ------------------------------------------------------------------------------


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


LISTENING: dict[int, str] = {}  # receiver pid -> the address it listens on


def receiver(listen: str, out: str, *args: str, link: NetLink | None = None,
             as_json: bool = True) -> subprocess.Popen[str]:
    """`uffdsnap receive --listen LISTEN -o OUT [--json] ARGS`, once it listens (the address,
    with the port the kernel chose, in LISTENING). Without --json it says `receiving from`
    when a stream's HEADER arrives, i.e. once the snapshot has passed T."""
    argv = [*UFFDSNAP, "receive", "--listen", listen, "-o", out, *args]
    argv += ["--json"] if as_json else []
    kw: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = link.popen(argv, **kw) if link else subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, **kw)
    line = wait_line(proc.stdout, "listening", timeout=WAIT_S)
    LISTENING[proc.pid] = json.loads(line)["listening"] if as_json else line.split()[-1]
    return proc


def sender(shm_path: str, to: str, *args: str, link: NetLink | None = None,
           **kw: Any) -> subprocess.Popen[str]:
    """`uffdsnap snapshot --shm SHM --to TO --json ARGS` (in the sender's namespace)."""
    argv = [*UFFDSNAP, "snapshot", "--shm", shm_path, "--to", to, "--json", *args]
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    if link:
        return link.popen(argv, side="sender", **kw)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)


def result_of(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("uffdsnap: error: "), lines[0]
    return lines[0]


def check_received(image: str, before: list[int], after: list[int]) -> None:
    """The received image is one instant of the writers, between `before` and `after`."""
    result = wl.check_file(image)
    assert result.ok, result.summary()
    assert verify(image).ok
    for i, seq in enumerate(result.seqs):
        assert before[i] <= seq < after[i], (i, before[i], seq, after[i])


def published(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))  # temporaries (dot files) included


@pytest.fixture
def workload(shm_path: str) -> Iterator[list[wl.WriterProcess]]:
    """4 native writers on a 16 MiB object, writing throughout."""
    make_workload(shm_path, 4, data_pages=1024)
    writers = start_writers(shm_path, native=4)
    yield writers
    stop_writers(shm_path, writers)


# ---- it works ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,extra", [("agents", []), ("delegated", ["--compress"])])
def test_live_writers_to_another_namespace(mode: str, extra: list[str], shm_path: str,
                                           workload: list[wl.WriterProcess],
                                           out_dir: Path) -> None:
    """Writers write throughout a snapshot streamed over a 200 Mbit/s veth link to a receiver
    in another network namespace: the received image is one instant, verified, and the
    sender's exit 0 comes with the receiver's acknowledgement of that manifest."""
    out = str(out_dir / "got.img")
    with netns_link(rate_bits=200 * MBIT) as link:
        recv = receiver(f"{link.receiver_addr}:{PORT}", out, link=link)
        before = wl.read_live_seqs(shm_path)
        snap = sender(shm_path, f"tcp://{link.receiver_addr}:{PORT}", "--mode", mode,
                      *extra, link=link)
        stdout, stderr = finish(snap, WAIT_S)
        after = wl.read_live_seqs(shm_path)
        assert snap.returncode == 0, stderr
        got, rerr = finish(recv, WAIT_S)
        assert recv.returncode == 0, rerr
    summary, received = result_of(stdout), result_of(got)
    assert received["ok"] and received["image"] == out
    check_received(out, before, after)
    stream = summary["stream"]
    assert stream["manifest_sha256"] == received["manifest_sha256"]
    assert stream["to"] == f"tcp://{link.receiver_addr}:{PORT}"
    manifest = load_manifest(manifest_path(out))
    assert {p["pid"] for p in manifest.processes} == {w.pid for w in workload}
    assert manifest.object.source == shm_path and manifest.object.size == summary["object_size"]
    assert summary["faults"] > 0  # writers did fault during the stream and were served
    # faulted pages waiting (--staging) and sent but not punched yet (half as many), one
    # batch being sent, one scan window
    assert 0 < stream["staging_peak_bytes"] <= stream["staging_bytes"] * 3 // 2 + (5 << 20)
    if "--compress" in extra:  # the workload's pages are one word repeated
        assert stream["wire_bytes"] * 4 < stream["data_bytes"], stream
    else:
        assert stream["wire_bytes"] >= stream["data_bytes"]


async def test_from_a_long_running_coordinator_to_a_unix_socket(
        shm_path: str, workload: list[wl.WriterProcess], tmp_path: Path,
        out_dir: Path) -> None:
    """`snapshot --coordinator SOCK --to unix:PATH`: the coordinator streams (the destination
    travels in the request), twice in a row, each image one instant; `--to -` is refused
    there in one line."""
    sock = str(tmp_path / "r.sock")
    recv = receiver(f"unix:{sock}", str(out_dir), "--keep-listening")
    async with running_coordinator(shm_path, tmp_path) as (_, coord_sock):
        for _ in range(2):
            before = wl.read_live_seqs(shm_path)
            done = await trio.run_process(
                [*UFFDSNAP, "snapshot", "--coordinator", coord_sock, "--to", f"unix:{sock}",
                 "--compress", "--json"], capture_stdout=True, capture_stderr=True,
                check=False)
            after = wl.read_live_seqs(shm_path)
            assert done.returncode == 0, done.stderr.decode()
            summary = result_of(done.stdout.decode())
            received = json.loads(wait_line(recv.stdout, '"ok"', timeout=WAIT_S))
            assert received["ok"], received
            assert summary["stream_manifest_sha256"] == received["manifest_sha256"]
            check_received(received["image"], before, after)
        refused = await trio.run_process(
            [*UFFDSNAP, "snapshot", "--coordinator", coord_sock, "--to", "-"],
            capture_stdout=True, capture_stderr=True, check=False)
        assert refused.returncode == 2
        assert "not with --coordinator" in one_error_line(refused.stderr.decode())
    recv.send_signal(signal.SIGTERM)
    finish(recv, WAIT_S)
    assert len([n for n in published(out_dir) if n.endswith(".img")]) == 2


def test_through_a_pipe(shm_path: str, workload: list[wl.WriterProcess],
                        out_dir: Path) -> None:
    """`snapshot --to - | receive -i -` (the ssh form): the summary goes to stderr, the
    stream alone to stdout, and the image is one instant."""
    out = str(out_dir / "piped.img")
    before = wl.read_live_seqs(shm_path)
    snap = subprocess.Popen([*UFFDSNAP, "snapshot", "--shm", shm_path, "--to", "-", "--json"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    recv = subprocess.Popen([*UFFDSNAP, "receive", "-i", "-", "-o", out, "--json"],
                            stdin=snap.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert snap.stdout is not None
    snap.stdout.close()  # the receiver holds the pipe's only reading end
    _, serr = snap.communicate(timeout=WAIT_S)
    after = wl.read_live_seqs(shm_path)
    rout, rerr = recv.communicate(timeout=WAIT_S)
    assert snap.returncode == 0, serr.decode()
    assert recv.returncode == 0, rerr
    summary = json.loads(serr.decode().strip().splitlines()[-1])
    assert summary["stream"]["to"] == "-" and summary["stream"]["manifest_sha256"] == ""
    assert result_of(rout)["ok"]
    check_received(out, before, after)


def test_max_rate_is_honoured(shm_path: str, out_dir: Path) -> None:
    """--max-rate 2M on loopback (which could carry far more): the stream takes at least as
    long as its bytes need at that rate (a lower bound the token bucket guarantees), and the
    image is complete."""
    make_workload(shm_path, 2, data_pages=1024)  # ~4 MiB, no writers: nothing faults
    out = str(out_dir / "paced.img")
    recv = receiver("127.0.0.1:0", out)
    rate = 2 << 20
    snap = sender(shm_path, LISTENING[recv.pid], "--max-rate", "2M")
    stdout, stderr = finish(snap, WAIT_S)
    assert snap.returncode == 0, stderr
    finish(recv, WAIT_S)
    stream = result_of(stdout)["stream"]
    burst = max(64 << 10, rate // 20)
    assert stream["seconds"] >= (stream["wire_bytes"] - burst) / rate
    assert stream["wire_bytes_per_s"] <= rate * 1.1
    assert verify(out).ok and wl.check_file(out).ok


# ---- it fails cleanly ---------------------------------------------------------------------


def _failed_stream(snap: subprocess.Popen[str], started: float) -> str:
    """The sender failed with one line, within a few seconds; its error line."""
    stdout, stderr = finish(snap, WAIT_S)
    assert time.monotonic() - started < FAIL_S, f"took {time.monotonic() - started:.1f} s"
    assert snap.returncode == 1, (stdout, stderr)
    return one_error_line(stderr)


def test_receiver_killed_mid_stream(shm_path: str, workload: list[wl.WriterProcess],
                                    out_dir: Path) -> None:
    """The receiver is SIGKILLed while a stream crosses a 20 Mbit/s link: the sender fails
    in one line within seconds, every writer resumes (write protection removed), nothing is
    published and no temporary is left."""
    with netns_link(rate_bits=20 * MBIT) as link:
        recv = receiver(f"{link.receiver_addr}:{PORT}", str(out_dir / "x.img"), link=link,
                        as_json=False)
        snap = sender(shm_path, f"{link.receiver_addr}:{PORT}", link=link)
        wait_line(recv.stdout, "receiving from", timeout=WAIT_S)  # mid-stream: T has passed
        started = time.monotonic()
        recv.kill()
        line = _failed_stream(snap, started)
        assert f"streaming to tcp://{link.receiver_addr}:{PORT}" in line, line
        assert_writers_resume(shm_path, workload)
    assert published(out_dir) == []


def test_link_stalled(shm_path: str, workload: list[wl.WriterProcess], out_dir: Path) -> None:
    """The link goes down mid-stream: after --stream-timeout the sender fails in one line
    naming the option, the writers resume, and the receiver, hearing nothing, gives up
    (--idle-timeout) and publishes nothing."""
    with netns_link(rate_bits=20 * MBIT) as link:
        recv = receiver(f"{link.receiver_addr}:{PORT}", str(out_dir / "x.img"),
                        "--idle-timeout", "3", link=link, as_json=False)
        snap = sender(shm_path, f"{link.receiver_addr}:{PORT}", "--stream-timeout", "2",
                      link=link)
        wait_line(recv.stdout, "receiving from", timeout=WAIT_S)
        started = time.monotonic()
        link.set_up(False)
        line = _failed_stream(snap, started)
        assert "stalled" in line and "--stream-timeout" in line, line
        assert_writers_resume(shm_path, workload)
        rout, rerr = finish(recv, WAIT_S)
        assert recv.returncode == 1 and "stalled" in rerr, rerr
    assert published(out_dir) == []


def test_receivers_disk_full(shm_path: str, workload: list[wl.WriterProcess],
                             tmp_path: Path) -> None:
    """The receiver's file system fills up (a 2 MiB tmpfs for a 16 MiB object): the sender
    fails in one line with the receiver's reason, the writers resume, and the receiver
    publishes nothing and leaves nothing."""
    small = tmp_path / "small"
    small.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(b"tmpfs", os.fsencode(small), b"tmpfs", 0, b"size=2m") == 0, \
        os.strerror(ctypes.get_errno())
    try:
        sock = str(tmp_path / "r.sock")
        recv = receiver(f"unix:{sock}", str(small / "x.img"))
        started = time.monotonic()
        snap = sender(shm_path, f"unix:{sock}")
        line = _failed_stream(snap, started)
        assert "refused the stream" in line and "No space left" in line, line
        assert_writers_resume(shm_path, workload)
        finish(recv, WAIT_S)
        assert recv.returncode == 1
        assert published(small) == []
    finally:
        libc.umount2(os.fsencode(small), 2)


def test_sender_killed_mid_stream(shm_path: str, workload: list[wl.WriterProcess],
                                  out_dir: Path) -> None:
    """The sender is SIGKILLed mid-stream: its writers are released (its agents go with it),
    the receiver (--keep-listening) discards the stream and serves the next one."""
    with netns_link(rate_bits=20 * MBIT) as link:
        recv = receiver(f"{link.receiver_addr}:{PORT}", str(out_dir), "--keep-listening",
                        "--idle-timeout", "5", link=link, as_json=False)
        snap = sender(shm_path, f"{link.receiver_addr}:{PORT}", link=link)
        wait_line(recv.stdout, "receiving from", timeout=WAIT_S)
        snap.kill()
        snap.wait(timeout=WAIT_S)
        warning = wait_line(recv.stderr, "nothing published", timeout=WAIT_S)
        assert "stream from" in warning, warning
        assert_writers_resume(shm_path, workload)
        assert published(out_dir) == []
        link.set_rate(None)
        before = wl.read_live_seqs(shm_path)
        snap = sender(shm_path, f"{link.receiver_addr}:{PORT}", "--compress", link=link)
        stdout, stderr = finish(snap, WAIT_S)
        after = wl.read_live_seqs(shm_path)
        assert snap.returncode == 0, stderr
        line = wait_line(recv.stdout, "received ", timeout=WAIT_S)
        check_received(line.split()[1].rstrip(":"), before, after)
        recv.send_signal(signal.SIGTERM)
        finish(recv, WAIT_S)


def test_staging_overflow_fails_and_names_the_option(shm_path: str,
                                                     workload: list[wl.WriterProcess],
                                                     out_dir: Path) -> None:
    """Writers fault faster than a 1 MiB/s stream takes their pages, and --staging 256K
    holds only 64 of them: the snapshot fails in one line naming --staging, the writers
    resume, the receiver gets ABORT with that reason and publishes nothing."""
    sock = str(out_dir.parent / "r.sock")
    recv = receiver(f"unix:{sock}", str(out_dir / "x.img"))
    started = time.monotonic()
    snap = sender(shm_path, f"unix:{sock}", "--staging", "256K", "--max-rate", "1M")
    line = _failed_stream(snap, started)
    assert "staging full" in line and "--staging" in line, line
    assert_writers_resume(shm_path, workload)
    rout, rerr = finish(recv, WAIT_S)
    assert recv.returncode == 1
    assert "the sender aborted: staging full" in result_of(rout)["error"], rout
    assert published(out_dir) == []


async def test_a_checker_that_can_fail(shm_path: str, tmp_path: Path, out_dir: Path) -> None:
    """Negative control: a coordinator that streams without protecting anything (a slow scan
    while writers run) delivers images the checker rejects, through the same receiver: the
    consistency checks above have teeth on streamed images."""
    make_workload(shm_path, 6, data_pages=256)
    sock = str(tmp_path / "r.sock")
    recv = receiver(f"unix:{sock}", str(out_dir), "--keep-listening")
    hooks = {"no_protect": True, "scan_delay_s": 0.002}
    async with running_coordinator(shm_path, tmp_path, hooks=hooks) as (coordinator, csock):
        writers = await trio.to_thread.run_sync(
            lambda: start_writers(shm_path, native=4, enlisted=2, enlist=csock))
        try:
            caught = []
            for _ in range(10):
                await coordinator.snapshot("", stream=StreamOptions(f"unix:{sock}"))
                received = json.loads(await trio.to_thread.run_sync(
                    wait_line, recv.stdout, '"ok"', WAIT_S))
                assert received["ok"], received
                result = wl.check_file(received["image"])
                if not result.ok:
                    caught.append(result.kinds)
                    break
            assert caught, "an unprotected streamed copy passed the checker 10 times"
        finally:
            await trio.to_thread.run_sync(stop_writers, shm_path, writers)
    recv.send_signal(signal.SIGTERM)
    finish(recv, WAIT_S)


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--to", "udp://h:1"], "unknown scheme"),
    (["--to", "localhost"], "not an address"),
    (["--to", "127.0.0.1:0"], "port 0"),
    (["--to", "unix:"], "needs a socket path"),
    (["--to", "127.0.0.1:1", "-o", "{out}/x.img"], "not allowed with"),
    (["-o", "{out}/x.img", "--compress"], "use it with --to"),
    (["-o", "{out}/x.img", "--max-rate", "1M"], "use it with --to"),
    (["--to", "127.0.0.1:1", "--max-rate", "fast"], "not a size"),
    (["--to", "127.0.0.1:1", "--staging", "0"], "positive"),
    (["--to", "127.0.0.1:1", "--stream-timeout", "0"], "positive"),
    (["--to", "127.0.0.1:1", "--stream-timeout", "nan"], "positive"),
    (["--to", "127.0.0.1:1", "--force"], "--force applies to -o"),
    (["--to", "127.0.0.1:1"], "cannot reach a receiver"),
    (["--to", "unix:{out}/nobody.sock"], "cannot reach a receiver"),
])
def test_bad_destinations(args: list[str], needle: str, shm_path: str, out_dir: Path) -> None:
    """One line, exit 2, nothing written; an unreachable receiver is found before anything
    is protected."""
    make_workload(shm_path, 1, data_pages=16)
    done = subprocess.run([*UFFDSNAP, "snapshot", "--shm", shm_path,
                           *[a.format(out=out_dir) for a in args]],
                          capture_output=True, text=True, timeout=WAIT_S,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert needle in one_error_line(done.stderr)
    assert published(out_dir) == []
