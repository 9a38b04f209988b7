"""Host a coordinator and take snapshots: the one way the CLI, the demo, the bench and the tests
run a coordinator in their own process.

    async with hosted(obj) as host:            # serving on a private socket
        summary = await host.coordinator.snapshot("out.img")

`attach_and_snapshot` is `uffdsnap snapshot --shm`: attach to every writable mapper, one
snapshot, done.
"""

from __future__ import annotations

import os
import socket as stdsocket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from uffdsnap import testhooks
from uffdsnap.agent._host import fork_host
from uffdsnap.coordinator import Coordinator
from uffdsnap.coordinator._accept import MAX_CONNECTIONS
from uffdsnap.coordinator._attach import ForkedHost
from uffdsnap.groups import unwrap_group
from uffdsnap.native.core import FAULT_DEADLINE_MS
from uffdsnap.procfs import SharedObject
from uffdsnap.stream import StreamOptions

FAULT_DEADLINE_S = FAULT_DEADLINE_MS / 1000  # the longest a writer may wait on us, by default
ForkedHostFds = tuple[int, int, int, int]  # pid, and our ends of its stdin, stdout, stderr


@contextmanager
def forked_agent_host(test_hooks: testhooks.Hooks | None = None
                      ) -> Iterator[tuple[str, ForkedHostFds]]:
    """Before trio runs: a private socket path for a coordinator, and an agent host for it,
    forked from this process (ready at once: no interpreter to start; see
    agent._host.fork_host). Pass both to `hosted` (socket_path=, agent_host=)."""
    with tempfile.TemporaryDirectory(prefix="uffdsnap-") as tmp:
        path = os.path.join(tmp, "coordinator.sock")
        yield path, fork_agent_host(path, test_hooks)


def fork_agent_host(socket_path: str, test_hooks: testhooks.Hooks | None = None
                    ) -> ForkedHostFds:
    """Before trio runs: an agent host for the coordinator that will serve at `socket_path`,
    forked from this process (see agent._host.fork_host)."""
    return fork_host(socket_path, (test_hooks or {}).get("agent") or {})


@dataclass(frozen=True)
class Host:
    coordinator: Coordinator
    socket_path: str  # where agents and clients reach it


async def listen(path: str, group: int | None = None) -> trio.socket.SocketType:
    """A listening Unix socket at `path`, private to this user, or (`group`) open to that group
    too (mode 0660): who may do what once connected is then _trust's to decide."""
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM | stdsocket.SOCK_CLOEXEC)
    await sock.bind(path)
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, 0o600 if group is None else 0o660)
    sock.listen(128)
    return sock


@asynccontextmanager
async def hosted(obj: SharedObject, *, socket_path: str | None = None, attach: bool = True,
                 protect_timeout: float = 30.0, join_timeout: float | None = None,
                 delegate: bool = False,
                 on_progress: Callable[[int, int], None] | None = None,
                 test_hooks: testhooks.Hooks | None = None,
                 agent_host: ForkedHostFds | None = None, socket_group: int | None = None,
                 clients_gid: int | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 fault_deadline: float = FAULT_DEADLINE_S,
                 strict: bool = False) -> AsyncIterator[Host]:
    """A coordinator for `obj`, serving on `socket_path` (a fresh private one if None) for the
    duration of the block; with `attach`, it attaches an agent to every writable mapper without
    one at each snapshot (through `agent_host` if given: see forked_agent_host; else a host
    started as a program, at the priority of the calling thread, as a forked one has). Exceptions
    leave the block as themselves, not as groups."""
    async with AsyncExitStack() as stack:
        if socket_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="uffdsnap-"))
            socket_path = os.path.join(tmp, "coordinator.sock")
        listener = await listen(socket_path, socket_group)
        stack.callback(listener.close)
        coordinator = Coordinator(obj, protect_timeout=protect_timeout,
                                  join_timeout=join_timeout,
                                  attach_path=socket_path if attach else None,
                                  delegate=delegate, on_progress=on_progress,
                                  test_hooks=test_hooks,
                                  agent_host=ForkedHost(*agent_host) if agent_host else None,
                                  clients_gid=clients_gid, max_connections=max_connections,
                                  fault_deadline=fault_deadline, strict=strict)
        with unwrap_group():
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.serve, listener)
                try:
                    yield Host(coordinator, socket_path)
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await coordinator.aclose()


async def attach_and_snapshot(obj: SharedObject, output: str, *, overwrite: bool = False,
                              stream: StreamOptions | None = None,
                              **options: Any) -> dict[str, Any]:
    """Attach to every writable mapper of `obj` and take one snapshot into `output` (or, with
    `stream`, streamed to a receiver)."""
    async with hosted(obj, **options) as host:
        return await host.coordinator.snapshot(output, overwrite=overwrite, stream=stream)
