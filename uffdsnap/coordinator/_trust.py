"""Who may ask what of a coordinator, decided from the kernel's word on who connected
(SO_PEERCRED), never from what a peer says about itself.

- A client (asks for snapshots, which a coordinator writes with its own rights) must be the
  coordinator's own user, root, or a member of the group the operator named (`--clients-group`).
- An agent speaks for the process whose pid it names. It must be the coordinator's own user or
  root (attach agents are the coordinator's own), or have exactly the target's uids (real,
  effective and saved: ptrace's own rule for who may touch another process): a workload of
  another user speaks only for processes of its own user.
- Pids a peer names are pids of its own PID namespace (an agent in a container names its
  workload as the container sees it). The kernel's word on the peer (SO_PEERCRED, its pid in
  ours) gives its namespace; a named pid is the process of that number *in that namespace* (or
  one below it), found through /proc/PID/status NSpid, or nothing: never a process of ours that
  happens to carry the number.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from uffdsnap.procfs import all_pids, ns_pids, parent_pid, pid_namespace, process_ids

NS_GET_PARENT = 0xB702  # ioctl on a namespace fd: an fd of its parent PID namespace


@dataclass(frozen=True)
class Credentials:
    """What the kernel recorded of a peer when it connected."""

    pid: int
    uid: int
    gid: int


def client_refusal(peer: Credentials, owner_uid: int, clients_gid: int | None) -> str | None:
    """Why `peer` may not be a client of a coordinator run by `owner_uid` (None: it may)."""
    if peer.uid in (0, owner_uid):
        return None
    if clients_gid is not None:
        try:
            _uids, gids, groups = process_ids(peer.pid)
        except ProcessLookupError:
            return "the client is gone"
        if clients_gid in (peer.gid, *gids[:1], *groups):
            return None
    allowed = f"uid {owner_uid}" + (f" or group {clients_gid}" if clients_gid is not None
                                     else "")
    return f"uid {peer.uid} may not ask this coordinator for snapshots (its clients: {allowed})"


def agent_refusal(peer: Credentials, owner_uid: int, target: int) -> str | None:
    """Why `peer` may not be the agent of process `target` (None: it may)."""
    if peer.uid in (0, owner_uid):
        return None
    try:
        uids, _gids, _groups = process_ids(target)
    except ProcessLookupError:
        return f"pid {target}: no such process"
    if uids[:3] and all(u == peer.uid for u in uids[:3]):
        return None
    return (f"uid {peer.uid} may not speak for pid {target} (uids {'/'.join(map(str, uids[:3]))})"
            ": an agent speaks only for processes of its own user")


@dataclass(frozen=True)
class PidView:
    """How one peer names processes: pids of its own PID namespace, `depth` namespaces below
    ours (0: ours, where pids need no translation)."""

    peer: int  # the peer's pid in our namespace (SO_PEERCRED)
    depth: int
    namespace: tuple[int, int]  # its PID namespace, (device, inode)

    def ours(self, claimed: int) -> int | None:
        """Our pid of the process the peer calls `claimed`; None if it has no such process."""
        if self.depth == 0:
            return claimed if claimed > 0 else None
        for pid in _candidates(self.peer):
            try:
                pids = ns_pids(pid)
            except ProcessLookupError:
                continue
            if (len(pids) > self.depth and pids[self.depth] == claimed
                    and _namespace_above(pid, len(pids) - 1 - self.depth) == self.namespace):
                return pid
        return None

    def translate(self, claimed: Iterable[int]) -> tuple[int, ...]:
        """Our pids of the processes the peer names (those it names wrongly, or that exited,
        left out)."""
        return tuple(pid for pid in map(self.ours, claimed) if pid is not None)


def pid_view(peer_pid: int) -> PidView:
    """The view of the peer whose pid (in our namespace, as SO_PEERCRED gives it) is
    `peer_pid`. ProcessLookupError if it is gone or outside our namespace (pid 0)."""
    if peer_pid <= 0:
        raise ProcessLookupError(peer_pid)
    depth = len(ns_pids(peer_pid)) - 1
    return PidView(peer_pid, depth, pid_namespace(peer_pid))


def _candidates(peer: int) -> Iterator[int]:
    """Where the process a peer names usually is (the peer itself, its parent: an enlisted
    workload), then every process."""
    first = (peer, parent_pid(peer))
    yield from first
    yield from (pid for pid in all_pids() if pid not in first)


def _namespace_above(pid: int, levels: int) -> tuple[int, int] | None:
    """The PID namespace `levels` above `pid`'s own (0: its own); None if it is gone."""
    try:
        if levels == 0:
            return pid_namespace(pid)
        fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # (ProcessLookupError included)
        return None
    try:
        for _ in range(levels):
            parent = fcntl.ioctl(fd, NS_GET_PARENT)
            os.close(fd)
            fd = parent
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTTY, errno.EINVAL):
            return None
        raise
    finally:
        os.close(fd)


def admit_agent(peer: Credentials, owner_uid: int, claimed: int) -> tuple[int, PidView] | str:
    """For a peer that asks to be the agent of the process it calls `claimed`: that process's
    pid in our namespace and the peer's view (to translate the pids it names later), or why it
    may not."""
    try:
        view = pid_view(peer.pid)
    except ProcessLookupError:
        return "the agent is gone, or lives in a PID namespace we cannot see"
    target = view.ours(claimed)
    if target is None:
        where = " in its PID namespace" if view.depth else ""
        return f"pid {claimed}: no such process{where}"
    refusal = agent_refusal(peer, owner_uid, target)
    return refusal if refusal is not None else (target, view)
