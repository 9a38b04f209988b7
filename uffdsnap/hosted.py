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
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from uffdsnap import testhooks
from uffdsnap.coordinator import Coordinator
from uffdsnap.groups import unwrap_group
from uffdsnap.procfs import SharedObject


@dataclass(frozen=True)
class Host:
    coordinator: Coordinator
    socket_path: str  # where agents and clients reach it


async def listen(path: str) -> trio.socket.SocketType:
    """A listening Unix socket at `path`, private to this user."""
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM | stdsocket.SOCK_CLOEXEC)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


@asynccontextmanager
async def hosted(obj: SharedObject, *, socket_path: str | None = None, attach: bool = True,
                 protect_timeout: float = 30.0, join_timeout: float | None = None,
                 delegate: bool = False,
                 on_progress: Callable[[int, int], None] | None = None,
                 test_hooks: testhooks.Hooks | None = None) -> AsyncIterator[Host]:
    """A coordinator for `obj`, serving on `socket_path` (a fresh private one if None) for the
    duration of the block; with `attach`, it attaches an agent to every writable mapper without
    one at each snapshot. Exceptions leave the block as themselves, not as groups."""
    async with AsyncExitStack() as stack:
        if socket_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="uffdsnap-"))
            socket_path = os.path.join(tmp, "coordinator.sock")
        listener = await listen(socket_path)
        stack.callback(listener.close)
        coordinator = Coordinator(obj, protect_timeout=protect_timeout,
                                  join_timeout=join_timeout,
                                  attach_path=socket_path if attach else None,
                                  delegate=delegate, on_progress=on_progress,
                                  test_hooks=test_hooks)
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
                              **options: Any) -> dict[str, Any]:
    """Attach to every writable mapper of `obj` and take one snapshot into `output`."""
    async with hosted(obj, **options) as host:
        return await host.coordinator.snapshot(output, overwrite=overwrite)
