"""The coordinator's door: accept connections on its socket and count them. Past a limit, peers
other than root and the coordinator's own user are refused with the reason (they must not lock
the operator out); running out of descriptors pauses accepting, never ends it."""

from __future__ import annotations

import errno
import logging
import os
import socket as stdsocket
from collections.abc import Awaitable, Callable

import trio

from uffdsnap.channel import Channel, PeerClosed
from uffdsnap.native.scm import peer_credentials
from uffdsnap.protocol import Abort, ProtocolError, Role

log = logging.getLogger(__name__)

# Connections served at once; past it, peers other than root and our own user are told why and
# closed (each connection holds at most 4 descriptors: its socket, an agent's pidfd, and two on
# their way in, a client's image files; 192 of them fit the usual limit of 1024 with room for
# snapshots).
MAX_CONNECTIONS = 192
_REFUSING_AT_ONCE = 16  # peers being told "refused" at once; past it, closed without a word
_REFUSE_S = 1.0  # how long a refused peer gets to read why
# accept() failing for want of descriptors or memory: wait (a connection ending, or this long,
# doubling up to the last) and try again
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKOFF_S = (0.01, 1.0)
_QUIET_S = 1.0  # an outage within this of the last one's end is the same (see _Backoff)
# accept() failing for that one connection only (its peer gone, or refused by a security
# module): on to the next (as trio's own SocketListener does)
_CONNECTION_LOST = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)

Serve = Callable[[Channel], Awaitable[None]]


class Doorman:
    """Accepts connections and hands each to `serve` (which calls `ended` when done), within
    `max_connections`."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS):
        self.max_connections = max_connections
        self.connections = 0  # being served (refused ones not counted)
        self._refusing = 0
        self._connection_ended = trio.Event()
        self._crowded = False  # (said so in the log: once per episode)

    async def accept_all(self, listener: trio.socket.SocketType, nursery: trio.Nursery,
                         serve: Serve) -> None:
        """Accept until cancelled, each admitted connection served in `nursery`."""
        backoff = _Backoff()
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as e:
                if e.errno in _CONNECTION_LOST:
                    continue
                if e.errno not in _OUT_OF_RESOURCES:
                    raise
                await backoff.wait(e, self._connection_ended)
                continue
            backoff.reset()
            self._admit(nursery, Channel(sock, Role.COORDINATOR), serve)

    def ended(self) -> None:
        """A served connection is over."""
        self.connections -= 1
        self._crowded = self._crowded and self.connections >= self.max_connections
        self._connection_ended.set()
        self._connection_ended = trio.Event()

    def _admit(self, nursery: trio.Nursery, chan: Channel, serve: Serve) -> None:
        """Serve a new connection, or refuse it if we are full and it is not a trusted peer's."""
        if self.connections < self.max_connections or self._trusted(chan):
            self.connections += 1
            nursery.start_soon(serve, chan)
            return
        if not self._crowded:
            self._crowded = True
            log.warning("%d connections: refusing peers other than root and uid %d until "
                        "some end (--max-connections)", self.connections, os.geteuid())
        if self._refusing >= _REFUSING_AT_ONCE:
            chan.close()
            return
        self._refusing += 1
        nursery.start_soon(self._refuse, chan)

    def _trusted(self, chan: Channel) -> bool:
        """Root and our own user are never turned away for want of room (they could stop us
        anyway; an unprivileged peer must not lock the operator out)."""
        try:
            return peer_credentials(chan.sock)[1] in (0, os.geteuid())
        except OSError:
            return False

    async def _refuse(self, chan: Channel) -> None:
        """Tell a peer we are full, then close; the peer's hello is read and dropped first,
        so that it reads the reason rather than a reset connection."""
        try:
            with trio.move_on_after(_REFUSE_S):
                await chan.send(Abort(f"refused: the coordinator serves {self.connections} "
                                      "connections, its limit (--max-connections)"))
                chan.sock.shutdown(stdsocket.SHUT_WR)
                while await chan.sock.recv(4096):  # (passed fds are dropped by the kernel)
                    pass
        except (PeerClosed, ProtocolError, OSError):
            pass
        finally:
            chan.close()
            self._refusing -= 1


class _Backoff:
    """Waits between accept() attempts while descriptors (or memory) run out, said once per
    outage. An outage that starts again within _QUIET_S of the last one's end (a connection we
    drop for want of a descriptor frees one, which the next accept takes) is said only if it
    lasts _QUIET_S, so a sustained exhaustion logs one pair of lines, not one per drop."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.said = False  # this outage was logged
        self.started_at = 0.0  # when this outage started (trio clock)
        self.ended_at = -_QUIET_S  # when the last outage ended

    async def wait(self, error: OSError, connection_ended: trio.Event) -> None:
        now = trio.current_time()
        if not self.delay:
            self.started_at = now
        if not self.said and (now - self.ended_at >= _QUIET_S
                              or now - self.started_at >= _QUIET_S):
            log.warning("cannot accept connections: %s; waiting for descriptors to be freed",
                        error.strerror or error)
            self.said = True
        self.delay = min(max(self.delay * 2, _BACKOFF_S[0]), _BACKOFF_S[1])
        with trio.move_on_after(self.delay):
            await connection_ended.wait()

    def reset(self) -> None:
        if self.delay:
            if self.said:
                log.warning("accepting connections again")
            self.said = False
            self.ended_at = trio.current_time()
        self.delay = 0.0
