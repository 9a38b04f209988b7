"""The kernel edge: thin ctypes/syscall wrappers. The only place in uffdsnap that uses ctypes."""

from uffdsnap.kernel._libc import KernelError

__all__ = ["KernelError"]
