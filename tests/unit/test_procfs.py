"""/proc parsing, pure: parse_maps on fixed text (tests/system/test_procmaps.py reads live
processes)."""

from __future__ import annotations

import os

import pytest

from uffdsnap.procfs import (
    Mapping,
    ObjectId,
    ns_pids,
    parse_maps,
    parse_ns_pids,
    pid_namespace,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT = 10.0

# ---- parse_maps (pure) ----------------------------------------------------------------------

MAPS = """\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f1c00000000-7f1c00004000 rw-s 00001000 00:01 1234                       /memfd:buf (deleted)
7f1c00010000-7f1c00012000 r--s 00000000 00:1a 99                         /dev/shm/my shared file
7f1c00020000-7f1c00021000 rw-s 00000000 00:01 55                         /dev/zero (deleted)
7f1c00030000-7f1c00031000 ---p 00000000 00:00 0\x20

7f1c00040000-7f1c00041000 r-xp 0001f000 fd:01 3145734                    /usr/lib/libc.so.6
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_parse_maps_fields() -> None:
    maps = parse_maps(MAPS)
    assert len(maps) == 7  # the blank line is skipped
    heap, memfd, spaced, anon, guard, libc, vsyscall = maps
    assert heap == Mapping(0x55D0C0A00000, 0x55D0C0A21000, "rw-p", 0, ObjectId(0, 0, 0), "[heap]")
    assert not heap.shared and heap.writable
    assert memfd.path == "/memfd:buf (deleted)" and memfd.offset == 0x1000
    assert memfd.object_id == ObjectId(0, 1, 1234) and memfd.shared and memfd.writable
    assert memfd.length == 0x4000
    assert spaced.path == "/dev/shm/my shared file" and spaced.object_id == ObjectId(0, 0x1A, 99)
    assert spaced.shared and not spaced.writable
    assert anon.path == "/dev/zero (deleted)" and anon.shared
    assert guard.path == "" and guard.perms == "---p"
    assert libc.object_id == ObjectId(0xFD, 1, 3145734) and libc.offset == 0x1F000
    assert vsyscall.start == 0xFFFFFFFFFF600000 and vsyscall.path == "[vsyscall]"
    assert str(libc.object_id) == "fd:01 inode 3145734"


def test_parse_maps_own_process() -> None:
    """Our own /proc/self/maps parses completely (whatever this machine puts there)."""
    with open("/proc/self/maps") as f:
        text = f.read()
    assert len(parse_maps(text)) == len([line for line in text.splitlines() if line])


@pytest.mark.parametrize("line", [
    "garbage",
    "7f1c00000000-7f1c00004000 rw-s 00001000 00:01",  # no inode
    "7f1c00000000 rw-s 00001000 00:01 1234 /x",  # no end
    "7f1c00000000-7f1c00004000 rwzs 00001000 00:01 1234 /x",  # bad perms
])
def test_parse_maps_rejects_malformed(line: str) -> None:
    with pytest.raises(ValueError, match="unparseable"):
        parse_maps(line + "\n")



# ---- NSpid: a process's pid in each PID namespace from ours down to its own -----------------


def test_ns_pids_parses_every_level_and_starts_with_our_pid() -> None:
    assert parse_ns_pids("4321\t17\t1", 4321) == (4321, 17, 1)
    assert parse_ns_pids("88", 88) == (88,)


@pytest.mark.parametrize("value", [None, "", "x 1", "12 1"])
def test_ns_pids_missing_malformed_or_not_ours_is_no_such_process(value: str | None) -> None:
    """No field (a kernel without it), garbage, or a first pid that is not the one we read
    (/proc of another namespace): never a guess."""
    with pytest.raises(ProcessLookupError):
        parse_ns_pids(value, 11)


def test_ns_pids_and_namespace_of_a_live_process() -> None:
    """Our own: one level if our /proc is our namespace's, ending with the pid we see; the
    namespace is the one /proc/self/ns/pid names."""
    pids = ns_pids(os.getpid())
    assert pids[0] == os.getpid()
    st = os.stat("/proc/self/ns/pid")
    assert pid_namespace(os.getpid()) == (st.st_dev, st.st_ino)


def test_ns_pids_of_a_missing_process_is_no_such_process() -> None:
    with pytest.raises(ProcessLookupError):
        ns_pids(2**22 + 1)  # above pid_max's ceiling: never a process
    with pytest.raises(ProcessLookupError):
        pid_namespace(2**22 + 1)
