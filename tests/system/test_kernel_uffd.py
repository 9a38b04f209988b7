"""uffdsnap.native.uffd against the real kernel, across processes, the way agents use it.

A writer process (A) maps a memfd shared, creates its own uffd and hands it to the test process
(B) over SCM_RIGHTS, keeping no copy. B registers and write-protects A's mapping through that fd
and sees A's writes held as faults. A reports each completed write on its stdout pipe, so "A is
blocked" is proven by a fault message having arrived while no report has. Run as a script, this
file is process A.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from types import TracebackType

import pytest

from uffdsnap.native import scm
from uffdsnap.native import uffd as uf
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import read_maps

PAGE = os.sysconf("SC_PAGE_SIZE")
NPAGES = 8
SIZE = NPAGES * PAGE
TIMEOUT = 10.0  # longest wait for something that must happen
QUIET = 0.3  # how long we watch for something that must not happen
WP_WRITE = uf.PAGEFAULT_FLAG_WP | uf.PAGEFAULT_FLAG_WRITE

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: userfaultfd (syscall "
                                "needs CAP_SYS_PTRACE, /dev/userfaultfd is root-only here); CI "
                                "runs as root")


# ---- process A ------------------------------------------------------------------------------


def writer_main(sock_fd: int, memfd: int, npages: int) -> None:
    """Process A: map, create and hand over a uffd, then read/write bytes when told."""
    import ctypes
    import mmap

    sock = socket.socket(fileno=sock_fd)
    mem = mmap.mmap(memfd, npages * mmap.PAGESIZE, flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(memfd)
    anchor = ctypes.c_char.from_buffer(mem)
    address = ctypes.addressof(anchor)
    del anchor
    fd, route = uf.create_uffd()
    scm.send_fds(sock, json.dumps({"pid": os.getpid(), "address": address,
                                   "route": route}).encode(), [fd])
    os.close(fd)  # B holds the only reference
    while order := sock.recv(4096):
        cmd = json.loads(order)
        if cmd["op"] == "write":
            mem[cmd["offset"]] = cmd["value"]  # blocks while the page is write-protected
            print(f"wrote {cmd['offset']} {mem[cmd['offset']]}", flush=True)
        elif cmd["op"] == "read":
            print(f"read {cmd['offset']} {mem[cmd['offset']]}", flush=True)
        elif cmd["op"] == "exit":
            return


# ---- process B's side -----------------------------------------------------------------------


class Writer:
    """Handle on a running process A: its pid, mapping address and the uffd it handed over."""

    def __init__(self, memfd: int, npages: int = NPAGES):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno()), str(memfd), str(npages)],
            pass_fds=(theirs.fileno(), memfd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        theirs.close()
        assert self.proc.stdout is not None
        self._out = self.proc.stdout.fileno()
        self._buf = b""
        self.uffd: int | None = None
        ours.settimeout(TIMEOUT)
        data, fds = scm.recv_fds(ours, 4096)
        hello = json.loads(data)
        assert len(fds) == 1
        self.uffd = fds[0]
        self.pid: int = hello["pid"]
        self.address: int = hello["address"]
        self.route: str = hello["route"]
        assert self.pid == self.proc.pid

    @property
    def fd(self) -> int:
        """The uffd, while we hold it."""
        assert self.uffd is not None, "uffd already closed"
        return self.uffd

    def write(self, offset: int, value: int) -> None:
        self.sock.send(json.dumps({"op": "write", "offset": offset, "value": value}).encode())

    def read(self, offset: int) -> None:
        self.sock.send(json.dumps({"op": "read", "offset": offset}).encode())

    def report(self, timeout: float = TIMEOUT) -> str | None:
        """A's next report line, or None if none arrives within `timeout`."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                return None
            chunk = os.read(self._out, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def exit(self) -> int:
        self.sock.send(json.dumps({"op": "exit"}).encode())
        return self.proc.wait(TIMEOUT)

    def close_uffd(self) -> None:
        if self.uffd is not None:
            os.close(self.uffd)
            self.uffd = None

    def close(self) -> None:
        self.close_uffd()  # releases A if it is still blocked
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("uffd-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def writer(memfd: int) -> Iterator[Writer]:
    with Writer(memfd) as w:
        yield w


def protect_all(w: Writer) -> uf.ApiInfo:
    """What an agent does: negotiate WP (+ thread ids), register A's mapping, protect it all."""
    info = uf.api(w.fd, uf.REQUIRED_FEATURES | uf.FEATURES["THREAD_ID"])
    ioctls = uf.register(w.fd, w.address, SIZE, uf.REGISTER_MODE_WP)
    assert ioctls & (1 << 0x06)  # _UFFDIO_WRITEPROTECT usable on the range
    uf.writeprotect(w.fd, w.address, SIZE, protect=True)
    return info


def wait_fault(uffd: int, timeout: float = TIMEOUT) -> uf.PageFault:
    """The one page fault that must arrive on `uffd` within `timeout`."""
    poller = select.poll()
    poller.register(uffd, select.POLLIN)
    assert poller.poll(timeout * 1000), "no fault arrived"
    events = uf.read_events(uffd)
    assert len(events) == 1, events
    assert isinstance(events[0], uf.PageFault), events
    return events[0]


def byte_at(memfd: int, offset: int) -> int:
    return os.pread(memfd, 1, offset)[0]


# ---- (a) a uffd made in A, used from B ------------------------------------------------------


@needs_root
def test_uffd_passed_from_creator_protects_its_mapping(memfd: int, writer: Writer) -> None:
    """B protects A's mapping through A's uffd; A's write waits for B's un-protect."""
    writer.write(0x10, 1)  # page 0 populated before protection
    assert writer.report() == "wrote 16 1"
    info = protect_all(writer)
    assert info.features & uf.REQUIRED_FEATURES == uf.REQUIRED_FEATURES

    writer.write(0x123, 7)
    fault = wait_fault(writer.fd)
    assert writer.report(QUIET) is None, "A's write completed on a protected page"
    assert byte_at(memfd, 0x123) == 0
    assert fault.address == writer.address  # page-aligned (no EXACT_ADDRESS)
    assert fault.flags == WP_WRITE and fault.wp and fault.write
    if info.features & uf.FEATURES["THREAD_ID"]:
        assert fault.tid == writer.pid

    uf.writeprotect(writer.fd, writer.address, PAGE, protect=False)
    assert writer.report() == "wrote 291 7"
    assert byte_at(memfd, 0x123) == 7

    writer.write(0x200, 8)  # the un-protected page stays writable
    assert writer.report() == "wrote 512 8"
    writer.write(3 * PAGE, 9)  # the others stay protected
    fault = wait_fault(writer.fd)
    assert fault.address == writer.address + 3 * PAGE and fault.flags == WP_WRITE
    assert writer.report(QUIET) is None
    uf.writeprotect(writer.fd, fault.address, PAGE, protect=False)
    assert writer.report() == f"wrote {3 * PAGE} 9"
    assert uf.read_events(writer.fd) == []


# ---- (b) never-touched pages ----------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("state", ["hole", "page-cache-only"])
def test_write_to_never_mapped_page_is_caught(memfd: int, writer: Writer, state: str) -> None:
    """Protecting shmem marks pages A never touched (PTE markers): no fault-in pass is needed.
    "hole": the page exists nowhere yet; "page-cache-only": it has data but was never in A's
    page tables. Reading such a page does not block; writing it does."""
    target = 2 * PAGE
    if state == "page-cache-only":
        os.pwrite(memfd, b"\x11", target)
    else:
        with pytest.raises(OSError) as e:
            os.lseek(memfd, 0, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO  # nothing allocated anywhere in the object
    protect_all(writer)

    writer.read(target)
    before = 0x11 if state == "page-cache-only" else 0
    assert writer.report() == f"read {target} {before}"
    writer.write(target + 5, 0x22)
    fault = wait_fault(writer.fd)
    assert fault.address == writer.address + target and fault.flags == WP_WRITE
    assert writer.report(QUIET) is None
    assert byte_at(memfd, target + 5) == 0
    uf.writeprotect(writer.fd, fault.address, PAGE, protect=False)
    assert writer.report() == f"wrote {target + 5} 34"
    assert byte_at(memfd, target + 5) == 0x22


# ---- (c) the last close releases ------------------------------------------------------------


@needs_root
def test_closing_last_reference_releases_blocked_writer(memfd: int, writer: Writer) -> None:
    """If the uffd holder goes away, the workload must not hang: the last close clears the WP
    state and wakes the writer, and later writes are not blocked either."""
    protect_all(writer)
    writer.write(PAGE, 5)
    wait_fault(writer.fd)
    assert writer.report(QUIET) is None
    writer.close_uffd()  # A kept no copy: this is the last reference
    assert writer.report() == f"wrote {PAGE} 5"
    writer.write(4 * PAGE, 6)
    assert writer.report() == f"wrote {4 * PAGE} 6"
    assert byte_at(memfd, PAGE) == 5 and byte_at(memfd, 4 * PAGE) == 6


# ---- (d) DONTWAKE, then WAKE ----------------------------------------------------------------


@needs_root
def test_unprotect_dontwake_then_wake(memfd: int, writer: Writer) -> None:
    """Un-protecting with DONTWAKE leaves the writer asleep until an explicit UFFDIO_WAKE (how
    many pages can be un-protected and their writers woken once)."""
    protect_all(writer)
    writer.write(5 * PAGE, 3)
    fault = wait_fault(writer.fd)
    uf.writeprotect(writer.fd, fault.address, PAGE, protect=False,
                    wake=False)
    assert writer.report(QUIET) is None, "DONTWAKE woke the writer"
    assert byte_at(memfd, 5 * PAGE) == 0
    uf.wake(writer.fd, fault.address, PAGE)
    assert writer.report() == f"wrote {5 * PAGE} 3"
    assert byte_at(memfd, 5 * PAGE) == 3


# ---- (e) decoding messages (pure) -----------------------------------------------------------


def _msg(event: int, body: bytes) -> bytes:
    return struct.pack("<B7x", event) + body.ljust(24, b"\0")


PAGEFAULT = _msg(uf.EVENT_PAGEFAULT, struct.pack("<QQI", WP_WRITE, 0x7F00_0000_3000, 4242))
FORK = _msg(uf.EVENT_FORK, struct.pack("<I", 17))
REMAP = _msg(uf.EVENT_REMAP, struct.pack("<QQQ", 0x1000, 0x9000, 0x3000))
REMOVE = _msg(uf.EVENT_REMOVE, struct.pack("<QQ", 0x2000, 0x4000))
UNMAP = _msg(uf.EVENT_UNMAP, struct.pack("<QQ", 0x5000, 0x8000))
UNKNOWN = _msg(0x42, b"\xff" * 24)

DECODED: list[tuple[bytes, uf.UffdEvent]] = [
    (PAGEFAULT, uf.PageFault(0x7F00_0000_3000, WP_WRITE, 4242)),
    (FORK, uf.Fork(17)),
    (REMAP, uf.Remap(0x1000, 0x9000, 0x3000)),
    (REMOVE, uf.Remove(0x2000, 0x4000)),
    (UNMAP, uf.Unmap(0x5000, 0x8000)),
    (UNKNOWN, uf.UnknownEvent(0x42)),
]


@pytest.mark.parametrize(("raw", "event"), DECODED, ids=[type(e).__name__ for _, e in DECODED])
def test_decode_each_event(raw: bytes, event: uf.UffdEvent) -> None:
    assert len(raw) == uf.MSG_SIZE
    assert uf.decode_message(raw) == event
    assert uf.decode_messages(raw) == [event]


def test_pagefault_flags() -> None:
    missing = uf.decode_message(_msg(uf.EVENT_PAGEFAULT, struct.pack("<QQI", 0, 0x1000, 0)))
    assert isinstance(missing, uf.PageFault) and not missing.wp and not missing.write
    wp = uf.decode_message(PAGEFAULT)
    assert isinstance(wp, uf.PageFault) and wp.wp and wp.write


def test_decode_batched_read() -> None:
    """One read() returns several messages back to back, in order."""
    raw = b"".join(r for r, _ in DECODED) + PAGEFAULT
    assert uf.decode_messages(raw) == [e for _, e in DECODED] + [DECODED[0][1]]
    assert uf.decode_messages(b"") == []


@pytest.mark.parametrize("size", [1, 31, 33, 63])
def test_decode_rejects_partial_messages(size: int) -> None:
    with pytest.raises(ValueError, match="uffd_msg"):
        uf.decode_messages(b"\x12" * size)
    with pytest.raises(ValueError, match="32 bytes"):
        uf.decode_message(b"\x12" * size)


def test_feature_names() -> None:
    assert uf.feature_names(0) == []
    assert uf.feature_names(uf.REQUIRED_FEATURES) == ["PAGEFAULT_FLAG_WP", "WP_HUGETLBFS_SHMEM"]
    assert uf.feature_names(0x1FFFF) == list(uf.FEATURES)
    assert uf.feature_names(1 << 40 | 1) == ["PAGEFAULT_FLAG_WP", "BIT40"]


# ---- (f) errors -----------------------------------------------------------------------------


def _unmapped_gap(pid: int) -> int:
    """A page-aligned address with at least one free page, between two of `pid`'s mappings."""
    maps = read_maps(pid)
    for below, above in zip(maps, maps[1:], strict=False):
        if above.start - below.end >= PAGE and below.end >= 1 << 20:
            return below.end
    raise AssertionError("no gap in the address space")


@needs_root
def test_register_errors_name_ioctl_errno_and_range(writer: Writer) -> None:
    uffd = writer.fd
    uf.api(uffd, uf.REQUIRED_FEATURES)
    gap = _unmapped_gap(writer.pid)
    with pytest.raises(KernelError) as e:
        uf.register(uffd, gap, PAGE)
    err = e.value
    assert err.call == "UFFDIO_REGISTER" and err.errno in (errno.EINVAL, errno.ENOMEM)
    text = str(err)
    assert text.startswith(f"UFFDIO_REGISTER(start={gap:#x}, len={PAGE:#x}, mode=2) failed: ")
    assert errno.errorcode[err.errno] in text and "\n" not in text
    assert "not entirely mapped" in text  # the hint says what the errno means here

    with pytest.raises(KernelError) as e:
        uf.register(uffd, writer.address + 1, PAGE)
    assert e.value.errno == errno.EINVAL and f"start={writer.address + 1:#x}" in str(e.value)

    with pytest.raises(KernelError) as e:  # protect before register
        uf.writeprotect(uffd, writer.address, PAGE, protect=True)
    assert e.value.call == "UFFDIO_WRITEPROTECT" and f"start={writer.address:#x}" in str(e.value)
    assert e.value.errno is not None and errno.errorcode[e.value.errno] in str(e.value)

    with pytest.raises(KernelError) as e:  # UFFDIO_API is allowed once per fd
        uf.api(uffd, uf.REQUIRED_FEATURES)
    assert e.value.call == "UFFDIO_API" and e.value.errno == errno.EINVAL
    assert isinstance(e.value, OSError)


@needs_root
def test_errors_after_creator_exits(memfd: int, writer: Writer) -> None:
    """The uffd outlives its creator but its address space is gone: WRITEPROTECT says ESRCH,
    REGISTER/UNREGISTER say ENOMEM; both messages tell the user the creator exited."""
    protect_all(writer)
    uffd = writer.fd
    assert writer.exit() == 0
    with pytest.raises(KernelError) as e:
        uf.writeprotect(uffd, writer.address, PAGE, protect=False)
    assert e.value.errno == errno.ESRCH
    text = str(e.value)
    assert text.startswith(f"UFFDIO_WRITEPROTECT(start={writer.address:#x}, len={PAGE:#x}")
    assert "ESRCH" in text and "exited" in text
    for call in (uf.register, uf.unregister):
        with pytest.raises(KernelError) as e:
            call(uffd, writer.address, PAGE)
        assert e.value.errno == errno.ENOMEM and "exited" in str(e.value)
    assert uf.read_events(uffd) == []


@needs_root
def test_read_events_empty_and_creation_routes() -> None:
    """A fresh uffd has no events (EAGAIN → []); both creation routes give a working fd."""
    fd, route = uf.create_uffd()
    try:
        assert route in ("syscall", "device")
        with pytest.raises(KernelError, match=r"^read\(uffd=\d+\) failed: EINVAL.*UFFDIO_API"):
            uf.read_events(fd)  # not usable before the API handshake
        uf.api(fd, uf.REQUIRED_FEATURES)
        assert uf.read_events(fd) == []
        assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    for create in (uf.create_uffd_syscall, uf.create_uffd_device):
        fd = create()
        try:
            assert uf.api(fd, uf.REQUIRED_FEATURES).features & uf.REQUIRED_FEATURES
        finally:
            os.close(fd)
    assert uf.supported_features() & uf.REQUIRED_FEATURES == uf.REQUIRED_FEATURES


if __name__ == "__main__":
    writer_main(*map(int, sys.argv[1:4]))


@needs_root
def test_write_tracking_facts() -> None:
    """The facts incremental snapshots rest on (docs/tracking.md, "Why not WP_ASYNC"), checked
    on this kernel: an async uffd records writes with no handler, but unregistering it loses the
    record (every page then reads "written"); with a sync uffd the written flag is exactly the
    pages un-protected since the protect."""
    import mmap

    from uffdsnap.native.pagemap import written_pages

    fd = os.memfd_create("tracking-facts", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        for i in range(NPAGES):
            m[i * PAGE] = 1
        me = os.getpid()
        u, _ = uf.create_uffd()
        try:
            uf.api(u, uf.REQUIRED_FEATURES | uf.FEATURES["WP_ASYNC"])
            uf.register(u, addr, SIZE, uf.REGISTER_MODE_WP)
            uf.writeprotect(u, addr, SIZE, True)
            assert written_pages(me, addr, SIZE, PAGE) == []
            m[3 * PAGE] = m[5 * PAGE] = 7  # async: the kernel resolves the faults itself
            assert written_pages(me, addr, SIZE, PAGE) == [3, 5]
            uf.unregister(u, addr, SIZE)
            assert written_pages(me, addr, SIZE, PAGE) == list(range(NPAGES))  # record lost
        finally:
            os.close(u)
        s, _ = uf.create_uffd()
        try:
            uf.api(s, uf.REQUIRED_FEATURES)
            uf.register(s, addr, SIZE, uf.REGISTER_MODE_WP)
            uf.writeprotect(s, addr, SIZE, True)
            assert written_pages(me, addr, SIZE, PAGE) == []
            uf.writeprotect(s, addr + 6 * PAGE, PAGE, False)
            assert written_pages(me, addr, SIZE, PAGE) == [6]
            uf.unregister(s, addr, SIZE)
        finally:
            os.close(s)
        del addr
        m.close()
    finally:
        os.close(fd)
