"""trio I/O around a protocol.Connection: one Unix stream socket, messages and passed fds.

The Connection decides what is legal; this only moves bytes and descriptors. Sends on one channel
are serialized by a lock, so several tasks may send to the same peer. `connect` is where agents
and clients reach a coordinator: it checks who listens there before a byte leaves.
"""

from __future__ import annotations

import os
import socket as stdsocket
from collections import deque

import trio

from uffdsnap.errors import UserError
from uffdsnap.native import scm
from uffdsnap.protocol import (
    Connection,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Role,
)

_READ_SIZE = 256 << 10
# No message type carries more than two descriptors (Delegate, FaultChannel, a fork Event: one;
# a client's Snap with its files: two). A sender attaches them to its message's first byte, and
# the kernel ends a read after the bytes that carry descriptors, so one read never brings more:
# room for more only lets a peer park them on us (the kernel closes what does not fit and says
# so, MSG_CTRUNC).
MAX_FDS_PER_MESSAGE = 2
_ANCILLARY_SPACE = scm.ancillary_space(MAX_FDS_PER_MESSAGE)


class PeerClosed(Exception):
    """The peer closed the connection (or it broke) without an abort message."""


class UntrustedListener(UserError):
    """Whoever listens at the coordinator's path is not a user we may lend anything to."""


class Channel:
    """A framed, validated message stream over a connected trio Unix socket."""

    def __init__(self, sock: trio.socket.SocketType, our_role: Role):
        self.sock = sock
        self.conn = Connection(our_role)
        self._send_lock = trio.Lock()
        self._fds: deque[int] = deque()

    async def send(self, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send `msg` (and `fds` with its first byte: exactly as many as it carries)."""
        if len(fds) != msg.fd_count():
            raise LocalProtocolError(f"{msg.TYPE} carries {msg.fd_count()} file descriptor(s), "
                                     f"not {len(fds)}")
        data = self.conn.send(msg)
        async with self._send_lock:
            try:
                if fds:
                    sent = await self.sock.sendmsg([data], scm.fds_ancillary(list(fds)))
                    data = data[sent:]
                while data:
                    sent = await self.sock.send(data)
                    data = data[sent:]
            except (BrokenPipeError, ConnectionResetError) as e:
                raise PeerClosed(str(e)) from None

    async def receive(self) -> tuple[Message, list[int]]:
        """The next message and the descriptors that came with it (as many as its type carries,
        `Message.fds`; the caller owns them). PeerClosed at EOF, RemoteProtocolError on bad
        input, a message short of its descriptors, or descriptors no message carries."""
        while True:
            msg = self.conn.next_message()
            if msg is not None:
                want = msg.fd_count()
                if len(self._fds) < want:
                    raise RemoteProtocolError(f"{msg.TYPE}: expected {want} file "
                                              f"descriptor(s) with the message, got "
                                              f"{len(self._fds)}")
                fds = [self._fds.popleft() for _ in range(want)]
                try:
                    self._refuse_parked_fds()
                except RemoteProtocolError:
                    for fd in fds:
                        os.close(fd)
                    raise
                return msg, fds
            self._refuse_parked_fds()
            try:
                data, ancdata, flags, _ = await self.sock.recvmsg(
                    _READ_SIZE, _ANCILLARY_SPACE, stdsocket.MSG_CMSG_CLOEXEC)
            except (ConnectionResetError, BrokenPipeError) as e:
                raise PeerClosed(str(e)) from None
            try:
                self._fds.extend(scm.fds_from_ancillary(ancdata, flags))
            except ValueError as e:
                raise RemoteProtocolError(str(e)) from None
            if not data:
                raise PeerClosed("connection closed by peer")
            self.conn.receive_data(data)

    def _refuse_parked_fds(self) -> None:
        """Every whole message read so far has taken its descriptors; what is left may only
        belong to the message not yet whole (descriptors come with a message's first byte).
        More is a peer sending fds with messages that carry none, to park them on us: every
        one is closed and the connection refused."""
        allowed = MAX_FDS_PER_MESSAGE if self.conn.pending_bytes else 0
        if len(self._fds) > allowed:
            count = len(self._fds)
            self._close_fds()
            raise RemoteProtocolError(f"{count} file descriptor(s) sent that no message "
                                      "carries (closed)")

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())

    def close(self) -> None:
        self._close_fds()
        self.sock.close()


async def connect(path: str, our_role: Role, trusted_uid: int | None = None) -> Channel:
    """Connect to a coordinator's Unix socket at `path`, once the kernel's word on who listens
    there (SO_PEERCRED) names root, our own user, or `trusted_uid`. Anyone else may have taken
    the path to collect the uffds and fault channels agents lend: UntrustedListener (one line),
    and not a byte is sent."""
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM | stdsocket.SOCK_CLOEXEC)
    try:
        await sock.connect(path)
        pid, uid, _gid = scm.peer_credentials(sock)
        refusal = listener_refusal(uid, os.geteuid(), trusted_uid)
        if refusal is not None:
            raise UntrustedListener(f"refusing to talk to {path}: its listener (pid {pid}) "
                                    f"{refusal}")
    except BaseException:
        sock.close()
        raise
    return Channel(sock, our_role)


def listener_refusal(listener_uid: int, our_uid: int, trusted_uid: int | None) -> str | None:
    """Why a listener running as `listener_uid` is no coordinator for us (None: it may be)."""
    if listener_uid in (0, our_uid, trusted_uid):
        return None
    trusted = "root" + (f", uid {our_uid}" if our_uid else "") + (
        f", uid {trusted_uid}" if trusted_uid is not None else "")
    return (f"runs as uid {listener_uid}, not {trusted} (a coordinator of another user must "
            "be named: --coordinator-user)")
