"""The rules of one snapshot, as a pure state machine: events in, decisions out.

This is where the consistency rule of DESIGN §2 lives: no fault is served and no page saved
until every mapping of every process is protected (T); who must be protected before T; which
fault is held; when a process that leaves is harmless and when it fails the snapshot; and what
must be true at the end for the image to be published. No trio, no file descriptors, no ctypes:
the coordinator's I/O (`_run.py`, `_server.py`) feeds it what happened and does what it says,
and tests/unit/test_policy.py drives whole snapshots through it as event sequences.

Peers are named by opaque keys chosen by the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

Key = Hashable


class Phase(enum.Enum):
    JOINING = "joining"  # agents are being started or joining; nothing is protected
    PROTECTING = "protecting"  # `protect` sent; faults are held
    COPYING = "copying"  # after T: faults are served, the rest is scanned
    RELEASING = "releasing"  # done or failed: every agent un-protects and reports
    DONE = "done"


# phase -> phases it may go to
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.JOINING: frozenset({Phase.PROTECTING, Phase.RELEASING}),
    Phase.PROTECTING: frozenset({Phase.COPYING, Phase.RELEASING}),
    Phase.COPYING: frozenset({Phase.RELEASING}),
    Phase.RELEASING: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


class PolicyError(RuntimeError):
    """The caller asked for something the state machine does not allow (a bug, not input)."""


class FaultAction(enum.Enum):
    HOLD = "hold"  # before T: keep it; it is served when T is declared
    SAVE = "save"  # save the page, then wake the faulting process (and un-protect everywhere)
    WAKE = "wake"  # saved already, or stale (no snapshot, or it is over): just wake


class BeforeT(enum.Enum):
    DECLARE_T = "declare T"  # everyone who maps the object writable is protected
    WAIT_FOR_FORKS = "wait for forks"  # untracked children of tracked processes: wait a moment
    ATTACH = "attach"  # attach the untracked mappers, protect them, look again
    FAIL = "fail"


@dataclass
class Member:
    """One agent's part in this snapshot."""

    pid: int
    comm: str = ""
    protected: bool = False
    mappings: int = 0
    protect_ns: int = 0
    children: tuple[int, ...] = ()  # processes it tracks besides its own (forked children)
    children_seen: set[int] = field(default_factory=set)  # every child it tracked this run
    lost_own: bool = False  # its own process lives on untracked (it exec'd)
    released: bool = False
    reported: bool = False  # its `released` arrived (with its audit)
    escapes: tuple[str, ...] = ()

    @property
    def pids(self) -> set[int]:
        return {*(() if self.lost_own else (self.pid,)), *self.children}


@dataclass(frozen=True)
class HeldFault:
    key: Key
    offset: int
    seen_ns: int


@dataclass
class SnapshotPolicy:
    """One snapshot's state and rules. `serve_before_t` is a test hook (wrong on purpose)."""

    run_id: int
    page_size: int
    serve_before_t: bool = False
    max_attach_rounds: int = 16  # rounds of attaching newcomers before T (fork chains)
    phase: Phase = Phase.JOINING
    failure: str | None = None
    members: dict[Key, Member] = field(default_factory=dict)
    departed: list[tuple[Key, Member, str]] = field(default_factory=list)  # and why
    held: list[HeldFault] = field(default_factory=list)
    saved: set[int] = field(default_factory=set)  # pages this policy had saved
    faults: int = 0
    duplicate_faults: int = 0
    attach_rounds: int = 0

    # ---- phases ---------------------------------------------------------------------------

    def _to(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise PolicyError(f"snapshot {self.run_id}: {self.phase.value} -> {phase.value}")
        self.phase = phase

    def fail(self, reason: str) -> bool:
        """Record why the snapshot cannot be proven (the first reason wins); True if this was
        the first. A failed snapshot is released and never published."""
        if self.failure is None:
            self.failure = reason
            return True
        return False

    # ---- membership -----------------------------------------------------------------------

    def join(self, key: Key, pid: int, comm: str, maps_object_writable: bool) -> bool:
        """An agent joined while this snapshot runs. Returns whether it must be sent `protect`
        now. After T one whose process maps the object may have written unsaved pages
        untracked: that fails the snapshot; one that does not is left for the next."""
        member = Member(pid, comm)
        if self.phase == Phase.JOINING:
            self.members[key] = member
            return False
        if self.phase == Phase.PROTECTING:
            self.members[key] = member
            return True
        if maps_object_writable and self.phase == Phase.COPYING:
            self.fail(f"process {pid} ({comm}) joined after T: its earlier writes were not "
                      "tracked")
        return False

    def tracked(self, key: Key, pids: Iterable[int]) -> None:
        """The agent now tracks exactly `pids` (its own process unless it exec'd, and children
        forked while protected)."""
        member = self.members.get(key)
        if member is not None:
            pids = tuple(pids)
            member.children = tuple(p for p in pids if p != member.pid)
            member.children_seen.update(member.children)
            member.lost_own = member.pid not in pids

    def gone(self, key: Key, reason: str) -> None:
        """The agent's processes all exited: nothing of them can write any more."""
        member = self.members.pop(key, None)
        if member is not None:
            member.released = True
            self.departed.append((key, member, reason))

    def lost(self, key: Key, processes_alive: bool, why: str) -> None:
        """The agent's connection ended. Harmless if its processes are gone; otherwise their
        writes are no longer tracked, which fails a snapshot that has not reached release."""
        member = self.members.get(key)
        if member is None or member.released:
            return
        if not processes_alive:
            self.gone(key, "process exited")
            return
        member.released = True  # nothing is left to release there
        if self.phase != Phase.RELEASING:
            self.fail(why or f"agent for pid {member.pid} ({member.comm}) left while its "
                      "process lives: its writes are no longer tracked")

    def tracked_pids(self) -> set[int]:
        return {pid for m in self.members.values() for pid in m.pids}

    # ---- protecting and T -----------------------------------------------------------------

    def start_protect(self) -> list[Key]:
        """Enter the protect phase; returns the agents to send `protect` (every member)."""
        self._to(Phase.PROTECTING)
        for m in self.members.values():
            m.protected = False
        return list(self.members)

    def protected(self, key: Key, mappings: int, protect_ns: int) -> list[HeldFault]:
        """An agent reports its processes protected. Returns held faults to serve now, which is
        none unless the serve_before_t test hook is on."""
        member = self.members.get(key)
        if member is None or self.phase != Phase.PROTECTING:
            return []
        member.protected, member.mappings, member.protect_ns = True, mappings, protect_ns
        if not self.serve_before_t:
            return []
        mine = [h for h in self.held if h.key == key]
        self.held = [h for h in self.held if h.key != key]
        return mine

    def all_protected(self) -> bool:
        return self.phase == Phase.PROTECTING and all(m.protected for m in self.members.values())

    def unprotected(self) -> list[int]:
        return sorted(m.pid for m in self.members.values() if not m.protected)

    def before_t(self, untracked: list[str], children_of_tracked: bool, can_attach: bool,
                 forks_settled: bool) -> BeforeT:
        """Every member is protected; `untracked` names the processes that map the object
        writable without an agent (`children_of_tracked`: some are children of tracked
        processes, whose agents report them a moment after the fork; `forks_settled`: that
        moment has passed). Decide whether T can be declared."""
        if not self.all_protected():
            raise PolicyError("before_t while some agents have not protected")
        if not untracked:
            return BeforeT.DECLARE_T
        if children_of_tracked and not forks_settled:
            return BeforeT.WAIT_FOR_FORKS
        if can_attach and self.attach_rounds < self.max_attach_rounds:
            self.attach_rounds += 1
            return BeforeT.ATTACH
        why = (f" ({self.attach_rounds} rounds of attaching each met new ones: processes "
               "that replace themselves faster than they can be attached)"
               if can_attach and self.attach_rounds else "")
        self.fail(f"untracked process(es) map the object writable before T: "
                  f"{', '.join(untracked)}{why}")
        return BeforeT.FAIL

    def skip_protection(self) -> None:
        """Test hook no_protect, wrong on purpose: count every member protected, protect none."""
        for m in self.members.values():
            m.protected = True

    def declare_t(self) -> list[HeldFault]:
        """T: from now on faults are served. Returns the held faults, to be served first."""
        if not self.all_protected():
            raise PolicyError("T declared before every agent protected")
        self._to(Phase.COPYING)
        held, self.held = self.held, []
        self.saved |= {h.offset // self.page_size for h in held}  # the caller saves them now
        return held

    def protect_timed_out(self, timeout_s: float) -> None:
        self.fail(f"agents for pids {self.unprotected()} did not protect within "
                  f"{timeout_s:g} s")

    # ---- bounded waits: the fault deadline ---------------------------------------------

    def oldest_held(self) -> HeldFault | None:
        """The fault held longest on the main connection (None: none held)."""
        return min(self.held, key=lambda h: h.seen_ns, default=None)

    def writer_overdue(self, who: str, waited_s: float, deadline_s: float,
                       answerer: str) -> str:
        """Why the snapshot fails when a writer of a tracked process (`who`) has waited
        `waited_s` on a write fault, past the fault deadline: before T the protect phase kept
        it (the agents not protected yet are named), after T `answerer` stopped answering.
        (The caller fails the snapshot with it; its release wakes the writer.)"""
        if self.phase == Phase.PROTECTING and self.unprotected():
            return (f"agents for pids {self.unprotected()} did not protect within "
                    f"{deadline_s:g} s, the fault deadline, while {who} waited on a held "
                    "write fault")
        if self.phase == Phase.PROTECTING:
            return (f"T was not reached within the fault deadline ({deadline_s:g} s) while "
                    f"{who} waited on a held write fault")
        return (f"{who} waited {waited_s:.1f} s on a write fault, past the fault deadline "
                f"({deadline_s:g} s): {answerer} stopped answering")

    @staticmethod
    def agent_stopped(agent: str, stopped_s: float, deadline_s: float) -> str:
        """Why the snapshot fails when an agent's process has been stopped (SIGSTOP, a tracer)
        past the fault deadline: it can answer nothing (protect, faults, release) until someone
        continues it, so the snapshot does not wait for it."""
        return (f"{agent} has been stopped for {stopped_s:.1f} s (SIGSTOP or a tracer), past "
                f"the fault deadline ({deadline_s:g} s): it cannot answer")

    # ---- faults ---------------------------------------------------------------------------

    def fault(self, key: Key, offset: int, seen_ns: int, already_saved: bool) -> FaultAction:
        """A write fault forwarded on the main connection (`already_saved`: the page is in the
        image already, as the native core's map says)."""
        if self.phase not in (Phase.PROTECTING, Phase.COPYING):
            return FaultAction.WAKE  # stale: read before an earlier release, never saved
        self.faults += 1
        member = self.members.get(key)
        if self.phase == Phase.PROTECTING:
            if self.serve_before_t and member is not None and member.protected:
                return self._save_or_wake(offset, already_saved)
            self.held.append(HeldFault(key, offset, seen_ns))
            return FaultAction.HOLD
        return self._save_or_wake(offset, already_saved)

    def _save_or_wake(self, offset: int, already_saved: bool) -> FaultAction:
        page = offset // self.page_size
        if already_saved or page in self.saved:
            self.duplicate_faults += 1
            return FaultAction.WAKE
        self.saved.add(page)
        return FaultAction.SAVE

    def removed(self, unsaved_holes: list[int]) -> None:
        """MADV_REMOVE hit pages: those still unsaved that are holes now lost their content at
        T with no fault (MADV_DONTNEED raises the same event but keeps the data)."""
        if unsaved_holes:
            self.fail(f"pages at offset {unsaved_holes[0] * self.page_size:#x} were removed "
                      "(MADV_REMOVE or a hole punch) during the snapshot: not trackable")

    # ---- release and verdict --------------------------------------------------------------

    def start_release(self) -> list[Key]:
        """Done or failed: returns the agents to send `release` (every one not released)."""
        self._to(Phase.RELEASING)
        self.held = []
        return [k for k, m in self.members.items() if not m.released]

    def released(self, key: Key, escapes: Iterable[str]) -> None:
        member = self.members.get(key)
        if member is not None:
            member.released = member.reported = True
            member.escapes = tuple(escapes)

    def all_released(self) -> bool:
        return all(m.released for m in self.members.values())

    def verdict(self, alive: dict[Key, bool], untracked_now: list[str]) -> str | None:
        """After release: why the image may not be published, or None. `alive`: whether each
        member's processes still exist; `untracked_now` names writable mappers without an
        agent."""
        self._to(Phase.DONE)
        if self.failure:
            return self.failure
        escapes = [e for m in self.members.values() for e in m.escapes]
        if escapes:
            more = f" (and {len(escapes) - 1} more)" if len(escapes) > 1 else ""
            return self._fail(f"writes may have escaped tracking: {escapes[0]}{more}")
        silent = [m.pid for k, m in self.members.items() if not m.reported and alive.get(k)]
        if silent:
            return self._fail(f"agents for pids {silent} did not confirm their release: "
                              "whether every mapping stayed protected is unknown")
        if untracked_now:
            return self._fail("untracked process(es) map the object writable during the "
                              f"snapshot: {', '.join(untracked_now)}")
        return None

    def _fail(self, reason: str) -> str:
        self.fail(reason)
        return reason
