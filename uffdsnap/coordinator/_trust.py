"""Who may ask what of a coordinator, decided from the kernel's word on who connected
(SO_PEERCRED), never from what a peer says about itself.

- A client (asks for snapshots, which a coordinator writes with its own rights) must be the
  coordinator's own user, root, or a member of the group the operator named (`--clients-group`).
- An agent speaks for the process whose pid it names. It must be the coordinator's own user or
  root (attach agents are the coordinator's own), or have exactly the target's uids (real,
  effective and saved: ptrace's own rule for who may touch another process): a workload of
  another user speaks only for processes of its own user.
"""

from __future__ import annotations

from dataclasses import dataclass

from uffdsnap.procfs import process_ids


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
