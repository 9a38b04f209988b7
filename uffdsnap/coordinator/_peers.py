"""A joined agent as the coordinator's I/O sees it: its connection, an outbox drained by one send
task (so that no caller ever blocks on a slow peer), and what it lends us during a snapshot."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from uffdsnap.channel import Channel, PeerClosed
from uffdsnap.native.pidfd import process_alive
from uffdsnap.native.scm import peer_credentials
from uffdsnap.procfs import process_running
from uffdsnap.protocol import Message, ProtocolError, Released, Unprotect

if TYPE_CHECKING:
    from uffdsnap.tracker import Tracker

log = logging.getLogger(__name__)

OUTBOX_DEPTH = 256
# An agent that cannot take a message for this long is dropped (its process is then released
# by the agent itself, or by the kernel when the agent dies) and the snapshot fails.
PEER_SEND_TIMEOUT_S = 10.0


@dataclass(eq=False)
class Peer:
    """A joined agent. Identity is the object (it is the policy's key for this agent)."""

    chan: Channel
    pid: int
    comm: str
    mode: str
    pidfd: int
    outbox: trio.MemorySendChannel[Any]
    # processes it tracks (its own unless it exec'd, and children forked while protected)
    pids: set[int] = field(default_factory=set)
    mappings: tuple[tuple[int, int, int], ...] = ()
    protect_ns: int = 0
    released: trio.Event = field(default_factory=trio.Event)
    release_stats: Released | None = None
    send_error: str = ""
    delegated: list[Tracker] = field(default_factory=list)  # our copies of its uffds
    fault_channel: int = -1  # our end of its fault channel (agents mode), during a snapshot
    keeps_protection: bool = False  # released with keep (write tracking, see _tracking)
    _agent_pid: int = 0

    def __post_init__(self) -> None:
        self.pids = {self.pid}

    @property
    def agent_pid(self) -> int:
        """The agent's own process (SO_PEERCRED; an agent host for attach agents), which the
        deadline watch looks at: 0 if unknown."""
        if not self._agent_pid:
            try:
                self._agent_pid = peer_credentials(self.chan.sock)[0]
            except OSError:
                return 0
        return self._agent_pid

    def any_alive(self) -> bool:
        """Whether a process it tracks may still live: its own, the children it named (as of
        its last report, which may lag), and any whose uffd it lent us (delegated mode), named
        or not: a fork chain's newest member it had not reported yet."""
        return (process_alive(self.pidfd)
                or any(process_running(p) for p in self.pids if p != self.pid)
                or any(t.address_space_alive() for t in self.delegated))

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "mode": self.mode,
                "mappings": len(self.mappings), "protect_ns": self.protect_ns,
                "children": sorted(p for p in self.pids if p != self.pid)}

    def can_unprotect(self) -> bool:
        """Whether an `unprotect` may go to it now (it is protected, or releasing, or kept its
        protection at the last release: write tracking)."""
        return self.keeps_protection or self.chan.conn.state.value in ("active", "releasing")

    def post_nowait(self, msg: Message, fds: list[int] | None = None) -> bool:
        """Queue `msg` (with `fds`, which the outbox now owns); False if the outbox is full
        or closed (the fds are then closed here)."""
        try:
            self.outbox.send_nowait((msg, fds or []))
            return True
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            close_all(fds or [])
            return False

    async def post(self, msg: Message, on_stuck: Callable[[str], None]) -> None:
        """Queue `msg`, waiting (bounded) when the outbox is full; a peer that stays full is
        dropped, and `on_stuck` is told why."""
        if self.post_nowait(msg):
            return
        with trio.move_on_after(PEER_SEND_TIMEOUT_S):
            try:
                await self.outbox.send((msg, []))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return
        on_stuck(f"agent for pid {self.pid} ({self.comm}) stopped answering")
        self.chan.close()


async def send_loop(peer: Peer, outbox: trio.MemoryReceiveChannel[Any],
                    scope: trio.CancelScope) -> None:
    """Send the peer's queued messages in order; a send that fails ends the connection."""
    async with outbox:
        try:
            async for msg, fds in outbox:
                if isinstance(msg, Unprotect) and not peer.can_unprotect():
                    close_all(fds)
                    continue  # released meanwhile: nothing is protected there any more
                try:
                    await peer.chan.send(msg, fds)
                except (PeerClosed, ProtocolError, OSError, trio.ClosedResourceError) as e:
                    peer.send_error = f"sending {msg.TYPE}: {e}"
                    scope.cancel()
                    return
                finally:
                    close_all(fds)
        finally:  # fds queued with messages that will never go out
            while True:
                try:
                    _msg, fds = outbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                close_all(fds)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
