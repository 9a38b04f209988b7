"""Enlisting: a workload hands its own userfaultfd to a dedicated agent process.

This is how a program that knows about uffdsnap takes part (the way vhost-user backends hand
their uffd to QEMU for postcopy): it creates a uffd for itself, passes it over a Unix socket with
SCM_RIGHTS, and closes its own copy, so that the agent holds the only reference and the agent's
death releases the workload. One call from Python:

    with uffdsnap.enlist.enlist("/run/uffdsnap.sock"):
        ...  # every mapping of the coordinator's object in this process is now tracked

Other languages: see docs/enlisting.md (connect, sendmsg one byte with the fd, read one line).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from types import TracebackType

from uffdsnap import testhooks
from uffdsnap.errors import UserError
from uffdsnap.native import scm
from uffdsnap.native.uffd import create_uffd

ENLIST_TIMEOUT_S = 30.0


class EnlistError(UserError):
    """The agent could not take this process into the coordinator's snapshots."""


class Enlistment:
    """A running agent for this process. close() (or leaving the with-block) ends tracking."""

    def __init__(self, agent: subprocess.Popen[bytes], sock: socket.socket):
        self.agent = agent
        self._sock = sock

    @property
    def agent_pid(self) -> int:
        return self.agent.pid

    def close(self, timeout: float = 10.0) -> None:
        """Stop the agent; it releases every protection before it exits."""
        if self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(timeout)
            except subprocess.TimeoutExpired:
                self.agent.kill()  # the kernel releases everything when its uffd closes
                self.agent.wait()
        self._sock.close()

    def __enter__(self) -> Enlistment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def enlist(coordinator: str, timeout: float = ENLIST_TIMEOUT_S,
           test_hooks: testhooks.Hooks | None = None,
           coordinator_user: str | int | None = None) -> Enlistment:
    """Start an agent for this process that joins `coordinator` (its Unix socket path).

    Returns once the agent has joined, so every later snapshot covers this process. Raises
    EnlistError (one line) if the uffd cannot be created or the agent cannot join. The agent
    joins only a coordinator that runs as root, as our user, or as `coordinator_user` (a name
    or uid): whoever else listens at the path is refused before it is sent anything.
    """
    trusted = [] if coordinator_user is None else ["--coordinator-user", str(coordinator_user)]
    uffd, _route = create_uffd()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        agent = subprocess.Popen(
            [sys.executable, "-P", "-m", "uffdsnap", "agent", "--coordinator", coordinator,
             *trusted, "--enlist-fd", str(theirs.fileno()), *testhooks.argv(test_hooks)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    except BaseException:
        os.close(uffd)
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        scm.send_fds(ours, b"E", [uffd])
    finally:
        os.close(uffd)  # the agent must hold the only reference
    ours.settimeout(timeout)
    try:
        reply = ours.makefile("rb").readline().decode(errors="replace").strip()
    except TimeoutError:
        reply = f"error: agent did not answer within {timeout:g} s"
    if reply != "ok":
        Enlistment(agent, ours).close()
        raise EnlistError(reply.removeprefix("error: ") or "agent exited without answering")
    return Enlistment(agent, ours)
