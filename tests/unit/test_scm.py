"""SCM_RIGHTS fd passing: what crosses a Unix socket arrives intact, close-on-exec, and a
truncated transfer neither leaks descriptors nor passes for a whole one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from uffdsnap.native import scm


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(params=[socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
                ids=["stream", "seqpacket", "dgram"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, request.param)
    a.settimeout(10)
    b.settimeout(10)
    with a, b:
        yield a, b


def test_fds_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    """Each fd received refers to the same open file as the one sent (same inode, shared
    offset), and is a new, close-on-exec descriptor."""
    a, b = pair
    r, w = os.pipe()
    memfd = os.memfd_create("scm-test")
    try:
        os.write(memfd, b"hello")
        scm.send_fds(a, b"payload", [r, w, memfd])
        data, fds = scm.recv_fds(b, 64)
        try:
            assert data == b"payload"
            assert len(fds) == 3
            assert not set(fds) & {r, w, memfd}
            for sent, got in zip([r, w, memfd], fds, strict=True):
                assert os.fstat(sent).st_ino == os.fstat(got).st_ino
                assert not os.get_inheritable(got)
            assert os.lseek(fds[2], 0, os.SEEK_CUR) == 5  # one open file description
            os.write(fds[1], b"x")
            assert os.read(r, 1) == b"x"
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        for fd in (r, w, memfd):
            os.close(fd)


def test_message_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    scm.send_fds(a, b"plain", [])
    assert scm.recv_fds(b, 64) == (b"plain", [])


def test_max_fds_per_message_fit(pair: tuple[socket.socket, socket.socket]) -> None:
    """The default receive buffer holds MAX_FDS_PER_MESSAGE descriptors without truncation."""
    a, b = pair
    memfd = os.memfd_create("scm-test")
    sent = [os.dup(memfd) for _ in range(scm.MAX_FDS_PER_MESSAGE)]
    try:
        scm.send_fds(a, b"m", sent)
        _, got = scm.recv_fds(b, 16)
        assert len(got) == scm.MAX_FDS_PER_MESSAGE
        for fd in got:
            os.close(fd)
    finally:
        for fd in [memfd, *sent]:
            os.close(fd)


def test_fd_truncation_closes_what_arrived(pair: tuple[socket.socket, socket.socket]) -> None:
    """More fds than the receive buffer holds: the kernel sets MSG_CTRUNC; recv_fds raises and
    closes the ones that did arrive (no descriptor is leaked in this process)."""
    a, b = pair
    memfd = os.memfd_create("scm-test")
    sent = [os.dup(memfd) for _ in range(6)]
    try:
        before = _open_fds()
        scm.send_fds(a, b"many", sent)
        with pytest.raises(ValueError, match="MSG_CTRUNC"):
            scm.recv_fds(b, 64, max_fds=1)
        assert _open_fds() == before
    finally:
        for fd in [memfd, *sent]:
            os.close(fd)


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
                         ids=["seqpacket", "dgram"])
def test_data_truncation_is_an_error(kind: int) -> None:
    """On message sockets a too-small buffer drops the rest of the message (MSG_TRUNC): that is
    reported, and the fds that came with it are closed, rather than a half message returned."""
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    memfd = os.memfd_create("scm-test")
    with a, b:
        try:
            before = _open_fds()
            scm.send_fds(a, b"0123456789", [memfd])
            with pytest.raises(ValueError, match="MSG_TRUNC"):
                scm.recv_fds(b, 4)
            assert _open_fds() == before
        finally:
            os.close(memfd)


def test_stream_short_read_is_not_truncation() -> None:
    """On a stream socket a small buffer just leaves the rest queued: no error, fds intact."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    memfd = os.memfd_create("scm-test")
    with a, b:
        try:
            scm.send_fds(a, b"0123456789", [memfd])
            data, fds = scm.recv_fds(b, 4)
            assert data == b"0123" and len(fds) == 1
            os.close(fds[0])
            assert b.recv(64) == b"456789"
        finally:
            os.close(memfd)


def test_fds_from_ancillary_ignores_other_messages() -> None:
    """Only SOL_SOCKET/SCM_RIGHTS entries carry fds; credentials and partial ints are skipped."""
    r, w = os.pipe()
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, b"\0" * 12),
               (socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little") + b"\1\2")]
        assert scm.fds_from_ancillary(anc) == [r]
        assert not os.get_inheritable(r)
        assert scm.fds_from_ancillary([]) == []
    finally:
        os.close(r)
        os.close(w)


def test_ancillary_round_trip_shape() -> None:
    assert scm.fds_ancillary([]) == []
    ((level, kind, data),) = scm.fds_ancillary([3, 4])
    assert (level, kind, len(data)) == (socket.SOL_SOCKET, socket.SCM_RIGHTS, 8)
    assert scm.ancillary_space(1) >= socket.CMSG_LEN(4)
