"""Facts from /proc and /sys: who we are, what the sysctls say, what pools and sandboxes exist.

Reading only: nothing here creates a uffd or starts a process, and a missing or unreadable file
is an absent fact (None), never an error, since containers hide many of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CAP_SYS_PTRACE = 19
UNPRIVILEGED_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
YAMA_SYSCTL = "/proc/sys/kernel/yama/ptrace_scope"
HUGEPAGES_SYSFS = "/sys/kernel/mm/hugepages"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def proc_status() -> dict[str, str]:
    """/proc/self/status as {field: value}."""
    out: dict[str, str] = {}
    for line in (_read("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def effective_caps(status: dict[str, str] | None = None) -> int:
    """The effective capability mask of this process (CapEff)."""
    return int((status or proc_status()).get("CapEff", "0"), 16)


def has_cap(cap: int, status: dict[str, str] | None = None) -> bool:
    return bool(effective_caps(status) >> cap & 1)


def read_int(path: str) -> int | None:
    """An integer sysctl or sysfs value, or None when the file is absent or unreadable."""
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def hugetlb_facts() -> dict[str, Any]:
    """Huge page pools from /proc/meminfo and /sys/kernel/mm/hugepages."""
    meminfo: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.startswith("HugePages_") or key == "Hugepagesize":
            meminfo[key] = int(value.split()[0])
    pools = []
    try:
        names = sorted(os.listdir(HUGEPAGES_SYSFS))
    except OSError:
        names = []
    for name in names:
        size = name.removeprefix("hugepages-").removesuffix("kB")
        if not size.isdigit():
            continue
        pools.append({"size_kb": int(size),
                      "total": read_int(f"{HUGEPAGES_SYSFS}/{name}/nr_hugepages"),
                      "free": read_int(f"{HUGEPAGES_SYSFS}/{name}/free_hugepages")})
    return {"default_size_kb": meminfo.get("Hugepagesize"),
            "free_default": meminfo.get("HugePages_Free"), "pools": pools}


def container_facts(status: dict[str, str]) -> dict[str, Any]:
    """Signs that we run in a container (informational: it explains missing devices/caps)."""
    signs = []
    for path, what in (("/.dockerenv", "docker"), ("/run/.containerenv", "podman")):
        if os.path.exists(path):
            signs.append(f"{what} ({path})")
    if os.environ.get("container"):
        signs.append(f"container={os.environ['container']}")
    cgroup = _read("/proc/1/cgroup") or ""
    for word in ("docker", "kubepods", "containerd", "lxc", "libpod"):
        if word in cgroup:
            signs.append(f"cgroup mentions {word}")
            break
    uid_map = (_read("/proc/self/uid_map") or "").split()
    userns = bool(uid_map) and uid_map != ["0", "0", "4294967295"]
    if userns:
        signs.append("user namespace")
    seccomp = {"0": "off", "1": "strict", "2": "filter"}.get(status.get("Seccomp", ""), "unknown")
    return {"likely": bool(signs), "signs": signs, "user_namespace": userns, "seccomp": seccomp}
