"""`uffdsnap snapshot --shm OBJECT`: an in-process coordinator that attaches an agent to every
process that maps OBJECT writable (a separate `uffdsnap agent --attach PID` process each) and
takes one snapshot."""

from __future__ import annotations

import os
import socket as stdsocket
import tempfile
from collections.abc import Callable
from typing import Any

import trio

from uffdsnap.coordinator import Coordinator
from uffdsnap.groups import unwrap_group
from uffdsnap.procfs import SharedObject


async def listen(path: str) -> trio.socket.SocketType:
    """A listening Unix socket at `path`, private to this user."""
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM | stdsocket.SOCK_CLOEXEC)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


async def attach_and_snapshot(obj: SharedObject, output: str, *, overwrite: bool = False,
                              timeout: float = 30.0, delegate: bool = False,
                              on_progress: Callable[[int, int], None] | None = None,
                              test_hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Attach to every writable mapper of `obj` and take one snapshot into `output`."""
    with tempfile.TemporaryDirectory(prefix="uffdsnap-") as tmp:
        path = os.path.join(tmp, "coordinator.sock")
        listener = await listen(path)
        coordinator = Coordinator(obj, protect_timeout=timeout, attach_path=path,
                                  delegate=delegate, on_progress=on_progress,
                                  test_hooks=test_hooks)
        try:
            with unwrap_group():
                async with trio.open_nursery() as nursery:
                    await nursery.start(coordinator.serve, listener)
                    summary = await coordinator.snapshot(output, overwrite=overwrite)
                    nursery.cancel_scope.cancel()
        finally:
            listener.close()
    return summary
