"""Streaming (`snapshot --to`, issue 12's targets), over a real link: two network namespaces made
here, joined by a veth pair with addresses of 198.18.0.0/30 (RFC 2544, never routed) assigned
inside them only, shaped to 100 Mbit/s each way with tbf, all removed afterwards.

- stream throughput (T → the receiver's `ok`, the object's bytes over the seconds) vs a plain
  TCP copy of the same bytes over the same link (pread 1 MiB at a time → socket → a file on
  the receiving side, fsynced, then a one-line answer), idle mappers: target ≥ 0.9×;
- fault service p50 of paced writers during a snapshot streamed over that link vs during a
  snapshot to a local file (`-o`), same writers, same run: target ≤ 1.5×;
- with --compress, on a compressible object (each 4 KiB page: 512 random bytes, then zeros),
  the object's bytes over the stream's seconds vs the link's rate: target ≥ 2×.

Needs root and pyroute2 (a test dependency); without them the rows say why they are missing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uffdsnap.bench import procs as P
from uffdsnap.bench.config import BenchConfig, MiB, size_label

if TYPE_CHECKING:
    from uffdsnap.testing.netns import NetLink

LINK_BITS = 100_000_000
PORT = 7000
READY_TIMEOUT_S = 60.0
FAULT_P50_TARGET, THROUGHPUT_TARGET, COMPRESS_TARGET = 1.5, 0.9, 2.0

# The plain copy's two ends: the object's bytes through one TCP connection into a file.
_SINK = """\
import os, socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
c, _ = s.accept()
fd = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
while data := c.recv(1 << 20):
    os.write(fd, data)
os.fsync(fd)
os.close(fd)
c.sendall(b"ok\\n")
"""
_SOURCE = """\
import os, socket, sys, time
fd = os.open(sys.argv[3], os.O_RDONLY)
size = os.fstat(fd).st_size
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
t = time.monotonic()
for off in range(0, size, 1 << 20):
    c.sendall(os.pread(fd, 1 << 20, off))
c.shutdown(socket.SHUT_WR)
assert c.recv(16) == b"ok\\n"
print(size, time.monotonic() - t, flush=True)
"""


def run_streaming(cfg: BenchConfig, dest_dir: str,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """The streaming scenarios' numbers (or why they could not be measured)."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)"}
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return {"skipped": "needs pyroute2 (pip install pyroute2) to build the link"}
    size = min(cfg.base_size, 64 * MiB if cfg.quick else 256 * MiB)
    ws = P.Workspace(dest_dir)
    out: dict[str, Any] = {"size": size, "link_bits_per_s": LINK_BITS}
    try:
        from uffdsnap.testing.netns import netns_link  # (pyroute2: imported when used)

        with netns_link(LINK_BITS) as ns:
            out["throughput"] = _throughput(ws, ns, size, dest_dir, say)
            out["fault_service"] = [_fault_service(ws, ns, size, mode, cfg, say)
                                    for mode in cfg.modes]
            out["compressed"] = _compressed(ws, ns, size, say)
    except (P.BenchError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        ws.close()
    return out


def _receiver(ws: P.Workspace, ns: NetLink, image: str) -> Any:
    proc = ws.start(ns.command([sys.executable, "-m", "uffdsnap", "receive", "--listen",
                                f"{ns.receiver_addr}:{PORT}", "-o", image, "--force", "--json"],
                               side="receiver"))
    P.expect(proc, '{"listening"', "receiver", READY_TIMEOUT_S)
    return proc


def _stream(ws: P.Workspace, ns: NetLink, obj_path: str, dest_dir: str,
            *args: str) -> dict[str, Any]:
    """One `snapshot --to` over the link into a receiver; its summary."""
    image = ws.temp_path("stream.img")
    recv = _receiver(ws, ns, image)
    try:
        done = subprocess.run(ns.command([sys.executable, "-m", "uffdsnap", "snapshot", "--shm",
                                          obj_path, "--to", f"{ns.receiver_addr}:{PORT}", "--json",
                                          *args], side="sender"),
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise P.BenchError(f"snapshot --to: {done.stderr.strip()[-300:]}")
        return dict(json.loads(done.stdout))
    finally:
        ws.end(recv)
        ws.remove(image)


def _local(ws: P.Workspace, obj_path: str, *args: str) -> dict[str, Any]:
    image = ws.temp_path("local.img")
    try:
        done = subprocess.run([sys.executable, "-m", "uffdsnap", "snapshot", "--shm", obj_path,
                               "-o", image, "--force", "--json", *args], capture_output=True,
                              text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise P.BenchError(f"snapshot -o: {done.stderr.strip()[-300:]}")
        return dict(json.loads(done.stdout))
    finally:
        ws.remove(image)


def _plain_copy(ws: P.Workspace, ns: NetLink, obj_path: str) -> float:
    """Seconds a plain TCP copy of the object takes over the link (into an fsynced file)."""
    target = ws.temp_path("plain.bin")
    sink = ws.start(ns.command([sys.executable, "-c", _SINK, ns.receiver_addr, str(PORT), target],
                               side="receiver"))
    try:
        P.expect(sink, "listening", "plain copy sink", READY_TIMEOUT_S)
        done = subprocess.run(ns.command([sys.executable, "-c", _SOURCE, ns.receiver_addr,
                                          str(PORT), obj_path], side="sender"),
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise P.BenchError(f"plain copy: {done.stderr.strip()[-300:]}")
        return float(done.stdout.split()[1])
    finally:
        ws.end(sink)
        ws.remove(target)


def _throughput(ws: P.Workspace, ns: NetLink, size: int, dest_dir: str,
                say: Callable[[str], None]) -> dict[str, Any]:
    say(f"streaming: throughput, {size_label(size)} over {LINK_BITS // 10**6} Mbit/s")
    obj = P.create_object(ws, "shmem", size)
    writers = P.start_writers(ws, obj, 1, rate=None, probe=False, idle=True, uffd_sock=None,
                              max_seconds=900)
    try:
        plain_s = _plain_copy(ws, ns, obj.path)
        s = _stream(ws, ns, obj.path, dest_dir)
    finally:
        P.stop_writers(ws, writers)
        P.close_object(ws, obj)
    st = s["stream"]
    return {"plain_s": plain_s, "plain_bytes_per_s": size / plain_s, "stream_s": st["seconds"],
            "stream_bytes_per_s": size / st["seconds"], "wire_bytes": st["wire_bytes"]}


def _fault_service(ws: P.Workspace, ns: NetLink, size: int, mode: str,
                   cfg: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    say(f"streaming: fault service, paced writers, -o vs --to, {mode}")
    obj = P.create_object(ws, "shmem", size)
    writers = P.start_writers(ws, obj, 2, rate=cfg.rate, probe=False, idle=False,
                              uffd_sock=None, max_seconds=900)
    try:
        local = _local(ws, obj.path, "--mode", mode)
        streamed = _stream(ws, ns, obj.path, ws.dest_dir, "--mode", mode)
    finally:
        P.stop_writers(ws, writers)
        P.close_object(ws, obj)
    return {"mode": mode, "local": local["fault_service"], "local_faults": local["faults"],
            "streamed": streamed["fault_service"], "streamed_faults": streamed["faults"],
            "streamed_s": streamed["stream"]["seconds"],
            "staging_peak_bytes": streamed["stream"]["staging_peak_bytes"]}


def _compressible(ws: P.Workspace, size: int) -> P.BenchObject:
    fd = os.memfd_create("uffdsnap-bench-compressible", os.MFD_CLOEXEC)
    ws.fds.append(fd)
    os.ftruncate(fd, size)
    rnd = random.Random(12)
    for off in range(0, size, MiB):
        page = b"".join(rnd.randbytes(512) + bytes(3584) for _ in range(MiB // 4096))
        os.pwrite(fd, page, off)
    return P.BenchObject(fd, f"/proc/{os.getpid()}/fd/{fd}", size, "shmem")


def _compressed(ws: P.Workspace, ns: NetLink, size: int,
                say: Callable[[str], None]) -> dict[str, Any]:
    say("streaming: --compress on a compressible object")
    obj = _compressible(ws, size)
    writers = P.start_writers(ws, obj, 1, rate=None, probe=False, idle=True, uffd_sock=None,
                              max_seconds=900)
    try:
        s = _stream(ws, ns, obj.path, ws.dest_dir, "--compress")
    finally:
        P.stop_writers(ws, writers)
        P.close_object(ws, obj)
    st = s["stream"]
    return {"stream_s": st["seconds"], "effective_bytes_per_s": size / st["seconds"],
            "wire_bytes": st["wire_bytes"], "data_bytes": st["data_bytes"]}


def rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The table rows of the streaming targets (the same shape as report.table's)."""
    link = f"{r.get('link_bits_per_s', LINK_BITS) // 10**6} Mbit/s"
    where = f"{size_label(r['size'])} over {link}" if "size" in r else link
    why = r.get("skipped") or r.get("error") or ""
    out = []
    t = r.get("throughput") or {}
    out.append(_row(f"stream throughput vs plain TCP copy, {where}",
                    t.get("stream_bytes_per_s"), t.get("plain_bytes_per_s"),
                    "plain TCP copy, same link", "B/s", (">=", THROUGHPUT_TARGET), why))
    for f in r.get("fault_service") or [{"mode": "-"}]:
        out.append(_row(f"fault service p50, --to vs -o, {where}, {f['mode']}",
                        (f.get("streamed") or {}).get("p50_ns"),
                        (f.get("local") or {}).get("p50_ns"), "snapshot to a local file", "ns",
                        ("<=", FAULT_P50_TARGET),
                        why or f"{f.get('streamed_faults')} vs {f.get('local_faults')} faults"))
    c = r.get("compressed") or {}
    out.append(_row(f"compressed stream, effective vs link rate, {where}",
                    c.get("effective_bytes_per_s"), r.get("link_bits_per_s", LINK_BITS) / 8,
                    "link rate", "B/s", (">=", COMPRESS_TARGET),
                    why or (f"{c['data_bytes'] / max(c['wire_bytes'], 1):.1f}x smaller on the "
                            "wire" if c else "")))
    return out


def _row(scenario: str, ours: float | None, baseline: float | None, baseline_name: str,
         unit: str, target: tuple[str, float], note: str) -> dict[str, Any]:
    ratio = ours / baseline if ours is not None and baseline else None
    op, value = target
    met = None if ratio is None else (ratio <= value if op == "<=" else ratio >= value)
    return {"scenario": scenario, "ours": ours, "baseline": baseline,
            "baseline_name": baseline_name, "unit": unit, "ratio": ratio,
            "target": f"{op} {value:g}x", "met": met, "note": note}
