"""The findings and the verdict: Check and Route records, Diagnosis, and the checks that judge
facts without starting anything.

A level says what a failed check costs, so the verdict (can we snapshot at all, can we attach)
is a pure function of the checks; the CLI and tests rely on that to judge made-up findings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from uffdsnap.doctor._facts import (
    CAP_SYS_PTRACE,
    UNPRIVILEGED_SYSCTL,
    YAMA_SYSCTL,
    has_cap,
    read_int,
)
from uffdsnap.native import uffd as uf

# Check levels: what fails when a check of that level fails.
REQUIRED = "required"  # no snapshot of any kind is possible here
ATTACH = "attach"  # attaching to unmodified processes (`uffdsnap snapshot`) is not possible
USEFUL = "useful"  # snapshots work, with less coverage or convenience
INFO = "info"  # facts, never a failure

USEFUL_FEATURES = ("EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "EVENT_UNMAP", "THREAD_ID",
                   "WP_UNPOPULATED")
REQUIRED_FEATURE_NAMES = uf.feature_names(uf.REQUIRED_FEATURES)


@dataclass
class Check:
    """One finding: what was checked, whether it passed, and what to do when it did not."""

    name: str
    ok: bool
    level: str
    detail: str
    fix: str = ""
    skipped: bool = False  # not run because an earlier check failed (not a cause of its own)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "level": self.level, "detail": self.detail,
                "fix": self.fix, "skipped": self.skipped}


@dataclass
class Route:
    """One way of creating a uffd (the syscall or /dev/userfaultfd) and why it does or does not
    work for this process."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass
class Diagnosis:
    """Everything `doctor` found. `ok` means snapshots are possible here."""

    kernel: str
    machine: str
    features: list[str]
    routes: dict[str, Route]
    checks: list[Check]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.level == REQUIRED)

    @property
    def attach_ok(self) -> bool:
        return self.ok and all(c.ok for c in self.checks if c.level == ATTACH)

    def reasons(self) -> list[str]:
        """One line per failed required check that is a cause (not skipped): what is wrong and
        what to do."""
        return [f"{c.name}: {c.detail}" + (f" — {c.fix}" if c.fix else "")
                for c in self.checks if c.level == REQUIRED and not c.ok and not c.skipped]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kernel": self.kernel,
            "machine": self.machine,
            "features": self.features,
            "routes": {name: r.to_json() for name, r in self.routes.items()},
            "modes": {"enlist": self.ok, "attach": self.attach_ok},
            "checks": [c.to_json() for c in self.checks],
            "reasons": self.reasons(),
            **self.facts,
        }


# ---- verdicts on facts ----------------------------------------------------------------------


def check_features(mask: int | None, status: dict[str, str]) -> list[Check]:
    """The required and the useful feature bits, by name."""
    if mask is None:
        return [Check("features", False, REQUIRED, "skipped: no uffd could be created",
                      skipped=True)]
    names = set(uf.feature_names(mask))
    missing = [n for n in REQUIRED_FEATURE_NAMES if n not in names]
    if missing:
        required = Check("features", False, REQUIRED,
                         f"kernel lacks {', '.join(missing)} (write-protect of shared memory)",
                         "use Linux 5.19 or later (6.1+ recommended)")
    else:
        required = Check("features", True, REQUIRED, " ".join(REQUIRED_FEATURE_NAMES))
    absent = [n for n in USEFUL_FEATURES if n not in names]
    notes = []
    if "EVENT_FORK" in names and not has_cap(CAP_SYS_PTRACE, status):
        notes.append("EVENT_FORK is offered but enabling it needs CAP_SYS_PTRACE: children "
                     "forked during a snapshot would go untracked")
    detail = " ".join(n for n in USEFUL_FEATURES if n in names) or "none"
    if absent:
        detail += f"; missing: {' '.join(absent)}"
    useful = Check("useful features", not absent and not notes, USEFUL,
                   "; ".join([detail, *notes]),
                   "" if not (absent or notes) else
                   "a newer kernel / CAP_SYS_PTRACE; snapshots then also follow fork, mremap, "
                   "munmap and MADV_REMOVE")
    return [required, useful]


_YAMA = {
    0: "classic ptrace rules (same uid, or CAP_SYS_PTRACE)",
    1: "restricted: only descendants, unless CAP_SYS_PTRACE",
    2: "admin-only: CAP_SYS_PTRACE needed",
    3: "no attach at all",
}


def check_ptrace(status: dict[str, str]) -> tuple[Check, dict[str, Any]]:
    """Whether we may ptrace-attach to (and take fds from) the processes we snapshot."""
    scope = read_int(YAMA_SYSCTL)
    cap = has_cap(CAP_SYS_PTRACE, status)
    facts = {"yama_ptrace_scope": scope, "cap_sys_ptrace": cap}
    yama = "no Yama LSM" if scope is None else f"Yama ptrace_scope={scope}"
    if scope == 3:
        return Check("ptrace", False, ATTACH, f"{yama}: {_YAMA[3]}",
                     "attach is impossible until reboot; workloads can still enlist"), facts
    if cap:
        return Check("ptrace", True, ATTACH, f"{yama}; CAP_SYS_PTRACE in effect: any process"), \
            facts
    if scope == 2:
        return Check("ptrace", False, ATTACH, f"{yama}: {_YAMA[2]}, not in effect",
                     "run as root or with CAP_SYS_PTRACE; workloads can still enlist"), facts
    if scope == 1:
        return Check("ptrace", False, ATTACH, f"{yama}: {_YAMA[1]}, not in effect",
                     "sysctl -w kernel.yama.ptrace_scope=0, or run with CAP_SYS_PTRACE; "
                     "workloads can still enlist"), facts
    rule = _YAMA.get(scope or 0, "")
    return Check("ptrace", True, ATTACH,
                 f"{yama}: {rule}; without CAP_SYS_PTRACE only processes of uid {os.getuid()}",
                 ""), facts


def check_unprivileged_targets(routes: dict[str, Route]) -> Check:
    """Attach runs userfaultfd() with the target's credentials: say which targets that reaches."""
    unpriv = read_int(UNPRIVILEGED_SYSCTL)
    if unpriv == 1:
        return Check("unprivileged targets", True, USEFUL,
                     "vm.unprivileged_userfaultfd=1: any target can create its own uffd")
    if routes["device"].ok:
        return Check("unprivileged targets", True, USEFUL,
                     "targets without CAP_SYS_PTRACE get a uffd through our /dev/userfaultfd fd")
    return Check("unprivileged targets", False, USEFUL,
                 f"vm.unprivileged_userfaultfd={unpriv} and no /dev/userfaultfd access: only "
                 "targets with CAP_SYS_PTRACE (root processes) can be attached",
                 "give uffdsnap access to /dev/userfaultfd")
