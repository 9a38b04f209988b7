"""/proc: who maps a shared-memory object, where, and how to open that object read-only.

An object is identified by (device, inode) as /proc/PID/maps prints them, so a memfd, a /dev/shm
file, a hugetlbfs file and a MAP_SHARED|MAP_ANONYMOUS region (a "/dev/zero (deleted)" shmem inode)
are all found the same way, in every process, at every address and file offset.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from dataclasses import dataclass

from uffdsnap.native.libc import filesystem_type

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6


@dataclass(frozen=True)
class ObjectId:
    """Identity of a shared-memory object: device numbers and inode as /proc/PID/maps shows them."""

    major: int
    minor: int
    inode: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> ObjectId:
        return cls(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)

    def __str__(self) -> str:
        return f"{self.major:02x}:{self.minor:02x} inode {self.inode}"


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    object_id: ObjectId
    path: str

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    def address_of(self, offset: int) -> int | None:
        """Virtual address of object `offset` in this mapping, or None if not mapped here."""
        rel = offset - self.offset
        return self.start + rel if 0 <= rel < self.length else None

    def offset_of(self, address: int) -> int | None:
        """Object offset of virtual `address`, or None if outside this mapping."""
        return self.offset + address - self.start if self.start <= address < self.end else None


_MAPS_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][sp]) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$"
)


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of /proc/PID/maps; malformed lines raise ValueError."""
    out = []
    for line in text.splitlines():
        if not line:
            continue
        m = _MAPS_LINE.match(line)
        if not m:
            raise ValueError(f"unparseable /proc/PID/maps line: {line!r}")
        start, end, perms, off, major, minor, ino, path = m.groups()
        out.append(Mapping(int(start, 16), int(end, 16), perms, int(off, 16),
                           ObjectId(int(major, 16), int(minor, 16), int(ino)), path))
    return out


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of process `pid`; ProcessLookupError if it is gone.

    /proc/PID/maps of a process whose main thread has exited (a zombie thread-group leader)
    reads empty while its other threads still run: then read a live thread's view.
    """
    try:
        with open(f"/proc/{pid}/maps") as f:
            text = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    if not text:
        text = _live_thread_maps(pid)
    return parse_maps(text)


def _live_thread_maps(pid: int) -> str:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/maps") as f:
                text = f.read()
        except OSError:
            continue
        if text:
            return text
    return ""


def wp_registered_ranges(pid: int) -> list[tuple[int, int]]:
    """(start, end) of every mapping of `pid` registered with a userfaultfd in write-protect
    mode, as the kernel says (the `uw` flag in /proc/PID/smaps). A mapping made anew, or an
    address space replaced by exec, has no such flag whatever our own tables say."""
    out: list[tuple[int, int]] = []
    for path in (f"/proc/{pid}/smaps", *_task_files(pid, "smaps")):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            continue
        if not text:
            continue  # a zombie leader's view: try a live thread's
        span = (0, 0)
        for line in text.splitlines():
            if line.startswith("VmFlags:"):
                if "uw" in line.split()[1:]:
                    out.append(span)
            elif not line[:1].isupper() and "-" in line.split(" ", 1)[0]:
                start, end = line.split(" ", 1)[0].split("-")
                span = (int(start, 16), int(end, 16))
        return out
    raise ProcessLookupError(pid)


def registered_mapper(pid: int, obj: ObjectId) -> bool:
    """Whether a writable mapping of `obj` in `pid` is already registered with a userfaultfd:
    a child forked by a tracked process (its agent holds that uffd and will report it), or a
    program that uses userfaultfd itself. Attaching another would fail (EBUSY)."""
    try:
        registered = wp_registered_ranges(pid)
        maps = [m for m in mappings_of(pid, obj) if m.writable]
    except (ProcessLookupError, OSError):
        return False
    return any(a <= m.start and m.end <= b for m in maps for a, b in registered)


def _task_files(pid: int, name: str) -> list[str]:
    try:
        return [f"/proc/{pid}/task/{tid}/{name}" for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def mappings_of(pid: int, obj: ObjectId) -> list[Mapping]:
    """Shared mappings of `obj` in process `pid` (private mappings never write to the object)."""
    return _shared_of(read_maps(pid), obj)


def _shared_of(maps: list[Mapping], obj: ObjectId) -> list[Mapping]:
    return [m for m in maps if m.object_id == obj and m.shared]


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], start [19])."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_comm(pid: int) -> str:
    """The process's command name, or "?" if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def process_label(pid: int) -> str:
    """`PID (comm)`: how reports name a process."""
    return f"{pid} ({process_comm(pid)})"


def process_ids(pid: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(uids, gids, supplementary groups) of a process from /proc/PID/status: uids and gids
    are (real, effective, saved, filesystem). ProcessLookupError if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None

    def ints(key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in fields.get(key, "").split())

    return ints("Uid"), ints("Gid"), ints("Groups")


def ns_pids(pid: int) -> tuple[int, ...]:
    """The process's pid in each PID namespace from ours (the /proc mount's) down to its own
    (/proc/PID/status NSpid: [0] is `pid` itself, [-1] the pid it sees for itself).
    ProcessLookupError if it is gone, or not in a namespace below ours."""
    return parse_ns_pids(_status_field(pid, "NSpid"), pid)


def parse_ns_pids(value: str | None, pid: int) -> tuple[int, ...]:
    """NSpid's value as ints; ProcessLookupError for a missing or malformed field."""
    try:
        pids = tuple(int(x) for x in (value or "").split())
    except ValueError:
        pids = ()
    if not pids or pids[0] != pid:
        raise ProcessLookupError(pid)
    return pids


def pid_namespace(pid: int) -> tuple[int, int]:
    """(device, inode) of the process's PID namespace, which names it uniquely.
    ProcessLookupError if it is gone."""
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    return st.st_dev, st.st_ino


def _status_field(pid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return value.strip()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    return None


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def parent_pid(pid: int) -> int:
    """The parent's pid, or -1 if the process is gone."""
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return -1


def own_age_ns() -> int:
    """How long this process has run (since its fork, so the interpreter's start-up too), to
    the kernel's clock tick (10 ms on most systems)."""
    started = start_ticks(os.getpid()) / os.sysconf("SC_CLK_TCK")
    return max(0, int((time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1e9))


def start_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot; -1 if it is gone."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return -1


def all_pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


SCAN_ROUNDS = 64  # a fork chain outruns one look at /proc; a few more catch it
PF_KTHREAD = 0x00200000


class ScanUnstable(Exception):
    """Processes kept exiting faster than we could look at their successors."""


def find_mappers(obj: ObjectId, exclude: set[int] | None = None) -> dict[int, list[Mapping]]:
    """Every process with a shared mapping of `obj`: {pid: [mappings]}. Processes we may not
    inspect are skipped. One listing of /proc is not one instant: a process that forks and
    exits while we look (a fork chain, a daemon re-spawning itself) leaves its successor
    unlisted and itself gone. So while any process we meant to read has vanished, we list
    again and read the processes that are new; the result holds every mapper that lived
    through the whole look. Raises ScanUnstable after SCAN_ROUNDS rounds that each lost one.
    (Writers may be held while this runs: maps that do not mention the inode are passed over
    without parsing them.)"""
    found: dict[int, list[Mapping]] = {}
    needle = f" {obj.major:02x}:{obj.minor:02x} {obj.inode} ".encode()
    looked: set[int] = set(exclude or ())
    for _ in range(SCAN_ROUNDS):
        vanished = False
        for pid in all_pids():
            if pid in looked:
                continue
            looked.add(pid)
            maps = _mapper_maps(pid, obj, needle)
            if maps is None:
                vanished = True
            elif maps:
                found[pid] = maps
        if not vanished:
            return found
    raise ScanUnstable(f"processes kept exiting while we looked for mappers of the object "
                       f"({SCAN_ROUNDS} looks at /proc each lost one)")


def _mapper_maps(pid: int, obj: ObjectId, needle: bytes) -> list[Mapping] | None:
    """`pid`'s shared mappings of `obj` ([] if none, or hidden from us); None if it exited
    before we could read them (its children, if any, may map the object). (Raw reads: this
    runs for every process while writers may be held.)"""
    try:
        raw = _read_raw(f"/proc/{pid}/maps")
        if raw and needle not in raw:
            return []
        if not raw:
            # a kernel thread, or a process that is exiting (its memory already gone)
            stat = _read_raw(f"/proc/{pid}/stat")
            if int(stat.rsplit(b")", 1)[1].split()[6]) & PF_KTHREAD:
                return []
            if len(os.listdir(f"/proc/{pid}/task")) < 2:
                return None
            # (empty maps with live threads: a zombie leader; mappings_of reads the threads')
            return mappings_of(pid, obj)
        return _shared_of(parse_maps(raw.decode(errors="surrogateescape")), obj)
    except PermissionError:
        return []
    except (ProcessLookupError, FileNotFoundError, IndexError, ValueError):
        return None
    except OSError as e:  # ESRCH while reading a dying process
        if e.errno in (errno.ESRCH, errno.ENOENT):
            return None
        if e.errno == errno.EACCES:
            return []
        raise


def _read_raw(path: str) -> bytes:
    """All of a /proc file, without a Python file object around it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SharedObject:
    """An opened shared-memory object: read-only fd, identity, size, page size, kind."""

    fd: int
    spec: str
    object_id: ObjectId
    size: int
    page_size: int
    hugetlb: bool

    def close(self) -> None:
        os.close(self.fd)


_MAP_FILES = re.compile(r"^/proc/(\d+|self)/map_files/([0-9a-f]+)-([0-9a-f]+)$")
_PROC_FD = re.compile(r"^/proc/(\d+|self)/fd/(\d+)$")


class ObjectError(ValueError):
    """OBJECT cannot be snapshotted; the message says why in one line."""


def open_object(spec: str) -> SharedObject:
    """Open the shared-memory object named by `spec` read-only.

    `spec` is a /dev/shm (tmpfs) or hugetlbfs path, /proc/PID/fd/N (e.g. a memfd), or
    /proc/PID/map_files/START-END (MAP_SHARED|MAP_ANONYMOUS memory). The coordinator only ever
    reads through this fd, so it can never fault on protected memory itself.
    """
    try:
        fd = os.open(spec, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ObjectError(f"{spec}: no such object") from None
    except PermissionError:
        raise ObjectError(
            f"{spec}: permission denied (run as root or the object's owner)") from None
    except OSError as e:
        raise ObjectError(f"{spec}: cannot open: {os.strerror(e.errno or 0)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ObjectError(f"{spec}: not a regular shared-memory file")
        fstype = filesystem_type(fd)
        if fstype not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
            raise ObjectError(
                f"{spec}: not shared memory (tmpfs/shmem or hugetlbfs): userfaultfd write-protect"
                " does not cover other file systems"
            )
        return SharedObject(fd, spec, ObjectId.from_stat(st), st.st_size, st.st_blksize,
                            fstype == HUGETLBFS_MAGIC)
    except BaseException:
        os.close(fd)
        raise


# ---- writers waiting on us --------------------------------------------------------------------

# Where a thread sleeps in the kernel (/proc/PID/task/TID/wchan) while it waits for a userfaultfd
# to answer: a write fault, or a fork/mremap/munmap event not read yet.
UFFD_WAITS = frozenset({"handle_userfault", "userfaultfd_event_wait_completion"})


def process_stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP, or a tracer's stop): it cannot answer anyone."""
    try:
        return _stat_fields(pid)[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _uffd_sleepers(pid: int) -> dict[int, int]:
    """Threads of `pid` asleep on a userfaultfd now: {tid: voluntary context switches}."""
    found: dict[int, int] = {}
    for path in _task_files(pid, "wchan"):
        tid = int(path.split("/")[4])
        try:
            with open(path) as f:
                if f.read().strip() not in UFFD_WAITS:
                    continue
            found[tid] = int(_status_field(tid, "voluntary_ctxt_switches") or "-1")
        except (OSError, ValueError):
            continue  # gone meanwhile (ProcessLookupError is an OSError)
    return found


class FaultWaits:
    """How long the threads of some processes have been waiting on a userfaultfd, read from
    /proc with nobody's cooperation: whoever watches needs nothing from the stuck party. A
    thread counts as waiting since the first look that found it asleep there, for as long as
    its count of voluntary context switches stays the same (it never woke in between)."""

    def __init__(self) -> None:
        self._since: dict[int, tuple[int, int, float]] = {}  # tid -> (pid, switches, since)

    def longest(self, pids: set[int], now: float) -> tuple[int, float]:
        """(pid, seconds) of the thread of `pids` that has waited longest now; (0, 0.0) if
        none waits."""
        since: dict[int, tuple[int, int, float]] = {}
        for pid in pids:
            for tid, switches in _uffd_sleepers(pid).items():
                old = self._since.get(tid)
                same = old is not None and old[:2] == (pid, switches)
                since[tid] = old if same and old is not None else (pid, switches, now)
        self._since = since
        pid, _, first = min(since.values(), key=lambda v: v[2], default=(0, 0, now))
        return pid, now - first
