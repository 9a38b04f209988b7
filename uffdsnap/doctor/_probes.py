"""Live probes: ask the real kernel, in this process or in child processes we start.

Each probe tries the real operation (create a uffd each way, a write-protect round trip between
two processes, pidfd_getfd on our own child, a hugetlb memfd, loading the native core) and turns
the outcome, including the errno, into a Route or Check that says why and what to do. Every wait
on a child has a deadline, and closing our uffd releases any writer we left blocked.
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
from pathlib import Path
from typing import Any

import uffdsnap
from uffdsnap.doctor._checks import ATTACH, REQUIRED, USEFUL, Check, Route
from uffdsnap.doctor._facts import (
    CAP_SYS_PTRACE,
    UNPRIVILEGED_SYSCTL,
    effective_caps,
    has_cap,
    hugetlb_facts,
    read_int,
)
from uffdsnap.native import uffd as uf
from uffdsnap.native.libc import KernelError
from uffdsnap.native.pidfd import pidfd_getfd, pidfd_open
from uffdsnap.native.scm import recv_fds, send_fds
from uffdsnap.procfs import ObjectId, mappings_of

MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 4)


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
    """argv and environment to run `<func>(*args)` of this module in a fresh interpreter that
    finds this very copy of uffdsnap. The import names this module by `__name__`, so the
    child's code string stays right wherever the probe functions move."""
    code = f"import sys; from {__name__} import {func}; {func}(*map(int, sys.argv[1:]))"
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


# ---- pidfd_getfd ----------------------------------------------------------------------------


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


# ---- hugetlb and the native core ------------------------------------------------------------


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
