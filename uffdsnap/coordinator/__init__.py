"""The coordinator: owns one snapshot at a time of one shared-memory object (DESIGN §1–§3).

- _policy.py: the rules of a snapshot (hold until T, who must be protected, when to fail), pure;
- _server.py: `Coordinator`, accepting agents and clients, each connection contained;
- _run.py: one snapshot driven through the policy (protect, T, copy, release, verdict);
- _native.py: the native core's part (fault channels, delegated uffds, its events);
- _copy.py: the background copy; _attach.py: attach agents; _peers.py: a joined agent;
- _report.py: summaries and manifest fields.

The coordinator reads the object only through a read-only fd, so it never faults itself, and
speaks only in object offsets.
"""

from uffdsnap.coordinator._copy import CHUNK_BYTES, COPY_WORKERS, copy_windows
from uffdsnap.coordinator._policy import Phase, SnapshotPolicy
from uffdsnap.coordinator._server import Coordinator

__all__ = ["CHUNK_BYTES", "COPY_WORKERS", "Coordinator", "Phase", "SnapshotPolicy",
           "copy_windows"]
