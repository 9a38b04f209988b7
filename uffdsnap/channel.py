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
from uffdsnap.protocol import Connection, Message, RemoteProtocolError, Role

_READ_SIZE = 256 << 10


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
        """Send `msg` (and `fds` with its first byte)."""
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

    async def receive(self) -> Message:
        """The next message; raises PeerClosed at EOF, RemoteProtocolError on bad input."""
        while True:
            msg = self.conn.next_message()
            if msg is not None:
                return msg
            try:
                data, ancdata, flags, _ = await self.sock.recvmsg(_READ_SIZE,
                                                                  scm.ancillary_space())
            except (ConnectionResetError, BrokenPipeError) as e:
                raise PeerClosed(str(e)) from None
            try:
                self._fds.extend(scm.fds_from_ancillary(ancdata, flags))
            except ValueError as e:
                raise RemoteProtocolError(str(e)) from None
            if not data:
                raise PeerClosed("connection closed by peer")
            self.conn.receive_data(data)

    def take_fd(self) -> int:
        """The oldest descriptor received and not yet taken (fds arrive with their message)."""
        if not self._fds:
            raise RemoteProtocolError("expected a file descriptor with the message, got none")
        return self._fds.popleft()

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
