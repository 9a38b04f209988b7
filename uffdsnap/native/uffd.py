"""userfaultfd: one small documented function per operation (shape of QEMU's util/userfaultfd.c).

Every function takes a uffd fd that may have been created by another process: the ioctls act on the
address space of the creator, whoever issues them. Failures raise KernelError once, with the range,
mode and errno; callers do not re-wrap them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from uffdsnap.native.libc import KernelError, ioctl, syscall

SYS_USERFAULTFD = 323
USERFAULTFD_DEVICE = "/dev/userfaultfd"
USERFAULTFD_IOC_NEW = 0xAA00

UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_CONTINUE = 0xC020AA07

REGISTER_MODE_MISSING = 1
REGISTER_MODE_WP = 2
REGISTER_MODE_MINOR = 4
WRITEPROTECT_MODE_WP = 1
WRITEPROTECT_MODE_DONTWAKE = 2

EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16

PAGEFAULT_FLAG_WRITE = 1
PAGEFAULT_FLAG_WP = 2
PAGEFAULT_FLAG_MINOR = 4

UFFD_USER_MODE_ONLY = 1
MSG_SIZE = 32

# Feature bits by name (uapi/linux/userfaultfd.h, as of 6.18).
FEATURES: dict[str, int] = {
    "PAGEFAULT_FLAG_WP": 1 << 0,
    "EVENT_FORK": 1 << 1,
    "EVENT_REMAP": 1 << 2,
    "EVENT_REMOVE": 1 << 3,
    "MISSING_HUGETLBFS": 1 << 4,
    "MISSING_SHMEM": 1 << 5,
    "EVENT_UNMAP": 1 << 6,
    "SIGBUS": 1 << 7,
    "THREAD_ID": 1 << 8,
    "MINOR_HUGETLBFS": 1 << 9,
    "MINOR_SHMEM": 1 << 10,
    "EXACT_ADDRESS": 1 << 11,
    "WP_HUGETLBFS_SHMEM": 1 << 12,
    "WP_UNPOPULATED": 1 << 13,
    "POISON": 1 << 14,
    "WP_ASYNC": 1 << 15,
    "MOVE": 1 << 16,
}

# Features a snapshot needs from the kernel, and the ones it uses when present.
REQUIRED_FEATURES = FEATURES["PAGEFAULT_FLAG_WP"] | FEATURES["WP_HUGETLBFS_SHMEM"]
EVENT_FEATURES = (FEATURES["EVENT_FORK"] | FEATURES["EVENT_REMAP"] | FEATURES["EVENT_REMOVE"]
                  | FEATURES["EVENT_UNMAP"])


def feature_names(mask: int) -> list[str]:
    """Names of the feature bits set in `mask`, low bit first; unknown bits as BIT<n>."""
    names = [name for name, bit in FEATURES.items() if mask & bit]
    known = sum(FEATURES.values())
    names += [f"BIT{i}" for i in range(64) if (mask & ~known) >> i & 1]
    return names


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Writeprotect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


# What REGISTER/UNREGISTER errnos mean (fs/userfaultfd.c): ENOMEM is how they report that the
# creator's address space is gone (other ioctls say ESRCH); EINVAL covers holes in the range.
_RANGE_HINTS: dict[int, str] = {
    errno.ENOMEM: "the process that created this userfaultfd has exited (its address space is "
    "gone)",
    errno.EINVAL: "the range is unaligned, not entirely mapped in the creating process, or not "
    "registrable in this mode (WP on shmem/hugetlb needs WP_HUGETLBFS_SHMEM negotiated)",
}


def _span(start: int, length: int) -> str:
    return f"start={start:#x}, len={length:#x}"


def create_uffd_syscall(flags: int = os.O_NONBLOCK | os.O_CLOEXEC) -> int:
    """Create a uffd for this process with the userfaultfd() syscall.

    Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd=0 this fails with EPERM (we never
    add UFFD_USER_MODE_ONLY: it makes kernel-mode writes into protected memory fail with EFAULT).
    """
    return syscall("userfaultfd", SYS_USERFAULTFD, flags, detail=f"flags={flags:#x}")


def create_uffd_device(flags: int = os.O_NONBLOCK | os.O_CLOEXEC,
                       device_fd: int | None = None) -> int:
    """Create a uffd for this process through /dev/userfaultfd (USERFAULTFD_IOC_NEW).

    Works for any user that holds an open fd of the device, so `device_fd` may be one passed in by
    a privileged helper; otherwise the device is opened here (needs access to it).
    """
    own = device_fd is None
    if own:
        try:
            device_fd = os.open(USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError("open", e.errno or errno.EIO, USERFAULTFD_DEVICE) from None
    assert device_fd is not None
    try:
        return ioctl(device_fd, USERFAULTFD_IOC_NEW, flags, "USERFAULTFD_IOC_NEW",
                     f"flags={flags:#x}")
    finally:
        if own:
            os.close(device_fd)


_route_that_worked: str | None = None


def create_uffd(flags: int = os.O_NONBLOCK | os.O_CLOEXEC) -> tuple[int, str]:
    """Create a uffd for this process; return (fd, route) with route "syscall" or "device".

    Tries the syscall first and falls back to /dev/userfaultfd, remembering which worked. If both
    fail, the syscall's error is raised with the device's reason added to its hint.
    """
    global _route_that_worked
    routes = [("syscall", create_uffd_syscall), ("device", create_uffd_device)]
    if _route_that_worked == "device":
        routes.reverse()
    errors: dict[str, KernelError] = {}
    for name, create in routes:
        try:
            fd = create(flags)
        except KernelError as e:
            errors[name] = e
            continue
        _route_that_worked = name
        return fd, name
    # Both failed: raise the syscall's error, whichever route was tried first.
    first, other = errors["syscall"], errors["device"]
    raise KernelError(first.call, first.errno or errno.EIO, first.detail,
                      f"{first.hint}; {USERFAULTFD_DEVICE} route: {other}")


@dataclass(frozen=True)
class ApiInfo:
    """What UFFDIO_API negotiated: enabled feature bits and the ioctls the fd supports."""

    features: int
    ioctls: int

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.features)


def api(uffd: int, features: int = 0) -> ApiInfo:
    """Negotiate the API on `uffd`, asking for `features`; allowed once per fd.

    With features=0 the kernel reports every feature it supports (and the fd is then fixed to
    none of them), so probe on a throwaway fd and negotiate on the real one.
    """
    arg = _Api(UFFD_API, features, 0)
    ioctl(uffd, UFFDIO_API, arg, "UFFDIO_API", f"features={features:#x}")
    return ApiInfo(arg.features, arg.ioctls)


def supported_features() -> int:
    """All feature bits this kernel offers, probed on a throwaway uffd of this process."""
    fd, _ = create_uffd()
    try:
        return api(fd, 0).features
    finally:
        os.close(fd)


def register(uffd: int, start: int, length: int, mode: int = REGISTER_MODE_WP) -> int:
    """Register [start, start+length) of the uffd creator's address space; return the ioctls
    bitmask usable on the range."""
    arg = _Register(_Range(start, length), mode, 0)
    ioctl(uffd, UFFDIO_REGISTER, arg, "UFFDIO_REGISTER", f"{_span(start, length)}, mode={mode}",
          hints=_RANGE_HINTS)
    return arg.ioctls


def unregister(uffd: int, start: int, length: int) -> None:
    """Unregister [start, start+length); clears uffd-wp state and wakes waiters on the range."""
    ioctl(uffd, UFFDIO_UNREGISTER, _Range(start, length), "UFFDIO_UNREGISTER",
          _span(start, length), hints=_RANGE_HINTS)


def writeprotect(uffd: int, start: int, length: int, protect: bool, wake: bool = True) -> None:
    """Write-protect (protect=True) or un-protect [start, start+length).

    Un-protecting wakes threads blocked on the range unless wake=False (DONTWAKE); protecting never
    wakes (the kernel rejects WP|DONTWAKE, so `wake` is ignored when protecting).
    """
    if protect:
        mode = WRITEPROTECT_MODE_WP
    else:
        mode = 0 if wake else WRITEPROTECT_MODE_DONTWAKE
    ioctl(uffd, UFFDIO_WRITEPROTECT, _Writeprotect(_Range(start, length), mode),
          "UFFDIO_WRITEPROTECT", f"{_span(start, length)}, mode={mode}")


def wake(uffd: int, start: int, length: int) -> None:
    """Wake threads blocked on faults in [start, start+length)."""
    ioctl(uffd, UFFDIO_WAKE, _Range(start, length), "UFFDIO_WAKE", _span(start, length))


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageFault:
    address: int
    flags: int
    tid: int

    @property
    def write(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_WP)


@dataclass(frozen=True)
class Fork:
    """The tracked process forked; `uffd` is the child's new uffd, installed in the reader."""

    uffd: int


@dataclass(frozen=True)
class Remap:
    old_address: int
    new_address: int
    length: int


@dataclass(frozen=True)
class Remove:
    """MADV_REMOVE/MADV_DONTNEED on [start, end)."""

    start: int
    end: int


@dataclass(frozen=True)
class Unmap:
    start: int
    end: int


@dataclass(frozen=True)
class UnknownEvent:
    event: int


UffdEvent = PageFault | Fork | Remap | Remove | Unmap | UnknownEvent


def decode_message(msg: bytes) -> UffdEvent:
    """Decode one 32-byte struct uffd_msg."""
    if len(msg) != MSG_SIZE:
        raise ValueError(f"uffd_msg must be {MSG_SIZE} bytes, got {len(msg)}")
    event = msg[0]
    if event == EVENT_PAGEFAULT:
        flags, address, tid = struct.unpack_from("<QQI", msg, 8)
        return PageFault(address, flags, tid)
    if event == EVENT_FORK:
        return Fork(struct.unpack_from("<I", msg, 8)[0])
    if event == EVENT_REMAP:
        return Remap(*struct.unpack_from("<QQQ", msg, 8))
    if event == EVENT_REMOVE:
        return Remove(*struct.unpack_from("<QQ", msg, 8))
    if event == EVENT_UNMAP:
        return Unmap(*struct.unpack_from("<QQ", msg, 8))
    return UnknownEvent(event)


def is_userfaultfd(fd: int) -> bool:
    """Whether `fd` (passed to us by a peer) really is a userfaultfd."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def close_fork_uffd(msg: bytes) -> None:
    """A message nobody will handle: if it is a fork event, close the child's uffd it carries
    (installed in this process by the read), which releases the child."""
    event = decode_message(msg)
    if isinstance(event, Fork):
        os.close(event.uffd)


def decode_messages(buf: bytes) -> list[UffdEvent]:
    """Decode a read() of several messages."""
    if len(buf) % MSG_SIZE:
        raise ValueError(f"read of {len(buf)} bytes is not a whole number of uffd_msg")
    return [decode_message(buf[i:i + MSG_SIZE]) for i in range(0, len(buf), MSG_SIZE)]


def read_events(uffd: int, max_messages: int = 128) -> list[UffdEvent]:
    """Read up to `max_messages` pending events from a non-blocking uffd in one read().

    Returns [] when none is pending (EAGAIN). Retries EINTR. Fork events carry a new fd that the
    caller now owns.
    """
    while True:
        try:
            buf = os.read(uffd, MSG_SIZE * max_messages)
        except BlockingIOError:
            return []
        except InterruptedError:
            continue
        except OSError as e:
            err = e.errno or errno.EIO
            hint = "UFFDIO_API has not been called on this uffd" if err == errno.EINVAL else None
            raise KernelError("read", err, f"uffd={uffd}", hint) from None
        return decode_messages(buf)
