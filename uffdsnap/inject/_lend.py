"""Lending the target an fd of ours: the /dev/userfaultfd route for targets of another uid.

An injected userfaultfd() runs with the target's credentials, so an unprivileged target gets
EPERM (vm.unprivileged_userfaultfd=0). But any process holding an open fd of /dev/userfaultfd
may create a full uffd with ioctl(USERFAULTFD_IOC_NEW), whatever its user: we open the device,
hand the target a copy, and have it make the ioctl. UFFD_USER_MODE_ONLY is not a fallback: it
breaks kernel-mode writes. The caller (create_uffd_in) holds every other thread of the target
stopped meanwhile (_others), so only the thread we drive ever holds the device fd.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import TYPE_CHECKING

from uffdsnap.inject._session import PAGE_SIZE
from uffdsnap.inject._x86_64 import SYS_IOCTL, SYS_RECVMSG, SYS_SOCKETPAIR
from uffdsnap.native import scm
from uffdsnap.native import uffd as _uffd
from uffdsnap.native.libc import KernelError

if TYPE_CHECKING:
    from uffdsnap.inject._injected import Injected
    from uffdsnap.inject._session import Session


# ---- in our process ----


def create_by_device(target: Injected, flags: int, first: KernelError) -> int:
    """The /dev/userfaultfd route, after the userfaultfd() route failed with `first`: the
    target's fd of a new uffd made by ioctl(USERFAULTFD_IOC_NEW) on a device fd we lend it."""
    try:
        device = os.open(_uffd.USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(first.call, first.errno or errno.EPERM, first.detail,
                          f"{first.hint}; and we cannot open {_uffd.USERFAULTFD_DEVICE} to hand "
                          f"it one: {os.strerror(e.errno or 0)}") from None
    try:
        theirs = target.give_fd(device)
    finally:
        os.close(device)
    uffd = target.syscall_fd(SYS_IOCTL, theirs, _uffd.USERFAULTFD_IOC_NEW, flags)
    target.close_fd(theirs)
    return uffd


# ---- in the tracer process ----


def give_fd(session: Session, ours: int) -> int:
    """Install a copy of our fd `ours` in the target: it recvmsg()s it, SCM_RIGHTS, from one
    end of a socketpair made in the target whose other end we borrow with pidfd_getfd. No
    listening socket, so nobody else can connect and receive the fd, and no netns issue."""
    page = session.map_scratch(PAGE_SIZE)
    try:
        session.run(SYS_SOCKETPAIR, (socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC,
                                     0, page))
        a, b = struct.unpack("<ii", session.read(page, 8))
        session.fds += [a, b]
        try:
            with socket.socket(fileno=session.take_fd(a)) as sender:
                sender.settimeout(0)  # an empty socket's buffer takes one byte at once
                sender.sendmsg([b"F"], scm.fds_ancillary([ours]))
            received = _recv_fd(session, page, b)
        finally:  # both ends stay open until here: `received` cannot reuse their numbers
            for fd in (a, b):
                if not session.gone:
                    session.close_fd(fd)
    finally:
        session.unmap_scratch(page)
    return received


def _recv_fd(session: Session, page: int, sock: int) -> int:
    """recvmsg() one byte and one SCM_RIGHTS fd on target socket `sock`, via scratch `page`."""
    data, iov, msg, cmsg = page + 64, page + 128, page + 192, page + 256
    cmsg_len = socket.CMSG_SPACE(4)  # the page is fresh, so already zeroed
    session.write(iov, struct.pack("<QQ", data, 1))
    session.write(msg, struct.pack("<QI4xQQQQi4x", 0, 0, iov, 1, cmsg, cmsg_len, 0))
    session.run(SYS_RECVMSG, (sock, msg, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT))
    controllen, flags = struct.unpack("<Qi", session.read(msg + 40, 12))
    length, level, kind, fd = struct.unpack("<Qiii", session.read(cmsg, 20))
    if controllen >= 20 and level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
        session.fds.append(fd)
    else:
        fd = -1
    if fd < 0 or flags & socket.MSG_CTRUNC or length != socket.CMSG_LEN(4):
        raise KernelError("injected recvmsg", errno.EPROTO, session.detail,
                          "the target did not receive the file descriptor intact")
    return fd
