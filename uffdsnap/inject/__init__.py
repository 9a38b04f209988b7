"""Run system calls inside another process with ptrace (the shape of CRIU's compel).

`attach` needs a userfaultfd that acts on an unmodified process's address space, and a uffd binds
to the mm of whoever creates it, so the target itself must make the call. We stop one of its
threads, point it at a `syscall` instruction it already has (in its vdso), let it run exactly that
one call, and put everything back. Nothing above this package sees registers:

    with injected(pid) as target:
        fd = target.syscall_fd(SYS_USERFAULTFD, flags)
        ours = target.take_fd(fd)
        target.close_fd(fd)

Leaving the `with` on any path (an exception, the target exiting, our own death) removes what was
injected (fds, scratch pages), restores the registers and detaches; a target that exits mid-way
ends the session with a KernelError (ESRCH), never a hang. Inside (private modules):
- _injected: `Injected`, `injected`, `create_uffd_in`: the caller's side;
- _tracer: the process that makes every ptrace request for one session, and cleans up if we die;
- _session, _tracee: the stopped thread: attach, run one call, restore, detach; what we made in it;
- _others: the target's other threads, held stopped while it holds an fd we lent it or made;
- _x86_64: syscall numbers, registers, a `syscall` instruction to borrow;
- _seccomp: the filter interpreter that refuses calls the target's filters would punish;
- _lend: handing an unprivileged target a /dev/userfaultfd fd.
The raw ptrace requests are in uffdsnap.native.ptrace.

`create_uffd_in` stops every other thread of the target (threads created meanwhile too) from
before the first fd it puts there until the last copy is closed, so no thread of a hostile
target can dup, keep or pass on (by fork) the lent /dev/userfaultfd fd or the new uffd.

Known limits: if the tracer process itself is SIGKILLed during a call, the kernel detaches with
that call's registers in place (and lets the other threads go, with whatever fd is in the
target at that moment). A thread that cannot stop (a vfork parent waiting for its child, D
state) makes create_uffd_in time out (ETIMEDOUT), the target released when it stops; a thread
traced by someone else (a debugger on one thread) makes it fail (EPERM). Yama ptrace_scope=1
needs CAP_SYS_PTRACE even for our own children (the tracer is never the target's ancestor).
"""

from uffdsnap.inject._injected import DEFAULT_TIMEOUT, Injected, create_uffd_in, injected
from uffdsnap.inject._seccomp import (
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_KILL_THREAD,
    SECCOMP_RET_LOG,
    SECCOMP_RET_TRACE,
    SECCOMP_RET_TRAP,
    SECCOMP_RET_USER_NOTIF,
    seccomp_verdict,
)
from uffdsnap.inject._session import PAGE_SIZE
from uffdsnap.inject._tracee import pick_thread
from uffdsnap.inject._tracer import start_tracers
from uffdsnap.inject._x86_64 import (
    SYS_CLOCK_NANOSLEEP,
    SYS_CLOSE,
    SYS_EPOLL_WAIT,
    SYS_EXIT_GROUP,
    SYS_GETPID,
    SYS_IOCTL,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_NANOSLEEP,
    SYS_READ,
    SYS_RECVMSG,
    SYS_SOCKETPAIR,
    SYS_USERFAULTFD,
    StopPoint,
)

__all__ = [
    "DEFAULT_TIMEOUT", "PAGE_SIZE", "SECCOMP_RET_ALLOW", "SECCOMP_RET_ERRNO",
    "SECCOMP_RET_KILL_PROCESS", "SECCOMP_RET_KILL_THREAD", "SECCOMP_RET_LOG", "SECCOMP_RET_TRACE",
    "SECCOMP_RET_TRAP", "SECCOMP_RET_USER_NOTIF", "SYS_CLOCK_NANOSLEEP", "SYS_CLOSE",
    "SYS_EPOLL_WAIT", "SYS_EXIT_GROUP", "SYS_GETPID", "SYS_IOCTL", "SYS_MMAP", "SYS_MUNMAP",
    "SYS_NANOSLEEP", "SYS_READ", "SYS_RECVMSG", "SYS_SOCKETPAIR", "SYS_USERFAULTFD", "Injected",
    "StopPoint", "create_uffd_in", "injected", "pick_thread", "seccomp_verdict",
    "start_tracers",
]
