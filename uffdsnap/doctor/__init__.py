"""Can this machine (or container) take snapshots, and if not, why: the library behind `doctor`.

Every answer comes from asking the real kernel — creating a uffd each way, negotiating features,
and a live write-protect round trip between two processes — never from version numbers alone, so
a seccomp filter, a missing device node or a dropped capability shows up as what it is. Each check
says what it found and, when it fails, what to do about it. Nothing here can hang: every wait on
a child process has a deadline, and closing our uffd releases any writer we left blocked.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import select
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uffdsnap
from uffdsnap.native import uffd as uf
from uffdsnap.native.libc import KernelError
from uffdsnap.native.pidfd import pidfd_getfd, pidfd_open
from uffdsnap.native.scm import recv_fds, send_fds
from uffdsnap.procfs import ObjectId, mappings_of

# Check levels: what fails when a check of that level fails.
REQUIRED = "required"  # no snapshot of any kind is possible here
ATTACH = "attach"  # attaching to unmodified processes (`uffdsnap snapshot`) is not possible
USEFUL = "useful"  # snapshots work, with less coverage or convenience
INFO = "info"  # facts, never a failure

CAP_SYS_PTRACE = 19
USEFUL_FEATURES = ("EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "EVENT_UNMAP", "THREAD_ID",
                   "WP_UNPOPULATED")
REQUIRED_FEATURE_NAMES = uf.feature_names(uf.REQUIRED_FEATURES)
UNPRIVILEGED_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
YAMA_SYSCTL = "/proc/sys/kernel/yama/ptrace_scope"
HUGEPAGES_SYSFS = "/sys/kernel/mm/hugepages"
MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 4)

_CONTAINER_FIX = ("in a container: run it with --cap-add SYS_PTRACE (and a seccomp profile that "
                  "allows userfaultfd), or pass --device /dev/userfaultfd")


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


# ---- facts from /proc and /sys --------------------------------------------------------------


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


def _seccomp_note(status: dict[str, str]) -> str:
    return " (a seccomp filter is active: it may block the call)" if status.get(
        "Seccomp") == "2" else ""


# ---- userfaultfd creation routes ------------------------------------------------------------


def probe_syscall_route(status: dict[str, str]) -> Route:
    """Create (and close) a uffd with the userfaultfd() syscall; explain the outcome."""
    ptrace = has_cap(CAP_SYS_PTRACE, status)
    unpriv = read_int(UNPRIVILEGED_SYSCTL)
    try:
        os.close(uf.create_uffd_syscall())
    except KernelError as e:
        if e.errno == errno.EPERM and not ptrace and unpriv != 1:
            return Route("syscall", False,
                         f"userfaultfd() → EPERM: CAP_SYS_PTRACE is not in effect (CapEff "
                         f"{effective_caps(status):#x}) and vm.unprivileged_userfaultfd={unpriv}",
                         "run as root or with CAP_SYS_PTRACE (docker: --cap-add SYS_PTRACE), or "
                         "sysctl -w vm.unprivileged_userfaultfd=1, or use /dev/userfaultfd")
        if e.errno in (errno.EPERM, errno.ENOSYS):
            return Route("syscall", False,
                         f"userfaultfd() → {errno.errorcode[e.errno]} although it should be "
                         f"allowed{_seccomp_note(status)}",
                         "allow userfaultfd in the seccomp profile (docker: --security-opt "
                         "seccomp=PROFILE) or use /dev/userfaultfd; ENOSYS without seccomp means "
                         "a kernel built without CONFIG_USERFAULTFD")
        return Route("syscall", False, str(e), "")
    why = "CAP_SYS_PTRACE in effect" if ptrace else f"vm.unprivileged_userfaultfd={unpriv}"
    return Route("syscall", True, f"userfaultfd() works ({why})")


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def probe_device_route(status: dict[str, str]) -> Route:
    """Create (and close) a uffd through /dev/userfaultfd; explain the outcome from the device
    node's mode and ownership and who we are."""
    path = uf.USERFAULTFD_DEVICE
    who = f"we are uid {os.geteuid()} gid {os.getegid()}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Route("device", False,
                     f"{path} does not exist (kernels before 6.1 lack it, and containers get it "
                     "only when passed in)",
                     "pass the device into the container (docker: --device /dev/userfaultfd) or "
                     "use the syscall route")
    node = f"{path} {stat.filemode(st.st_mode)} {_owner(st)}"
    if not stat.S_ISCHR(st.st_mode):
        return Route("device", False, f"{node} is not a character device", "")
    try:
        os.close(uf.create_uffd_device())
    except KernelError as e:
        if e.errno == errno.EACCES:
            return Route("device", False, f"{node}: no read-write access ({who})",
                         f"grant access, e.g. `chgrp GROUP {path} && chmod 660 {path}` (or a udev "
                         "rule / ACL) and add the user to GROUP; or use the syscall route")
        if e.errno == errno.EPERM:
            return Route("device", False,
                         f"{node}: opening it is not permitted (a container's device cgroup or an "
                         f"LSM denies it){_seccomp_note(status)}",
                         "allow the device (docker: --device /dev/userfaultfd)")
        return Route("device", False, f"{node}: {e}", "")
    return Route("device", True, f"{node}; {who}")


# ---- features -------------------------------------------------------------------------------


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


# ---- the live probe -------------------------------------------------------------------------


class ProbeFailed(Exception):
    """A step of the live probe went wrong; the message says which and what was seen."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix or _PROBE_FIX


_PROBE_FIX = ("this kernel or sandbox cannot write-protect shared memory for another process; "
              "try a newer kernel or run outside the sandbox")
_TIMEOUT_FIX = "the machine may be overloaded: retry with a larger --timeout"


def _child_command(func: str, *args: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run `uffdsnap.doctor.<func>(*args)` in a fresh interpreter that
    finds this very copy of uffdsnap."""
    code = f"import sys; from uffdsnap.doctor import {func}; {func}(*map(int, sys.argv[1:]))"
    root = str(Path(uffdsnap.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-c", code, *map(str, args)], env


def probe_child(sock_fd: int, memfd: int, npages: int) -> None:
    """The workload side of the live probe, in its own process.

    Maps the memfd shared (touching nothing), creates its own uffd and sends it over the socket,
    keeping no copy; then writes one byte where told (blocking while that page is protected),
    reports the value it reads back, and exits when the socket closes.
    """
    import mmap

    sock = socket.socket(fileno=sock_fd)
    page = mmap.PAGESIZE
    mem = mmap.mmap(memfd, npages * page, flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(memfd)
    try:
        fd, route = uf.create_uffd()
    except KernelError as e:
        sock.send(json.dumps({"error": str(e)}).encode())
        return
    send_fds(sock, json.dumps({"route": route}).encode(), [fd])
    os.close(fd)
    order = sock.recv(4096)
    if not order:
        return
    cmd = json.loads(order)
    mem[cmd["offset"]] = cmd["value"]  # blocks here while the page is write-protected
    sock.send(json.dumps({"wrote": mem[cmd["offset"]]}).encode())
    sock.recv(1)  # until the prober closes


def _wait_readable(fds: list[int], deadline: float) -> list[int]:
    """The fds among `fds` readable now or before `deadline` (empty on timeout)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while True:
        left = max(0.0, deadline - time.monotonic())
        ready = poller.poll(left * 1000)
        if ready or left == 0:
            return [fd for fd, _ in ready]


def _recv_json(sock: socket.socket, deadline: float, what: str) -> tuple[dict[str, Any], list[int]]:
    if not _wait_readable([sock.fileno()], deadline):
        raise ProbeFailed(f"timed out waiting for the child's {what}", _TIMEOUT_FIX)
    data, fds = recv_fds(sock, 4096, max_fds=1)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ProbeFailed(f"the child exited before sending its {what}")
    return json.loads(data), fds


def _end_child(proc: subprocess.Popen[bytes], timeout: float = 2.0) -> str:
    """Reap `proc` (killing it if it lingers); return the last line it wrote to stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    lines = (err or b"").decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def probe_live(features: int, timeout: float = 10.0) -> Check:
    """A snapshot in miniature between two processes, on the real kernel.

    A child maps a fresh memfd MAP_SHARED, creates its own uffd and passes it to us (SCM_RIGHTS);
    we register and write-protect the child's mapping from here, the child writes to a page
    nobody ever touched, we must receive that WP fault (right address, flags WP|WRITE) while the
    child stays blocked, un-protect the page, and see the write land.
    """
    deadline = time.monotonic() + timeout
    memfd = os.memfd_create("uffdsnap-doctor", os.MFD_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc: subprocess.Popen[bytes] | None = None
    held: list[int] = []  # the uffd, once received: closing it releases the child
    child_said = ""
    try:
        npages = 4
        os.ftruncate(memfd, npages * os.sysconf("SC_PAGE_SIZE"))
        argv, env = _child_command("probe_child", theirs.fileno(), memfd, npages)
        proc = subprocess.Popen(argv, env=env, pass_fds=(theirs.fileno(), memfd),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        theirs.close()
        detail = _probe_steps(proc.pid, memfd, ours, features, deadline, held)
        return Check("live probe", True, REQUIRED, detail)
    except ProbeFailed as e:
        failure = Check("live probe", False, REQUIRED, str(e), e.fix)
    except (KernelError, OSError, ValueError) as e:
        failure = Check("live probe", False, REQUIRED, f"{type(e).__name__}: {e}", _PROBE_FIX)
    finally:
        for fd in held:
            os.close(fd)
        ours.close()
        theirs.close()
        os.close(memfd)
        if proc is not None:
            child_said = _end_child(proc)
    if child_said:
        failure.detail += f" (child: {child_said})"
    return failure


def _probe_steps(pid: int, memfd: int, sock: socket.socket, features: int, deadline: float,
                 held: list[int]) -> str:
    """The protocol of probe_live once the child runs; returns the success detail."""
    page = os.sysconf("SC_PAGE_SIZE")
    hello, fds = _recv_json(sock, deadline, "uffd")
    held += fds
    if "error" in hello:
        raise ProbeFailed(f"the child could not create a uffd: {hello['error']}")
    if len(fds) != 1:
        raise ProbeFailed(f"expected one fd from the child over SCM_RIGHTS, got {len(fds)}")
    uffd = fds[0]
    maps = mappings_of(pid, ObjectId.from_stat(os.fstat(memfd)))
    if len(maps) != 1:
        raise ProbeFailed(f"expected one mapping of the memfd in the child, found {len(maps)}")
    start, length = maps[0].start, maps[0].length
    wanted = uf.REQUIRED_FEATURES | (features & uf.FEATURES["THREAD_ID"])
    negotiated = uf.api(uffd, wanted).features
    uf.register(uffd, start, length, uf.REGISTER_MODE_WP)
    uf.writeprotect(uffd, start, length, protect=True)
    target = start + 2 * page  # a page nobody has touched
    offset = 2 * page + 0x10
    sock.send(json.dumps({"offset": offset, "value": 0x5A}).encode())

    ready = _wait_readable([uffd, sock.fileno()], deadline)
    if not ready:
        raise ProbeFailed("no write-protect fault arrived before the deadline",
                          f"{_PROBE_FIX}; or {_TIMEOUT_FIX}")
    if uffd not in ready:
        raise ProbeFailed("the child's write went through a write-protected shared page: "
                          "shmem write-protect does not work on this kernel")
    faults = [e for e in uf.read_events(uffd) if isinstance(e, uf.PageFault)]
    if not faults:
        raise ProbeFailed("the uffd became readable but held no page fault")
    fault = faults[0]
    want_flags = uf.PAGEFAULT_FLAG_WP | uf.PAGEFAULT_FLAG_WRITE
    if fault.address != target or fault.flags & want_flags != want_flags:
        raise ProbeFailed(f"unexpected fault: address {fault.address:#x} flags {fault.flags:#x},"
                          f" expected {target:#x} WP|WRITE")
    if negotiated & uf.FEATURES["THREAD_ID"] and fault.tid != pid:
        raise ProbeFailed(f"fault thread id {fault.tid}, expected the child's {pid}")
    if os.pread(memfd, 1, offset) != b"\0" or _wait_readable([sock.fileno()], 0):
        raise ProbeFailed("the child's write completed while its page was protected")
    uf.writeprotect(uffd, target, page, protect=False)

    done, _ = _recv_json(sock, deadline, "confirmation of its write")
    if done.get("wrote") != 0x5A or os.pread(memfd, 1, offset) != b"\x5a":
        raise ProbeFailed(f"the write did not land after un-protect (child read "
                          f"{done.get('wrote')!r})")
    return (f"child {pid}, its uffd via {hello['route']}: a write to a never-touched page was "
            f"held as a WP|WRITE fault at {fault.address:#x} and landed after un-protect")


# ---- ptrace and pidfd_getfd -----------------------------------------------------------------


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


def probe_pidfd_getfd(timeout: float = 10.0) -> Check:
    """Copy an fd out of a child with pidfd_getfd (what attach does to take the injected uffd)."""
    proc = subprocess.Popen([sys.executable, "-S", "-c", "import sys; sys.stdin.buffer.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    try:
        pidfd = pidfd_open(proc.pid)
        try:
            fd = pidfd_getfd(pidfd, 0, proc.pid)
        finally:
            os.close(pidfd)
        try:
            same = os.fstat(fd).st_ino == os.fstat(proc.stdin.fileno()).st_ino
        finally:
            os.close(fd)
        if not same:
            return Check("pidfd_getfd", False, ATTACH,
                         "the fd copied from the child is not the one it holds", "")
        return Check("pidfd_getfd", True, ATTACH,
                     f"copied fd 0 out of child {proc.pid} (probed on our own child)")
    except KernelError as e:
        fix = ("run as root or with CAP_SYS_PTRACE; in a container also allow pidfd_getfd in "
               "seccomp" if e.errno in (errno.EPERM, errno.EACCES) else
               "needs Linux 5.6 or later" if e.errno == errno.ENOSYS else "")
        return Check("pidfd_getfd", False, ATTACH, str(e), fix)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# ---- hugetlb --------------------------------------------------------------------------------


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


def check_hugetlb() -> tuple[Check, dict[str, Any]]:
    """Whether hugetlbfs-backed objects can exist here (only they need it)."""
    facts = hugetlb_facts()
    try:
        os.close(os.memfd_create("uffdsnap-doctor-huge", os.MFD_CLOEXEC | MFD_HUGETLB))
        memfd = "MFD_HUGETLB memfd: ok"
        facts["memfd_hugetlb"] = True
    except OSError as e:
        memfd = f"MFD_HUGETLB memfd: {errno.errorcode.get(e.errno or 0, e.errno)}"
        facts["memfd_hugetlb"] = False
    pools = ", ".join(f"{p['size_kb']} kB: {p['free']}/{p['total']} free" for p in facts["pools"])
    free = any(p["free"] for p in facts["pools"])
    ok = bool(facts["memfd_hugetlb"] and free)
    return Check("hugetlb", ok, USEFUL, f"{pools or 'no pools'}; {memfd}",
                 "" if ok else "only hugetlbfs-backed objects need it: reserve pages with "
                 "`sysctl vm.nr_hugepages=N`"), facts


# ---- container ------------------------------------------------------------------------------


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


def check_native_core() -> Check:
    """The coordinator's and agents' data path is C (uffdsnap/native/src/snapcore.c), built
    into the package when it was installed."""
    from uffdsnap.errors import UserError
    from uffdsnap.native import core as snapcore

    try:
        snapcore.load()
    except (UserError, OSError) as e:
        return Check("native core", False, REQUIRED, str(e),
                     "reinstall uffdsnap; from a source checkout, `pip install -e .`")
    from uffdsnap.native import core_library

    return Check("native core", True, REQUIRED, f"{core_library().name} loads (ABI "
                 f"{snapcore.ABI_VERSION})")


# ---- everything -----------------------------------------------------------------------------


def diagnose(timeout: float = 10.0) -> Diagnosis:
    """Run every check. `timeout` bounds each wait on a probe child."""
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
    return Diagnosis(uname.release, uname.machine, uf.feature_names(mask or 0), routes, checks,
                     facts)
