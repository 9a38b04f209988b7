"""The agent: one per tracked process, a separate process from it (a thread inside a Python
workload would deadlock on the GIL while the workload is blocked on a protected page).

It holds the only reference to its process's uffd, so its death releases the process. It translates
object offsets ⇄ addresses for every mapping of the object in that process, registers and protects
on command, forwards write faults as offsets, applies un-protect + wake, and reports exit. Every way
out — coordinator gone, abort, protocol error, signal, crash — releases protection first.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from uffdsnap import testhooks
from uffdsnap.agent._agent import Agent, report
from uffdsnap.agent._corelink import set_fault_deadline
from uffdsnap.channel import Channel, connect
from uffdsnap.errors import UserError
from uffdsnap.groups import unwrap_group
from uffdsnap.native import core as snapcore
from uffdsnap.native import uffd as K
from uffdsnap.native.libc import KernelError
from uffdsnap.native.pidfd import pidfd_open
from uffdsnap.procfs import ObjectId, process_comm
from uffdsnap.protocol import PROTOCOL_VERSION, Abort, Hello, ProtocolError, Role, Welcome
from uffdsnap.tracker import Tracker

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0
# Features asked of the kernel for a snapshot uffd (those it lacks are simply not requested,
# except the required ones, whose absence fails the API call with a clear error).
WANTED_FEATURES = K.REQUIRED_FEATURES | K.FEATURES["THREAD_ID"] | K.EVENT_FEATURES


def negotiate(uffd: int) -> K.ApiInfo:
    """Enable the snapshot features on `uffd`, or fail naming the ones this kernel lacks."""
    supported = K.supported_features()
    missing = K.REQUIRED_FEATURES & ~supported
    if missing:
        raise KernelError("UFFDIO_API", errno.EINVAL, f"features={WANTED_FEATURES:#x}",
                          f"kernel lacks {', '.join(K.feature_names(missing))}")
    return K.api(uffd, WANTED_FEATURES & supported)


async def _join(chan: Channel, pid: int, mode: str) -> Welcome:
    await chan.send(Hello(PROTOCOL_VERSION, Role.AGENT.value, pid, mode, process_comm(pid)))
    with trio.fail_after(JOIN_TIMEOUT_S):
        msg, _fds = await chan.receive()
    if isinstance(msg, Abort):
        raise UserError(f"coordinator: {msg.reason}")
    if not isinstance(msg, Welcome):
        raise ProtocolError(f"coordinator answered {msg.TYPE} instead of welcome")
    return msg


def register_stopped(uffd: int, pid: int, obj: ObjectId) -> Tracker:
    """Enable the features and register every shared mapping of `obj` in `pid`, which the
    injection holds stopped (create_uffd_in's `while_stopped`): from here on its forks are
    ours from birth, so a process that forks its successor and exits within milliseconds is
    followed, not chased (the agent then skips its own early registration). A failure to
    register is left for protecting to report, or to find the process gone. Returns what was
    registered, for the agent's tracker (run_agent's `stopped`): a child forked before the
    agent protects inherits it, and is known to live only while something is registered."""
    negotiate(uffd)
    tracker = Tracker(uffd, pid, obj, page_size=0)
    try:
        tracker.register_all()
    except (KernelError, OSError) as e:
        log.debug("registering pid %s while it is stopped: %s", pid, e)
    return tracker


async def run_agent(coordinator: str, pid: int, uffd: int, mode: str,
                    on_joined: Callable[[], None] | None = None,
                    test_hooks: testhooks.Hooks | None = None,
                    handle_signals: bool = True, coordinator_uid: int | None = None,
                    stopped: Tracker | None = None) -> str:
    """Track process `pid` through `uffd` (which this call now owns) for `coordinator`.

    Returns why it ended ("process exited", "coordinator closed the connection", ...). Whatever
    happens, every tracked process is left un-protected and unregistered and every uffd closed.
    (`handle_signals`: end on SIGTERM/SIGINT/SIGHUP; an agent host handles them once for all.
    `coordinator_uid`: a user besides root and ours whom we trust to listen at `coordinator`.
    `stopped`: what register_stopped registered; it enabled the features already.)
    """
    try:
        pidfd = pidfd_open(pid)
    except BaseException:
        os.close(uffd)
        raise
    agent = Agent(pid, test_hooks, handle_signals=handle_signals)
    try:
        if stopped is None:
            negotiate(uffd)
        snapcore.load()  # now, not inside a protect phase, where writers may be waiting
        chan = await connect(coordinator, Role.AGENT, coordinator_uid)
        try:
            welcome = await _join(chan, pid, mode)
            obj = ObjectId(welcome.major, welcome.minor, welcome.inode)
            agent.delegate = welcome.delegate
            if welcome.fault_deadline_ms:  # (an agent host serves one coordinator)
                set_fault_deadline(welcome.fault_deadline_ms / 1000)
            agent.page_size = welcome.page_size
            agent.object_id = obj
            tracker = Tracker(uffd, pid, obj, welcome.page_size, pidfd=pidfd)
            uffd = pidfd = -1  # the tracker owns them now
            if stopped is not None:  # registered while stopped: the forks it made since
                # inherit these ranges (adopt_child), so they must be the tracker's too
                tracker.mappings, tracker.registered = stopped.mappings, stopped.registered
                tracker.never_writable = stopped.never_writable
                tracker.registered_since = stopped.registered_since
            elif mode == "attach":
                _register_early(tracker)
            agent.add(tracker)
            if on_joined is not None:
                on_joined()
            with unwrap_group():
                return await agent.serve(chan)
        finally:
            chan.close()
    finally:
        agent.release_all()
        if uffd >= 0:
            os.close(uffd)
        if pidfd >= 0:
            os.close(pidfd)


def _register_early(tracker: Tracker) -> None:
    """Register an attached process at once, so that what it forks before we protect it is
    ours from birth; if that fails, protecting will say why (or find it gone)."""
    try:
        tracker.register_all()
    except (KernelError, OSError) as e:
        log.debug("registering pid %s early: %s", tracker.pid, e)


__all__ = ["Agent", "WANTED_FEATURES", "negotiate", "register_stopped", "report", "run_agent"]
