"""Passing file descriptors over Unix sockets (SCM_RIGHTS), for blocking and trio sockets.

The trio helpers build and parse the ancillary data themselves because trio exposes only
sendmsg/recvmsg; the blocking ones are the stdlib's.
"""

from __future__ import annotations

import array
import os
import socket

MAX_FDS_PER_MESSAGE = 16


def fds_ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data for sendmsg() that passes `fds`."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def ancillary_space(max_fds: int = MAX_FDS_PER_MESSAGE) -> int:
    """Buffer size for recvmsg() to receive up to `max_fds` descriptors."""
    return socket.CMSG_SPACE(max_fds * array.array("i").itemsize)


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]], msg_flags: int = 0) -> list[int]:
    """The fds in recvmsg() ancillary data. If the kernel truncated them (MSG_CTRUNC), the ones
    that did arrive are closed and ValueError is raised, so nothing leaks."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - (len(data) % fds.itemsize)
            fds.frombytes(data[:whole])
    received = list(fds)
    if msg_flags & socket.MSG_CTRUNC:
        for fd in received:
            os.close(fd)
        raise ValueError("file descriptors were truncated in transit (MSG_CTRUNC)")
    return received


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send `data` with `fds` attached on a blocking Unix socket."""
    sock.sendmsg([data], fds_ancillary(fds))


def recv_fds(sock: socket.socket, bufsize: int,
             max_fds: int = MAX_FDS_PER_MESSAGE) -> tuple[bytes, list[int]]:
    """Receive up to `bufsize` bytes and any fds attached, on a blocking Unix socket."""
    data, ancdata, flags, _ = sock.recvmsg(bufsize, ancillary_space(max_fds))
    return data, fds_from_ancillary(ancdata, flags)
