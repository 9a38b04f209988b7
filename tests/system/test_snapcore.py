"""The native core (uffdsnap/native/src/snapcore.c via uffdsnap.native.core) against the
real kernel.

A separate writer process (test_kernel_uffd's process A) maps a memfd and hands us its uffd; the
core serves its faults the way the coordinator (delegated mode) and an agent (agents mode) use
it. Fault-channel frames are checked against the Python protocol decoder, byte for byte.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_kernel_uffd import PAGE, QUIET, SIZE, TIMEOUT, Writer, needs_root

from uffdsnap import protocol
from uffdsnap.native import uffd as K
from uffdsnap.native.core import SC_FAILED, SnapCore
from uffdsnap.protocol import faultchannel as fc


def fixed_frame(kind: str, **values: int | tuple[int, int]) -> bytes:
    """A frame in the fault channel's fixed encoding, from the product's codec
    (uffdsnap.protocol.faultchannel)."""
    if kind == "fault":
        return fc.encode_fault(protocol.Fault(values["offset"], values["tid"],  # type: ignore[arg-type]
                                              values["seen_ns"]))  # type: ignore[arg-type]
    offset, length = values["ranges"]  # type: ignore[misc]
    return fc.encode_unprotect(offset, length)


def read_frame(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    head = sock.recv(4, socket.MSG_WAITALL)
    (n,) = struct.unpack(">I", head)
    return head + sock.recv(n, socket.MSG_WAITALL)


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("snapcore-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    for page in range(SIZE // PAGE):
        os.pwrite(fd, bytes([page + 1]) * PAGE, page * PAGE)
    yield fd
    os.close(fd)


@pytest.fixture
def image(tmp_path: object) -> Iterator[int]:
    fd = os.open(os.path.join(str(tmp_path), "img"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def test_copy_window_keeps_content_at_t_and_leaves_zero_pages_holes(memfd: int,
                                                                   image: int) -> None:
    os.pwrite(memfd, bytes(PAGE), 1 * PAGE)  # page 1 all zero
    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        assert core.save_page(3) is True  # as a fault would, before the scan reaches it
        assert core.save_page(3) is False
        os.pwrite(memfd, b"\xee" * PAGE, 3 * PAGE)  # written after it was saved
        buf = bytearray(SIZE)
        runs = core.copy_window(0, SIZE, buf)
        assert runs == [(0, 3 * PAGE), (4 * PAGE, SIZE)]
        assert bytes(buf[3 * PAGE:4 * PAGE]) == bytes([4]) * PAGE  # from the image: at T
        assert os.pread(image, SIZE, 0) == bytes(buf)
        assert os.lseek(image, PAGE, os.SEEK_DATA) == 2 * PAGE  # the zero page is a hole
        assert bytes(core.saved[:SIZE // PAGE]) == b"\x01" * (SIZE // PAGE)
        assert core.claim(0, SIZE) == []  # nothing left to claim
        assert core.stats().fault_pages_saved == 1
    finally:
        core.close()


@pytest.fixture
def writer(memfd: int) -> Iterator[Writer]:
    w = Writer(memfd)
    K.api(w.fd, K.REQUIRED_FEATURES | K.FEATURES["THREAD_ID"])
    K.register(w.fd, w.address, SIZE, K.REGISTER_MODE_WP)
    K.writeprotect(w.fd, w.address, SIZE, protect=True)
    yield w
    w.close()


@needs_root
def test_delegated_faults_are_held_until_t_then_saved_and_woken(writer: Writer, memfd: int,
                                                                image: int) -> None:
    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        core.add(1, writer.fd, [(writer.address, SIZE, 0)])
        writer.write(2 * PAGE + 5, 0x77)
        assert writer.report(QUIET) is None  # held: T is not declared yet
        core.go()
        assert writer.report() == f"wrote {2 * PAGE + 5} {0x77}"
        assert core.saved[2] == 1
        writer.write(2 * PAGE + 6, 0x78)  # saved and un-protected: no fault any more
        assert writer.report() == f"wrote {2 * PAGE + 6} {0x78}"
        core.stop()  # (a faulted page may wait in memory until then)
        assert os.pread(image, PAGE, 2 * PAGE) == bytes([3]) * PAGE  # its content at T
        stats = core.stats()
        assert (stats.faults, stats.fault_pages_saved) == (1, 1)
        assert sum(n for _, n in stats.service_buckets) == 1
    finally:
        core.close()


@needs_root
def test_a_faulted_page_waiting_in_memory_reaches_the_image_before_it_is_read(
        writer: Writer, memfd: int, image: int) -> None:
    """A fault's page is saved into memory (not the image, whose writes the copy holds up) and
    un-protected; a copy window over it reads it back as it was at T (the window's pages saved
    before are in the image by then), and stop() leaves every saved page in the image."""
    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        core.add(1, writer.fd, [(writer.address, SIZE, 0)])
        core.go()
        for page in (1, 3):
            writer.write(page * PAGE, 0x55)
            assert writer.report() == f"wrote {page * PAGE} {0x55}"
        assert core.stats().fault_pages_saved == 2
        buf = bytearray(2 * PAGE)
        assert core.copy_window(0, 2 * PAGE, buf) == [(0, PAGE)]
        assert bytes(buf) == bytes([1]) * PAGE + bytes([2]) * PAGE  # page 1: at T, not 0x55
        assert os.pread(image, 2 * PAGE, 0) == bytes(buf)
        core.stop()
        assert os.pread(image, PAGE, 3 * PAGE) == bytes([4]) * PAGE
    finally:
        core.close()


@needs_root
def test_coordinator_channel_answers_a_fault_with_a_protocol_unprotect(writer: Writer,
                                                                      memfd: int,
                                                                      image: int) -> None:
    """The coordinator's end: a forwarded fault is saved, un-protected in the delegated uffds
    and answered on the channel with an `unprotect` the Python decoder accepts."""
    core = SnapCore(memfd, image, SIZE, PAGE)
    ours, theirs = socket.socketpair()
    try:
        core.add(1, writer.fd, [(writer.address, SIZE, 0)])
        core.add_channel(2, theirs.fileno())
        core.go()
        ours.sendall(fixed_frame("fault", offset=5 * PAGE, tid=1234, seen_ns=99))
        frame = read_frame(ours)
        assert frame == fixed_frame("unprotect", ranges=(5 * PAGE, PAGE))
        assert protocol.decode(frame[4:]) == protocol.Unprotect(((5 * PAGE, PAGE),))
        writer.write(5 * PAGE, 1)  # un-protected in the delegated uffd too
        assert writer.report() == f"wrote {5 * PAGE} 1"
        # pages saved by faults and by the scan reach every channel in coalesced batches
        assert core.claim(6 * PAGE, PAGE) == [(6 * PAGE, 7 * PAGE)]
        covered: set[int] = set()
        while 6 not in covered:
            msg = protocol.decode(read_frame(ours)[4:])
            assert isinstance(msg, protocol.Unprotect) and len(msg.ranges) == 1
            (off, length), = msg.ranges
            covered |= set(range(off // PAGE, (off + length) // PAGE))
        assert covered <= {5, 6}
        core.stop()  # (a faulted page may wait in memory until then)
        assert os.pread(image, PAGE, 5 * PAGE) == bytes([6]) * PAGE
    finally:
        core.close()
        ours.close()
        theirs.close()


@pytest.mark.parametrize("frame", [
    protocol.encode(protocol.Fault(0, 1, 2)),  # valid msgpack, not the fixed encoding
    fixed_frame("fault", offset=SIZE, tid=0, seen_ns=0),  # outside the object
    fixed_frame("fault", offset=100, tid=0, seen_ns=0),  # not page-aligned
    fixed_frame("unprotect", ranges=(0, PAGE)),  # wrong direction
    struct.pack(">I", 1 << 20),  # oversized
])
def test_coordinator_channel_rejects_anything_else(frame: bytes, memfd: int, image: int) -> None:
    core = SnapCore(memfd, image, SIZE, PAGE)
    ours, theirs = socket.socketpair()
    try:
        core.add_channel(7, theirs.fileno())
        core.go()
        ours.sendall(frame)
        assert select.select([core.notify_fd], [], [], TIMEOUT)[0]
        events = core.take_events()
        assert [(e.ident, e.kind, e.err) for e in events] == [(7, SC_FAILED, errno.EPROTO)]
        assert core.stats().fault_pages_saved == 0
    finally:
        core.close()
        ours.close()
        theirs.close()


@needs_root
def test_agent_core_forwards_faults_and_applies_unprotects(writer: Writer) -> None:
    """An agent's end: the writer's fault goes out as a protocol `fault` (fixed encoding), and
    the writer resumes once an `unprotect` covering its page comes back."""
    core = SnapCore.for_agent(PAGE)
    ours, theirs = socket.socketpair()
    try:
        core.forward(0, theirs.fileno())
        core.add(1, writer.fd, [(writer.address, SIZE, 0)])
        writer.write(3 * PAGE + 1, 9)
        frame = read_frame(ours)
        fault = protocol.decode(frame[4:])
        assert isinstance(fault, protocol.Fault)
        assert fault.offset == 3 * PAGE and fault.tid == writer.pid and fault.seen_ns > 0
        assert frame == fixed_frame("fault", offset=3 * PAGE, tid=fault.tid,
                                    seen_ns=fault.seen_ns)
        assert writer.report(QUIET) is None  # still blocked: nothing saved it yet
        ours.sendall(fixed_frame("unprotect", ranges=(2 * PAGE, 2 * PAGE)))
        assert writer.report() == f"wrote {3 * PAGE + 1} 9"
        stats = core.stats()
        assert stats.faults == 1 and sum(n for _, n in stats.service_buckets) == 1
    finally:
        core.close()
        ours.close()
        theirs.close()


@needs_root
def test_a_page_is_saved_once_for_every_process(memfd: int, image: int) -> None:
    """Two processes map the object: the first to fault on a page has it saved and is woken at
    once; the other gets the un-protect with the next batch, or faults and is answered from
    the saved map. Either way the page is saved once, with its content at T."""
    a, b = Writer(memfd), Writer(memfd)
    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        for i, w in enumerate((a, b)):
            K.api(w.fd, K.REQUIRED_FEATURES)
            K.register(w.fd, w.address, SIZE, K.REGISTER_MODE_WP)
            K.writeprotect(w.fd, w.address, SIZE, protect=True)
            core.add(i + 1, w.fd, [(w.address, SIZE, 0)])
        core.go()
        a.write(4 * PAGE, 0x11)
        assert a.report() == f"wrote {4 * PAGE} {0x11}"
        b.write(4 * PAGE + 1, 0x22)
        assert b.report() == f"wrote {4 * PAGE + 1} {0x22}"
        stats = core.stats()
        assert stats.fault_pages_saved == 1
        assert stats.faults - stats.duplicates == 1
        core.stop()
        assert os.pread(image, PAGE, 4 * PAGE) == bytes([5]) * PAGE
    finally:
        core.close()
        a.close()
        b.close()


def test_an_object_ending_in_a_partial_page(tmp_path: object) -> None:
    """The last window and the last page stop at the object's end: nothing is read or written
    beyond it, and the partial page is claimed, saved and stored like any other."""
    size = 3 * PAGE + 100
    obj = os.memfd_create("snapcore-tail", os.MFD_CLOEXEC)
    os.write(obj, os.urandom(size))
    img = os.open(os.path.join(str(tmp_path), "img"), os.O_RDWR | os.O_CREAT | os.O_EXCL)
    os.ftruncate(img, size)
    core = SnapCore(obj, img, size, PAGE)
    try:
        assert core.npages == 4
        assert core.save_page(3) is True  # the partial page, as a fault would
        buf = bytearray(4 * PAGE)
        runs = core.copy_window(0, size, memoryview(buf)[:size])
        assert runs == [(0, 3 * PAGE)]
        assert os.fstat(img).st_size == size  # nothing written past the end
        assert os.pread(img, size + 10, 0) == os.pread(obj, size, 0)
        assert bytes(buf[:size]) == os.pread(obj, size, 0)
        assert bytes(buf[size:]) == bytes(len(buf) - size)  # the caller's buffer, untouched
    finally:
        core.close()
        os.close(img)
        os.close(obj)


@pytest.mark.parametrize("frame", [
    protocol.encode(protocol.Unprotect(((0, PAGE),))),  # valid msgpack, not the fixed encoding
    fixed_frame("unprotect", ranges=(100, PAGE)),  # not page-aligned
    fixed_frame("unprotect", ranges=(0, 0)),  # empty
    fixed_frame("unprotect", ranges=((1 << 64) - PAGE, 2 * PAGE)),  # wraps around
    fixed_frame("fault", offset=0, tid=0, seen_ns=0),  # wrong direction
])
def test_agent_channel_rejects_anything_else(frame: bytes) -> None:
    core = SnapCore.for_agent(PAGE)
    ours, theirs = socket.socketpair()
    try:
        core.forward(0, theirs.fileno())
        ours.sendall(frame)
        assert select.select([core.notify_fd], [], [], TIMEOUT)[0]
        assert [(e.ident, e.kind, e.err) for e in core.take_events()] == [
            (0, SC_FAILED, errno.EPROTO)]
    finally:
        core.close()
        ours.close()
        theirs.close()


def test_a_core_of_another_abi_is_refused_in_one_line() -> None:
    """A stale or foreign library (other ABI version, other struct sizes) fails at load with
    one line, instead of being called with the wrong layout."""
    from uffdsnap.errors import UserError
    from uffdsnap.native import core as snapcore

    class Foreign:
        @staticmethod
        def sc_abi_version() -> int:
            return snapcore.ABI_VERSION + 1

    with pytest.raises(UserError, match="does not match") as e:
        snapcore._check_abi(Foreign(), "/x/_snapcore.so")  # type: ignore[arg-type]
    assert "\n" not in str(e.value)

    class Unversioned:  # a library from before the ABI check
        pass

    with pytest.raises(UserError, match="ABI 0"):
        snapcore._check_abi(Unversioned(), "/x/_snapcore.so")  # type: ignore[arg-type]
    snapcore.load()  # and the one installed with the package matches


def test_golden_frames_on_the_native_core() -> None:
    """The golden frames of uffdsnap.protocol.faultchannel, byte for byte, through the C code
    of both ends: the coordinator's core takes the golden fault and answers with exactly the
    golden unprotect; an agent's core takes the golden unprotect as valid."""
    fault, fault_bytes = fc.GOLDEN["fault"]
    unprotect, unprotect_bytes = fc.GOLDEN["unprotect"]
    size = 8 * PAGE
    obj = os.memfd_create("golden", os.MFD_CLOEXEC)
    img = os.memfd_create("golden-img", os.MFD_CLOEXEC)
    os.ftruncate(obj, size)
    os.ftruncate(img, size)
    core = SnapCore(obj, img, size, PAGE)
    ours, theirs = socket.socketpair()
    try:
        core.add_channel(1, theirs.fileno())
        core.go()
        ours.sendall(fault_bytes)
        assert read_frame(ours) == unprotect_bytes
        assert core.stats().fault_pages_saved == 1
    finally:
        core.close()
        ours.close()
        theirs.close()
        os.close(obj)
        os.close(img)
    agent = SnapCore.for_agent(PAGE)
    ours, theirs = socket.socketpair()
    try:
        agent.forward(0, theirs.fileno())
        ours.sendall(unprotect_bytes)
        ours.sendall(b"\0\0\0\1\xc0")  # then garbage: only that one is refused
        assert select.select([agent.notify_fd], [], [], TIMEOUT)[0]
        assert [(e.ident, e.kind, e.err) for e in agent.take_events()] == [
            (0, SC_FAILED, errno.EPROTO)]
    finally:
        agent.close()
        ours.close()
        theirs.close()
    assert fault == fc.decode_frame(fault_bytes) and unprotect == fc.decode_frame(unprotect_bytes)


def test_abi_header_and_binding_agree() -> None:
    """The constants the ctypes binding copies from snapcore.h are the header's."""
    import re

    from uffdsnap.native import core as binding

    header = (Path(binding.__file__).parent / "src" / "snapcore.h").read_text()
    defines = dict(re.findall(r"#define (SC_\w+) (\w+)", header))
    assert int(defines["SC_ABI_VERSION"]) == binding.ABI_VERSION
    assert int(defines["SC_TEST_UNPROTECT_BEFORE_SAVE"]) == binding.TEST_UNPROTECT_BEFORE_SAVE
    assert int(defines["SC_FAULT_DEADLINE_MS"]) == binding.FAULT_DEADLINE_MS
    kinds = dict(re.findall(r"(SC_EVENT|SC_GONE|SC_FAILED|SC_UNPROTECT|SC_SAVED) = (\d+)",
                            header))
    assert {k: int(v) for k, v in kinds.items()} == {
        "SC_EVENT": binding.SC_EVENT, "SC_GONE": binding.SC_GONE, "SC_FAILED": binding.SC_FAILED,
        "SC_UNPROTECT": binding.SC_UNPROTECT, "SC_SAVED": binding.SC_SAVED}


# ---- the core's API is safe to call with anything (issue 16) ------------------------------------


def in_child(body: str) -> str:
    """Run `body` (Python, with memfd/img/SIZE/PAGE/SnapCore/lib at hand) in a child process
    and return its output: a core that crashes (the old one, given these arguments) fails the
    test instead of the test session."""
    import subprocess
    import sys
    import textwrap

    prelude = textwrap.dedent(f"""
        import ctypes, errno, os
        from uffdsnap.native.core import SnapCore, _library
        SIZE, PAGE = {SIZE}, {PAGE}
        memfd = os.memfd_create("child", 0)
        os.ftruncate(memfd, SIZE)
        img = os.memfd_create("child-img", 0)
        os.ftruncate(img, SIZE)
        lib = _library()
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def test_claim_refuses_ranges_outside_the_object() -> None:
    """A range must start on a page and end inside the object's last page: anything else is
    EINVAL, with nothing read or marked (the old core read and wrote the map out of bounds)."""
    out = in_child("""
        from uffdsnap.native.libc import KernelError
        core = SnapCore(memfd, img, SIZE, PAGE)
        for off, length in [(SIZE, PAGE), (SIZE - PAGE, 2 * PAGE), (PAGE + 1, PAGE),
                            (1 << 40, PAGE), ((1 << 64) - PAGE, 2 * PAGE)]:
            try:
                core.claim(off, length)
                print("claimed", off, length)
            except KernelError as e:
                print(errno.errorcode[e.errno])
        print(bytes(core.saved).count(1), core.claim(SIZE - PAGE, PAGE))
        core.close()
    """)
    assert out.split("\n") == ["EINVAL"] * 5 + [f"0 [({SIZE - PAGE}, {SIZE})]", ""]


def test_a_claim_without_room_for_its_runs_claims_nothing(memfd: int, image: int) -> None:
    """-E2BIG (more runs than the caller has room for) leaves every page unclaimed: the old
    core marked them saved first, so they stayed zeros in the image."""
    from uffdsnap.native.core import _library

    lib = _library()
    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        assert core.save_page(2)  # pages 0-1 and 3-7: two runs
        runs = (ctypes.c_uint64 * 2)()
        assert lib.sc_claim(core._p(), 0, SIZE, runs, 1) == -errno.E2BIG
        assert bytes(core.saved) == b"\0\0\1" + b"\0" * (SIZE // PAGE - 3)
        assert core.claim(0, SIZE) == [(0, 2 * PAGE), (3 * PAGE, SIZE)]
    finally:
        core.close()


def test_views_of_the_saved_map_outlive_the_core(memfd: int, image: int) -> None:
    """The map is the binding's memory, not the core's: a view taken while the core lived
    (slices too) still reads the final map after close(); the old core freed it under them."""
    core = SnapCore(memfd, image, SIZE, PAGE)
    view = core.saved[1:5]
    core.save_page(2)
    core.claim(4 * PAGE, PAGE)
    core.close()
    junk = [bytearray(16) for _ in range(1000)]  # (what reuses freed memory, if it were)
    assert bytes(view) == b"\0\1\0\1" and bytes(core.saved[:5]) == b"\0\0\1\0\1"
    del junk


@pytest.mark.parametrize("page_size", [0, 3, 1000, 1 << 31])
def test_a_page_size_that_is_not_one_is_refused(page_size: int) -> None:
    """0 divided by zero in the old core (SIGFPE): now ValueError, like any size that is not
    a power of two from 512 bytes to 1 GiB."""
    out = in_child(f"""
        try:
            SnapCore(memfd, img, SIZE, {page_size})
            print("accepted")
        except ValueError:
            print("refused")
    """)
    assert out == "refused\n"


def test_a_negative_max_takes_nothing() -> None:
    """sc_take_events and the other takers refuse max < 0 (the old core copied every queued
    event into a buffer of any size)."""
    out = in_child("""
        from uffdsnap.native.core import _Event
        core = SnapCore(memfd, img, SIZE, PAGE)
        core.relay_unprotects()
        for page in range(3):
            core.save_page(page)  # an SC_UNPROTECT event each
        one = (_Event * 1)()
        print(lib.sc_take_events(core._p(), one, -1) == -errno.EINVAL,
              lib.sc_take_fault_saved(core._p(), (ctypes.c_uint64 * 1)(), -1) == -errno.EINVAL,
              lib.sc_take_pending(core._p(), 1, ctypes.create_string_buffer(32), -1)
              == -errno.EINVAL, len(core.take_all_events()))
        core.close()
    """)
    assert out == "True True True 3\n"


def test_the_fault_thread_blocks_every_signal(memfd: int, image: int) -> None:
    """Signals are the interpreter's: the core's thread must not take them (an ioctl of its
    interrupted, a handler run there), so it starts with every signal blocked."""
    import signal

    def tasks() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    core = SnapCore(memfd, image, SIZE, PAGE)
    ours, theirs = socket.socketpair()
    try:
        before = tasks()
        core.add_channel(1, theirs.fileno())  # starts the thread
        core.go()
        ours.sendall(fixed_frame("fault", offset=0, tid=1, seen_ns=1))
        read_frame(ours)  # answered: the thread runs its loop (and has its own mask, not the
        new = tasks() - before  # all-blocked one pthread_create starts threads with)
        assert len(new) == 1, new
        status = Path(f"/proc/self/task/{new.pop()}/status").read_text()
        blocked = int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:"))
                      .split()[1], 16)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1,
                    signal.SIGALRM, signal.SIGPIPE, signal.SIGWINCH):
            assert blocked & (1 << (sig - 1)), f"{sig.name} not blocked ({blocked:#x})"
    finally:
        core.close()
        ours.close()
        theirs.close()


def test_events_past_the_queue_limit_are_accounted_for(tmp_path: Path) -> None:
    """The queue of events for Python is bounded (snapcore.c EVENTS_MAX, 2^18): what does not
    fit is not dropped silently, the events taken end with a failure of the run (ENOBUFS).
    Here, relayed un-protects that nobody takes (the old queue grew without bound)."""
    from uffdsnap.native.core import SC_UNPROTECT

    limit = 1 << 18
    size = (limit + 8) * PAGE
    obj = os.memfd_create("events", os.MFD_CLOEXEC)  # sparse: every page a hole
    img = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(obj, size)
    os.ftruncate(img, size)
    core = SnapCore(obj, img, size, PAGE)
    try:
        core.relay_unprotects()
        for page in range(limit + 8):
            core.save_page(page)
        events = core.take_all_events()
        assert len(events) == limit + 1
        assert all(e.kind == SC_UNPROTECT for e in events[:-1])
        assert (events[-1].ident, events[-1].kind, events[-1].err) == (
            -1, SC_FAILED, errno.ENOBUFS)
        assert core.take_all_events() == []  # reported once
    finally:
        core.close()
        os.close(img)
        os.close(obj)


# ---- pages saved because of faults, for streaming (sc_take_fault_saved) --------------------------


def wait_events(core: SnapCore, kind: int) -> list[object]:
    assert select.select([core.notify_fd], [], [], TIMEOUT)[0], "no event"
    return [e for e in core.take_all_events() if e.kind == kind]


def test_pages_saved_by_faults_are_recorded_in_order(memfd: int, image: int) -> None:
    """With a limit set, every page saved because of a fault (save_page, a fault channel's
    fault) is recorded once, in order; pages the scan claims or copies are not. SC_SAVED says
    when the queue goes from empty to non-empty."""
    from uffdsnap.native.core import SC_SAVED

    core = SnapCore(memfd, image, SIZE, PAGE)
    ours, theirs = socket.socketpair()
    try:
        assert core.take_fault_saved(10) == []  # off by default: nothing recorded
        core.save_page(6)
        assert core.take_fault_saved(10) == [] and not core.take_all_events()
        core.set_fault_saved_limit(100)
        core.add_channel(1, theirs.fileno())
        core.go()
        core.save_page(3)
        assert len(wait_events(core, SC_SAVED)) == 1
        core.save_page(1)
        core.save_page(3)  # saved before: not again
        ours.sendall(fixed_frame("fault", offset=5 * PAGE, tid=1, seen_ns=1))
        while protocol.decode(read_frame(ours)[4:]) != protocol.Unprotect(((5 * PAGE, PAGE),)):
            pass  # (the un-protects of pages 3 and 1 come first)
        core.claim(7 * PAGE, PAGE)  # the scan's
        core.copy_window(0, 1 * PAGE, bytearray(PAGE))
        assert core.take_fault_saved(2) == [3, 1]
        assert core.take_fault_saved(2) == [5]
        assert core.take_fault_saved(2) == []
        assert not [e for e in core.take_all_events() if e.kind == SC_SAVED]
        core.save_page(2)
        assert len(wait_events(core, SC_SAVED)) == 1  # empty → non-empty again
        assert core.take_fault_saved(0) == [] and core.take_fault_saved(5) == [2]
        core.save_page(4)
        core.set_fault_saved_limit(0)  # off again: what waits is dropped
        assert core.take_fault_saved(5) == []
    finally:
        core.close()
        ours.close()
        theirs.close()


def test_fault_saved_pages_past_the_limit_fail_the_run(memfd: int, image: int) -> None:
    from uffdsnap.native.libc import KernelError

    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        core.set_fault_saved_limit(2)
        for page in (4, 0, 2):
            core.save_page(page)
        failed = [(e.ident, e.err) for e in core.take_all_events() if e.kind == SC_FAILED]
        assert failed == [(-1, errno.ENOBUFS)]
        assert core.take_fault_saved(10) == [4, 0]  # what was recorded before
        with pytest.raises(KernelError) as e:
            core.take_fault_saved(10)  # then: the record is incomplete
        assert e.value.errno == errno.ENOBUFS
        with pytest.raises(ValueError):
            core.set_fault_saved_limit(-1)
    finally:
        core.close()


@needs_root
def test_a_delegated_fault_is_recorded(writer: Writer, memfd: int, image: int) -> None:
    from uffdsnap.native.core import SC_SAVED

    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        core.set_fault_saved_limit(8)
        core.add(1, writer.fd, [(writer.address, SIZE, 0)])
        core.go()
        writer.write(6 * PAGE, 1)
        assert writer.report() == f"wrote {6 * PAGE} 1"
        assert wait_events(core, SC_SAVED)
        assert core.take_fault_saved(8) == [6]
    finally:
        core.close()


def test_the_fault_deadline_is_a_parameter(memfd: int, image: int) -> None:
    from uffdsnap.native.libc import KernelError

    core = SnapCore(memfd, image, SIZE, PAGE)
    try:
        core.set_fault_deadline(2.5)
        for bad in (0, 3601):
            with pytest.raises(KernelError):
                core.set_fault_deadline(bad)
    finally:
        core.close()


# ---- interrupted calls and failed allocations, injected (issue 16) -------------------------------

# Preloaded into a child process: the core's (and only the core's: the caller's address says)
# system calls fail with EINTR every other time while `inject_eintr` is set, and its
# allocations fail while `inject_oom` is set. Counted per call, so that a test knows each path
# was taken.
INJECT_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

int inject_eintr, inject_oom;
_Atomic unsigned long injected[9]; /* by name: INJECTED, in the test */

void *__libc_malloc(size_t);
void *__libc_calloc(size_t, size_t);
void *__libc_realloc(void *, size_t);

static int from_core(void *caller)
{
    Dl_info info;
    return dladdr(caller, &info) && info.dli_fname && strstr(info.dli_fname, "/_snapcore_plain.so");
}

static __thread unsigned flips;
#define EINTR_EVERY_OTHER(i)                                                                  \
    if (inject_eintr && from_core(__builtin_return_address(0)) && (flips++ & 1) == 0) {      \
        injected[i]++;                                                                        \
        errno = EINTR;                                                                        \
        return -1;                                                                            \
    }
#define REAL(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    EINTR_EVERY_OTHER(0);
    return ((int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl"))(fd, req, arg);
}
ssize_t send(int fd, const void *b, size_t n, int fl)
{ EINTR_EVERY_OTHER(1); return REAL(send)(fd, b, n, fl); }
ssize_t sendmsg(int fd, const struct msghdr *m, int fl)
{ EINTR_EVERY_OTHER(2); return REAL(sendmsg)(fd, m, fl); }
ssize_t recv(int fd, void *b, size_t n, int fl)
{ EINTR_EVERY_OTHER(3); return REAL(recv)(fd, b, n, fl); }
ssize_t preadv2(int fd, const struct iovec *v, int n, off_t o, int fl)
{ EINTR_EVERY_OTHER(4); return REAL(preadv2)(fd, v, n, o, fl); }
ssize_t pread(int fd, void *b, size_t n, off_t o)
{ EINTR_EVERY_OTHER(5); return REAL(pread)(fd, b, n, o); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o)
{ EINTR_EVERY_OTHER(6); return REAL(pwrite)(fd, b, n, o); }

#define OOM(i)                                                                                \
    if (inject_oom && from_core(__builtin_return_address(0))) {                               \
        injected[i]++;                                                                        \
        errno = ENOMEM;                                                                       \
        return NULL;                                                                          \
    }
void *malloc(size_t n) { OOM(7); return __libc_malloc(n); }
void *calloc(size_t k, size_t n) { OOM(7); return __libc_calloc(k, n); }
void *realloc(void *p, size_t n) { OOM(8); return __libc_realloc(p, n); }
"""
INJECTED = ("ioctl", "send", "sendmsg", "recv", "preadv2", "pread", "pwrite", "malloc",
            "realloc")


def injecting_child(tmp_path: Path, body: str) -> str:
    """Run `body` in a child process that has INJECT_C preloaded, with a core built from this
    package's sources without sanitizers (an allocator of theirs would hide ours), and `inject`
    (ctypes, for inject_eintr/inject_oom/injected), `injected_counts()` and test_kernel_uffd's
    names at hand; return its output."""
    import subprocess
    import sys
    import textwrap

    from uffdsnap.native import core_library
    from uffdsnap.testing.build import compiler

    src = Path(core_library()).parent / "src"
    lib, so = tmp_path / "_snapcore_plain.so", tmp_path / "inject.so"
    (tmp_path / "inject.c").write_text(INJECT_C)
    for cmd in ([compiler(), "-shared", "-fPIC", "-O2", "-Wall", "-std=gnu11", "-pthread",
                 f"-I{src}", "-o", str(lib), str(src / "snapcore.c"), "-lm"],
                [compiler(), "-shared", "-fPIC", "-O2", "-Wall", "-o", str(so),
                 str(tmp_path / "inject.c"), "-ldl"]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    prelude = textwrap.dedent(f"""
        import ctypes, errno, os, socket, sys
        from pathlib import Path
        import uffdsnap.native
        uffdsnap.native.core_library = lambda: Path({str(lib)!r})
        from uffdsnap.native.core import SnapCore
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_kernel_uffd import Writer
        inject = ctypes.CDLL(None)
        def injected_counts():
            arr = (ctypes.c_ulong * {len(INJECTED)}).in_dll(inject, "injected")
            return dict(zip({INJECTED!r}, arr))
        def switch(name, on):
            ctypes.c_int.in_dll(inject, name).value = on
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASAN_", "UBSAN_"))}
    env["LD_PRELOAD"] = str(so)  # (not the sanitizers' runtime: this core is not theirs)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=4 * TIMEOUT, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr[-3000:]}"
    return proc.stdout


@needs_root
def test_interrupted_calls_are_retried(tmp_path: Path) -> None:
    """Every system call of the core that EINTR can interrupt is retried (ioctls included:
    the old core took an interrupted un-protect for a lost uffd and failed the run): with every
    other call of the core's interrupted, a delegated writer and a writer served through an
    agent's core and a fault channel are served, Python's own calls go through, and nothing
    fails."""
    out = injecting_child(tmp_path, f"""
        from uffdsnap.native import uffd as K
        from uffdsnap.native.core import SC_FAILED, SC_GONE
        SIZE, PAGE = {SIZE}, {PAGE}
        memfd = os.memfd_create("obj", 0)
        os.ftruncate(memfd, SIZE)
        for p in range(SIZE // PAGE):
            os.pwrite(memfd, bytes([p + 1]) * PAGE, p * PAGE)
        img = os.memfd_create("img", 0)
        os.ftruncate(img, SIZE)
        writers = [Writer(memfd), Writer(memfd)]
        for w in writers:
            K.api(w.fd, K.REQUIRED_FEATURES | K.FEATURES["THREAD_ID"])
            K.register(w.fd, w.address, SIZE, K.REGISTER_MODE_WP)
            K.writeprotect(w.fd, w.address, SIZE, protect=True)
        core, agent = SnapCore(memfd, img, SIZE, PAGE), SnapCore.for_agent(PAGE)
        theirs, ours = socket.socketpair()
        core.add_channel(2, ours.fileno())
        agent.forward(0, theirs.fileno())
        core.add(1, writers[0].fd, [(writers[0].address, SIZE, 0)])
        agent.add(1, writers[1].fd, [(writers[1].address, SIZE, 0)])
        core.go()
        switch("inject_eintr", 1)
        for page in range(SIZE // PAGE - 2):
            w = writers[page % 2]
            w.write(page * PAGE, 0xee)
            assert w.report() == f"wrote {{page * PAGE}} {{0xee}}", page
        assert core.save_page(SIZE // PAGE - 2)  # (from this thread)
        runs = core.copy_window(0, SIZE, bytearray(SIZE))
        switch("inject_eintr", 0)
        assert runs == [(SIZE - PAGE, SIZE)], runs
        assert os.pread(img, PAGE, 0) == bytes([1]) * PAGE  # its content at T
        for c in (core, agent):
            bad = [e for e in c.take_all_events() if e.kind in (SC_FAILED, SC_GONE)]
            assert not bad, bad
        agent.close()
        core.close()
        for w in writers:
            w.close()
        print(injected_counts())
    """)
    import ast

    counts = ast.literal_eval(out)
    missed = [name for name in INJECTED[:7] if not counts[name]]
    assert not missed, f"no interrupted {missed}: the test did not take those paths ({counts})"


def test_an_allocation_failure_loses_no_queued_event(tmp_path: Path) -> None:
    """Out of memory, an event that cannot be queued is accounted for (a failure of the run,
    ENOMEM, after every event queued before it), never silently dropped; the old core wrote
    the failure over the last queued event instead."""
    out = injecting_child(tmp_path, """
        from uffdsnap.native.core import SC_FAILED, SC_UNPROTECT
        PAGE = 4096
        size = 256 * PAGE
        memfd = os.memfd_create("obj", 0)
        os.ftruncate(memfd, size)
        img = os.memfd_create("img", 0)
        os.ftruncate(img, size)
        core = SnapCore(memfd, img, size, PAGE)
        core.relay_unprotects()
        core.claim(255 * PAGE, PAGE)  # relayed by the fault thread: it has made its rounds' room
        import select
        assert select.select([core.notify_fd], [], [], 10)[0]
        assert [e.unprotected for e in core.take_all_events()] == [(255 * PAGE, PAGE)]
        switch("inject_oom", 1)
        for page in range(200):  # an SC_UNPROTECT each, past the room sc_new made
            core.save_page(page)
        switch("inject_oom", 0)
        events = core.take_all_events()
        kinds = [e.kind for e in events]
        queued = kinds.index(SC_FAILED)
        assert kinds[:queued] == [SC_UNPROTECT] * queued, kinds
        assert [e.unprotected for e in events[:queued]] == [
            (p * PAGE, PAGE) for p in range(queued)], events[:queued]
        assert len(events) == queued + 1, kinds  # one failure, last
        assert (events[-1].ident, events[-1].err) == (-1, errno.ENOMEM), events[-1]
        core.save_page(250)  # and it goes on
        assert [e.kind for e in core.take_all_events()] == [SC_UNPROTECT]
        core.close()
        counts = injected_counts()
        print(queued, counts["realloc"], counts["malloc"])
    """)
    queued, failed_reallocs, failed_mallocs = map(int, out.split())
    # each of the 200 events was queued (and delivered), or cost one failed allocation (and
    # was accounted for by the failure): none was queued and then lost
    assert queued + failed_reallocs == 200 and queued >= 16 and not failed_mallocs, out


def test_the_end_of_a_run_takes_every_event_left(tmp_path: Path) -> None:
    """At release, the coordinator takes every event the core still holds, not one batch:
    a failure queued behind more than a batch (EVENT_BATCH, 256) of relayed un-protects still
    fails the snapshot (the old coordinator took 256 and lost the rest)."""
    from uffdsnap.coordinator._native import CoreLink, Idents
    from uffdsnap.native.core import EVENT_BATCH
    from uffdsnap.procfs import ObjectId

    npages = EVENT_BATCH + 64
    size = npages * PAGE
    obj = os.memfd_create("events", os.MFD_CLOEXEC)
    img = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(obj, size)
    os.ftruncate(img, size)
    core = SnapCore(obj, img, size, PAGE)
    failures: list[str] = []
    link = CoreLink(core, ObjectId(0, 0, 0), PAGE, Idents(), failures.append,
                    lambda ranges: None, lambda ranges: None)
    try:
        core.relay_unprotects()
        core.set_fault_saved_limit(npages - 1)
        for page in range(npages):  # the last one is past the limit: the run fails
            core.save_page(page)
        link.stop()
        assert len(failures) == 1 and "No buffer space" in failures[0], failures
    finally:
        core.close()
        os.close(img)
        os.close(obj)


# A process that maps the object, lends us a uffd with fork events, writes and forks when told
# (its child writes a page too: it waits while the child's copy of the uffd protects it).
FORKER = r"""
import ctypes, json, mmap, os, socket, sys
from uffdsnap.native import scm, uffd as uf
sock, memfd, size = socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
mem = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
anchor = ctypes.c_char.from_buffer(mem)
address = ctypes.addressof(anchor)
del anchor
fd, _ = uf.create_uffd()
scm.send_fds(sock, json.dumps({"address": address}).encode(), [fd])
os.close(fd)
for line in sys.stdin:
    op, offset = line.split()
    if op == "write":
        mem[int(offset)] = 1
        os.write(1, b"wrote\n")  # (each line in one write: two processes write here)
    elif os.fork() == 0:
        mem[int(offset)] = 2
        os.write(1, b"child wrote\n")
        os._exit(0)
    else:
        os.write(1, b"forked\n")
"""


@needs_root
def test_a_fork_event_that_cannot_be_queued_releases_the_child(tmp_path: Path) -> None:
    """Out of memory for the event of a fork under a delegated uffd: the child's uffd (which
    the read installed in our process) is closed, which releases the child, and the run
    fails; the old core kept the fd (the child stayed write-protected for good) and lost the
    event."""
    (tmp_path / "forker.py").write_text(FORKER)
    out = injecting_child(tmp_path, f"""
        import json, select, subprocess
        from uffdsnap.native import scm, uffd as K
        from uffdsnap.native.core import SC_FAILED, SC_UNPROTECT
        PAGE = {PAGE}
        SIZE = 256 * PAGE
        memfd = os.memfd_create("obj", 0)
        os.ftruncate(memfd, SIZE)
        img = os.memfd_create("img", 0)
        os.ftruncate(img, SIZE)
        ours, theirs = socket.socketpair()
        forker = subprocess.Popen([sys.executable, {str(tmp_path / "forker.py")!r},
                                   str(theirs.fileno()), str(memfd), str(SIZE)],
                                  pass_fds=(theirs.fileno(), memfd), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, bufsize=0)  # (select, then read)
        theirs.close()
        ours.settimeout(10)
        hello, (uffd,) = scm.recv_fds(ours, 4096)
        address = json.loads(hello)["address"]
        K.api(uffd, K.REQUIRED_FEATURES | K.EVENT_FEATURES)
        K.register(uffd, address, SIZE, K.REGISTER_MODE_WP)
        K.writeprotect(uffd, address, SIZE, protect=True)
        core = SnapCore(memfd, img, SIZE, PAGE)
        core.add(1, uffd, [(address, SIZE, 0)])
        core.go()

        def tell(order, reply):
            forker.stdin.write(order.encode() + b"\\n")
            assert select.select([forker.stdout], [], [], 10)[0], f"no reply to {{order}}"
            line = forker.stdout.readline().decode().strip()
            assert line == reply, (order, line)

        core.relay_unprotects()
        tell("write 0", "wrote")  # a fault served: the core has its room for messages
        assert select.select([core.notify_fd], [], [], 10)[0]  # and its batch is flushed:
        assert [e.unprotected for e in core.take_all_events()] == [(0, PAGE)]  # (no ioctl
        switch("inject_oom", 1)  # of the fault thread's left to meet the fork's EAGAIN)
        page = 1
        while not injected_counts()["realloc"]:  # until the event queue is full
            assert page < SIZE // PAGE - 1, "the event queue never filled"
            core.save_page(page)  # (an un-protect relayed, and not taken)
            page += 1
        forker.stdin.write(f"fork {{(SIZE // PAGE - 1) * PAGE}}\\n".encode())
        lines = []
        for _ in range(2):  # (in either order)
            assert select.select([forker.stdout], [], [], 10)[0], f"only {{lines}}: the " \\
                f"child is still write-protected ({{core.take_all_events()[-3:]}})"
            lines.append(forker.stdout.readline().decode().strip())
        assert sorted(lines) == ["child wrote", "forked"], lines
        switch("inject_oom", 0)
        events = core.take_all_events()
        print([(e.ident, e.kind, e.err) for e in events if e.kind != SC_UNPROTECT])
        core.close()
        os.close(uffd)  # the release (the failure asks for it): its munmap at exit waits for it
        forker.stdin.close()
        forker.wait(10)
    """)
    assert out.strip() == f"[(-1, 3, {errno.ENOMEM})]", out
