"""trio I/O around a protocol.Connection: one Unix stream socket, messages and passed fds.

The Connection decides what is legal; this only moves bytes and descriptors. Sends on one channel
are serialized by a lock, so several tasks may send to the same peer.
"""

from __future__ import annotations

import os
import socket as stdsocket
from collections import deque

import trio

from uffdsnap.native import scm
from uffdsnap.protocol import (
    Connection,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Role,
)

_READ_SIZE = 256 << 10
# Descriptors arrive with the first byte of their message; a few may arrive with the bytes of
# earlier messages in the same read. More than this queued is a peer parking fds on us.
MAX_FDS_IN_FLIGHT = 8


class PeerClosed(Exception):
    """The peer closed the connection (or it broke) without an abort message."""


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
        input, a message short of its descriptors, or too many descriptors in flight."""
        while True:
            msg = self.conn.next_message()
            if msg is not None:
                want = msg.fd_count()
                if len(self._fds) < want:
                    raise RemoteProtocolError(f"{msg.TYPE}: expected {want} file "
                                              f"descriptor(s) with the message, got "
                                              f"{len(self._fds)}")
                return msg, [self._fds.popleft() for _ in range(want)]
            try:
                data, ancdata, flags, _ = await self.sock.recvmsg(_READ_SIZE,
                                                                  scm.ancillary_space())
            except (ConnectionResetError, BrokenPipeError) as e:
                raise PeerClosed(str(e)) from None
            try:
                self._fds.extend(scm.fds_from_ancillary(ancdata, flags))
            except ValueError as e:
                raise RemoteProtocolError(str(e)) from None
            if len(self._fds) > MAX_FDS_IN_FLIGHT:
                raise RemoteProtocolError(f"more than {MAX_FDS_IN_FLIGHT} file descriptors "
                                          "sent ahead of their messages")
            if not data:
                raise PeerClosed("connection closed by peer")
            self.conn.receive_data(data)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self.sock.close()


async def connect(path: str, our_role: Role) -> Channel:
    """Connect to a coordinator's Unix socket at `path`."""
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM | stdsocket.SOCK_CLOEXEC)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, our_role)
