"""Can this machine (or container) take snapshots, and if not, why: the library behind `doctor`.

Every answer comes from asking the real kernel — creating a uffd each way, negotiating features,
and a live write-protect round trip between two processes — never from version numbers alone, so
a seccomp filter, a missing device node or a dropped capability shows up as what it is. Each check
says what it found and, when it fails, what to do about it. Nothing here can hang: every wait on
a child process has a deadline, and closing our uffd releases any writer we left blocked.

The public API is re-exported here flat; the implementation is private:
  _checks    Check, Route, Diagnosis (the verdict) and the checks that judge facts
  _facts     reading /proc and /sys: capabilities, sysctls, huge page pools, container signs
  _probes    live probes: uffd creation routes, the cross-process write-protect round trip,
             pidfd_getfd, hugetlb memfd, the native core
  _escapes   the escape audit of one object (`doctor --shm`), as checks
  _diagnose  diagnose(), which runs them all
The human table is drawn by the CLI command (uffdsnap/cli/commands/doctor.py).
"""

from uffdsnap.doctor._checks import (
    ATTACH,
    INFO,
    REQUIRED,
    REQUIRED_FEATURE_NAMES,
    USEFUL,
    USEFUL_FEATURES,
    Check,
    Diagnosis,
    Route,
    check_features,
    check_ptrace,
    check_unprivileged_targets,
)
from uffdsnap.doctor._diagnose import diagnose
from uffdsnap.doctor._escapes import check_escapes, escape_checks
from uffdsnap.doctor._facts import (
    CAP_SYS_PTRACE,
    HUGEPAGES_SYSFS,
    UNPRIVILEGED_SYSCTL,
    YAMA_SYSCTL,
    container_facts,
    effective_caps,
    has_cap,
    hugetlb_facts,
    proc_status,
    read_int,
)
from uffdsnap.doctor._probes import (
    MFD_HUGETLB,
    ProbeFailed,
    check_hugetlb,
    check_native_core,
    probe_child,
    probe_device_route,
    probe_live,
    probe_pidfd_getfd,
    probe_syscall_route,
)

__all__ = [
    "ATTACH",
    "CAP_SYS_PTRACE",
    "HUGEPAGES_SYSFS",
    "INFO",
    "MFD_HUGETLB",
    "REQUIRED",
    "REQUIRED_FEATURE_NAMES",
    "UNPRIVILEGED_SYSCTL",
    "USEFUL",
    "USEFUL_FEATURES",
    "YAMA_SYSCTL",
    "Check",
    "Diagnosis",
    "ProbeFailed",
    "Route",
    "check_escapes",
    "check_features",
    "check_hugetlb",
    "check_native_core",
    "check_ptrace",
    "check_unprivileged_targets",
    "container_facts",
    "diagnose",
    "effective_caps",
    "escape_checks",
    "has_cap",
    "hugetlb_facts",
    "probe_child",
    "probe_device_route",
    "probe_live",
    "probe_pidfd_getfd",
    "probe_syscall_route",
    "proc_status",
    "read_int",
]
