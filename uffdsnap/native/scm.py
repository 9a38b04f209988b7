"""Passing file descriptors over Unix sockets (SCM_RIGHTS), for blocking and trio sockets.

The trio helpers build and parse the ancillary data themselves because trio exposes only
sendmsg/recvmsg; the blocking ones are the stdlib's.
"""

from __future__ import annotations

import array
import os
import socket
from typing import Any

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
    """The fds in recvmsg() ancillary data, made close-on-exec (a uffd must never leak into a
    program we start: the holder's death has to release the workload).

    If the kernel truncated the fds (MSG_CTRUNC) or the message itself (MSG_TRUNC, datagram and
    seqpacket sockets), the fds that did arrive are closed and ValueError is raised, so nothing
    leaks and no half message is taken for a whole one.
    """
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - (len(data) % fds.itemsize)
            fds.frombytes(data[:whole])
    received = list(fds)
    truncated = [name for flag, name in ((socket.MSG_CTRUNC, "file descriptors (MSG_CTRUNC)"),
                                         (socket.MSG_TRUNC, "message data (MSG_TRUNC)"))
                 if msg_flags & flag]
    if truncated:
        for fd in received:
            os.close(fd)
        raise ValueError(f"{' and '.join(truncated)} truncated in transit: receive buffer too "
                         "small")
    for fd in received:
        os.set_inheritable(fd, False)
    return received


def is_unix_stream(fd: int) -> bool:
    """Whether `fd` (passed to us by a peer) is a connected Unix stream socket."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with sock:
        return sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], "little")


def peer_credentials(sock: socket.socket | Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket, as the kernel
    recorded them at connect() (SO_PEERCRED): nothing the peer says can change them."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(creds[i:i + 4], "little") for i in (0, 4, 8))
    return pid, uid, gid


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send `data` with `fds` attached on a blocking Unix socket."""
    sock.sendmsg([data], fds_ancillary(fds))


def recv_fds(sock: socket.socket, bufsize: int,
             max_fds: int = MAX_FDS_PER_MESSAGE) -> tuple[bytes, list[int]]:
    """Receive up to `bufsize` bytes and any fds attached (close-on-exec from the start), on a
    blocking Unix socket. ValueError if anything was truncated (see fds_from_ancillary)."""
    data, ancdata, flags, _ = sock.recvmsg(bufsize, ancillary_space(max_fds),
                                           socket.MSG_CMSG_CLOEXEC)
    return data, fds_from_ancillary(ancdata, flags)
