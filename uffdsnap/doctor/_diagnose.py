"""diagnose(): run every fact reader, probe and check, in the order their dependencies need."""

from __future__ import annotations

import os

from uffdsnap.doctor._checks import (
    INFO,
    REQUIRED,
    Check,
    Diagnosis,
    check_features,
    check_ptrace,
    check_unprivileged_targets,
)
from uffdsnap.doctor._escapes import check_escapes
from uffdsnap.doctor._facts import (
    CAP_SYS_PTRACE,
    UNPRIVILEGED_SYSCTL,
    container_facts,
    effective_caps,
    has_cap,
    proc_status,
    read_int,
)
from uffdsnap.doctor._probes import (
    check_hugetlb,
    check_native_core,
    probe_device_route,
    probe_live,
    probe_pidfd_getfd,
    probe_syscall_route,
)
from uffdsnap.native import uffd as uf
from uffdsnap.native.libc import KernelError
from uffdsnap.procfs import SharedObject

_CONTAINER_FIX = ("in a container: run it with --cap-add SYS_PTRACE (and a seccomp profile that "
                  "allows userfaultfd), or pass --device /dev/userfaultfd")


def diagnose(timeout: float = 10.0, shm: SharedObject | None = None) -> Diagnosis:
    """Run every check. `timeout` bounds each wait on a probe child; `shm`: also audit that
    object for escapes (who could write to it untracked)."""
    status = proc_status()
    uname = os.uname()
    routes = {"syscall": probe_syscall_route(status), "device": probe_device_route(status)}
    container = container_facts(status)
    working = [name for name, r in routes.items() if r.ok]
    checks = [Check("kernel", True, INFO, f"Linux {uname.release} {uname.machine}")]
    if working:
        checks.append(Check("userfaultfd", True, REQUIRED, f"works via {', '.join(working)}"))
    else:
        fix = "make one route work (see each route)"
        if container["likely"]:
            fix += f"; {_CONTAINER_FIX}"
        checks.append(Check("userfaultfd", False, REQUIRED,
                            "neither the syscall nor /dev/userfaultfd works", fix))

    mask: int | None = None
    if working:
        try:
            mask = uf.supported_features()
        except KernelError as e:
            checks.append(Check("features", False, REQUIRED, str(e), ""))
    if mask is not None or not working:
        checks += check_features(mask, status)

    if mask is not None and mask & uf.REQUIRED_FEATURES == uf.REQUIRED_FEATURES:
        checks.append(probe_live(mask, timeout))
    else:
        checks.append(Check("live probe", False, REQUIRED,
                            "skipped: needs a working uffd route and the required features",
                            skipped=True))

    checks.append(check_native_core())
    ptrace, ptrace_facts = check_ptrace(status)
    checks += [ptrace, probe_pidfd_getfd(timeout), check_unprivileged_targets(routes)]
    hugetlb, huge_facts = check_hugetlb()
    checks.append(hugetlb)
    where = ("likely: " + ", ".join(container["signs"])) if container["likely"] else "none detected"
    checks.append(Check("container", True, INFO, f"{where}; seccomp {container['seccomp']}"))
    facts = {
        "capabilities": {"effective": f"{effective_caps(status):#x}",
                         "CAP_SYS_PTRACE": has_cap(CAP_SYS_PTRACE, status)},
        "sysctl": {"vm.unprivileged_userfaultfd": read_int(UNPRIVILEGED_SYSCTL)},
        "ptrace": ptrace_facts,
        "hugetlb": huge_facts,
        "container": container,
        "feature_mask": None if mask is None else f"{mask:#x}",
        "uid": os.geteuid(),
    }
    if shm is not None:
        audit_checks, facts["escapes"] = check_escapes(shm)
        checks += audit_checks
    return Diagnosis(uname.release, uname.machine, uf.feature_names(mask or 0), routes, checks,
                     facts)
