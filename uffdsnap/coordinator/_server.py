"""The coordinator's server: accepts agents and clients on one Unix socket, each connection a task
in one nursery that contains its own failures (one peer's error never ends the others'), turns
their messages into events for the running snapshot (_run.py), and serves client requests."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from uffdsnap import testhooks
from uffdsnap.channel import Channel, PeerClosed
from uffdsnap.coordinator._accept import MAX_CONNECTIONS, Doorman
from uffdsnap.coordinator._agents import agent_messages
from uffdsnap.coordinator._attach import Attacher, ForkedHost
from uffdsnap.coordinator._copy import CHUNK_BYTES, StreamJob
from uffdsnap.coordinator._escapes import EscapeAuditor
from uffdsnap.coordinator._native import Idents
from uffdsnap.coordinator._peers import OUTBOX_DEPTH, Peer, close_all, send_loop
from uffdsnap.coordinator._publish import snapshot_to_file, snapshot_to_receiver
from uffdsnap.coordinator._report import flat
from uffdsnap.coordinator._run import Run
from uffdsnap.coordinator._tracking import WriteTracking
from uffdsnap.coordinator._trust import Credentials, PidView, admit_agent, client_refusal
from uffdsnap.errors import SnapshotFailed, UserError
from uffdsnap.groups import unwrap_group
from uffdsnap.image import ImageWriter
from uffdsnap.native import core as native_core
from uffdsnap.native.core import SnapCore
from uffdsnap.native.pidfd import pidfd_open
from uffdsnap.native.scm import peer_credentials
from uffdsnap.procfs import SharedObject, find_mappers, mappings_of, registered_mapper
from uffdsnap.protocol import (
    MAX_TEXT,
    PROTOCOL_VERSION,
    Abort,
    Hello,
    ProtocolError,
    Result,
    Role,
    Snap,
    State,
    Unprotect,
    Welcome,
)
from uffdsnap.stream import STREAM_TIMEOUT_S, StreamOptions

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0


class Coordinator:
    """Serves agent and client connections for one object and takes snapshots on request."""

    def __init__(self, obj: SharedObject, *, protect_timeout: float = 30.0,
                 join_timeout: float | None = None,
                 attach_path: str | None = None, delegate: bool = False,
                 chunk_bytes: int = CHUNK_BYTES,
                 on_progress: Callable[[int, int], None] | None = None,
                 test_hooks: testhooks.Hooks | None = None,
                 agent_host: ForkedHost | None = None, clients_gid: int | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 fault_deadline: float = native_core.FAULT_DEADLINE_MS / 1000,
                 strict: bool = False):
        native_core.load()  # the native data path, or fail now (one line)
        self.obj = obj
        self.page_size = obj.page_size
        self.protect_timeout = protect_timeout
        self.fault_deadline = fault_deadline  # the longest a writer may wait on us (_watch.py)
        # before T, look for writes that would escape tracking; `strict`: refuse if found
        self.escape_audit = EscapeAuditor(strict)
        # how long attach agents get to join (injection is slower than protecting)
        self.join_timeout = protect_timeout if join_timeout is None else join_timeout
        self.chunk_bytes = max(chunk_bytes - chunk_bytes % obj.page_size, obj.page_size)
        self.on_progress = on_progress
        self.clients_gid = clients_gid  # besides our own user and root, who may be a client
        self.doorman = Doorman(max_connections)  # how many connections, and who gets in
        # Test hooks (uffdsnap/testhooks.py): never set in normal use.
        self.test_hooks: testhooks.Hooks = test_hooks or {}
        # With attach_path (this coordinator's own socket), every writable mapper without an
        # agent gets an attach agent at each snapshot, for the duration of that snapshot.
        self.attacher = (Attacher(attach_path, obj.object_id, self.test_hooks.get("agent"),
                                  agent_host)
                         if attach_path else None)
        # Delegated mode: agents hand us copies of their uffds while protected; our native
        # core reads their faults and un-protects directly, with no message round trips.
        self.delegate = delegate
        self.peers: list[Peer] = []
        self.peers_changed = trio.Event()
        self.run: Run | None = None
        self.idents = Idents()
        self._snapshot_lock = trio.Lock()
        # incremental snapshots: what was written since the last image we published
        self.tracking = WriteTracking(-(-obj.size // obj.page_size), obj.page_size)
        self.last_run: Run | None = None
        self._next_id = 1
        self._nursery: trio.Nursery | None = None

    # ---- connections ----------------------------------------------------------------------

    async def serve(self, listener: trio.socket.SocketType,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept agents and clients on a listening Unix socket until cancelled. Running out of
        descriptors pauses accepting, never ends it; past max_connections, peers other than
        root and our own user are refused with the reason."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.doorman.accept_all(listener, nursery, self._serve_connection)

    async def _serve_connection(self, chan: Channel) -> None:
        """One peer, start to end. Whatever goes wrong here ends this connection only; a client
        whose request failed unexpectedly gets a failed result first."""
        try:
            with unwrap_group():
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    hello, _fds = await chan.receive()
                assert isinstance(hello, Hello)  # the state machine admits nothing else first
                admitted = self._admission(chan, hello)
                if isinstance(admitted, str):
                    log.warning("refused a connection: %s", admitted)
                    with trio.move_on_after(1):
                        await chan.send(Abort(f"refused: {admitted}"))
                    return
                if hello.role == Role.CLIENT.value:
                    await chan.send(self._welcome())
                    await self._serve_client(chan)
                else:
                    await self._serve_agent(chan, *admitted)
        except (PeerClosed, trio.TooSlowError, OSError):
            pass
        except ProtocolError as e:
            await _goodbye(chan, f"protocol error: {e}")
        except Exception as e:  # a bug must not take every other peer down with it
            log.error("connection dropped after an unexpected error: %s: %s",
                      type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            await _goodbye(chan, f"the coordinator failed: {type(e).__name__}: {e}")
        finally:
            chan.close()
            self.doorman.ended()

    def _admission(self, chan: Channel, hello: Hello) -> str | tuple[Hello, PidView]:
        """Why this peer may not have the role it asks for; else its hello, naming the agent's
        process by our pid (it names it in its own PID namespace), and how it names pids; see
        _trust."""
        pid, uid, gid = peer_credentials(chan.sock)
        peer = Credentials(pid, uid, gid)
        if hello.role == Role.CLIENT.value:
            refusal = client_refusal(peer, os.geteuid(), self.clients_gid)
            return refusal if refusal is not None else (hello, PidView(pid, 0, (0, 0)))  # unused
        admitted = admit_agent(peer, os.geteuid(), hello.pid)
        if isinstance(admitted, str):
            return admitted
        target, view = admitted
        return dataclasses.replace(hello, pid=target), view

    def _welcome(self) -> Welcome:
        oid = self.obj.object_id
        return Welcome(PROTOCOL_VERSION, self.obj.size, self.page_size, oid.major, oid.minor,
                       oid.inode, self.delegate, round(self.fault_deadline * 1000))

    async def _serve_client(self, chan: Channel) -> None:
        while True:
            msg, fds = await chan.receive()
            if isinstance(msg, Snap):
                try:
                    summary = await self._request(chan, msg, fds)
                except (SnapshotFailed, UserError, OSError) as e:
                    await chan.send(Result(False, _one_line(str(e) or type(e).__name__), {}))
                else:
                    await chan.send(Result(True, "", flat(summary)))
            elif isinstance(msg, Abort):
                return

    async def _request(self, chan: Channel, msg: Snap, fds: list[int]) -> dict[str, Any]:
        """A client's `snap`. An image goes into the files the client passed (created with its
        rights); only root and our own user may have us create it by name instead."""
        stream = stream_options(msg)
        if stream is not None or msg.files:
            if stream is not None and fds:
                close_all(fds)
                raise UserError("a streamed snapshot takes no files")
            return await self.snapshot(msg.output, overwrite=msg.overwrite, stream=stream,
                                       incremental=msg.incremental,
                                       files=(fds[0], fds[1]) if fds else None)
        if peer_credentials(chan.sock)[1] not in (0, os.geteuid()):
            raise UserError("this coordinator writes images only into files its client "
                            "created (pass them with `snap`, files=true: `uffdsnap snapshot "
                            "--coordinator` does)")
        return await self.snapshot(msg.output, overwrite=msg.overwrite,
                                   incremental=msg.incremental)

    async def _serve_agent(self, chan: Channel, hello: Hello, view: PidView) -> None:
        try:
            pidfd = pidfd_open(hello.pid)
        except OSError as e:
            await chan.send(Abort(f"cannot watch pid {hello.pid}: {e}"))
            return
        outbox_send, outbox_recv = trio.open_memory_channel[Any](OUTBOX_DEPTH)
        peer = Peer(chan, hello.pid, hello.comm, hello.mode, pidfd, outbox_send)
        # Join before the welcome goes out: an enlisting workload carries on as soon as its
        # agent is welcomed, and a snapshot started then must already count it as tracked.
        self.peers.append(peer)
        self.changed()
        if self.run is not None:
            self.run.joined(peer)
        why = ""
        try:
            await chan.send(self._welcome())  # first; whatever joining queued follows it
            with unwrap_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_loop, peer, outbox_recv, nursery.cancel_scope)
                    await agent_messages(self, peer, view)
                    nursery.cancel_scope.cancel()
        except (PeerClosed, ProtocolError, OSError) as e:
            why = f"agent for pid {peer.pid} ({peer.comm}) lost: {e}"
        except Exception as e:
            log.error("agent for pid %d: unexpected error: %s: %s", peer.pid,
                      type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            why = f"agent for pid {peer.pid} ({peer.comm}) lost: {type(e).__name__}: {e}"
        finally:
            if not why and peer.send_error:
                why = f"agent for pid {peer.pid} ({peer.comm}) lost: {peer.send_error}"
            self.peers.remove(peer)
            self.changed()
            self.tracking.agent_left(peer, f"pid {peer.pid} ({peer.comm})",
                                     bool(why) and peer.any_alive())
            if self.run is not None:  # on every way out, cancellation included
                self.run.lost(peer, why)
                self.run.link.close_peer(peer)
            for tracker in list(peer.delegated):  # (only if no run took them)
                tracker.close()
            os.close(pidfd)

    def changed(self) -> None:
        self.peers_changed.set()
        self.peers_changed = trio.Event()

    # ---- what the snapshot driver asks of us -----------------------------------------------

    def wake(self, peer: Peer, offset: int) -> None:
        """Un-protect one page in one agent now (the faulting one; the others get it batched)."""
        peer.post_nowait(Unprotect(((offset, self.page_size),)))

    def maps_object_writable(self, pid: int) -> bool:
        try:
            return any(m.writable for m in mappings_of(pid, self.obj.object_id))
        except OSError:
            return False  # gone, or hidden from us: then it is no mapper we could track

    def untracked_writers(self, tracked: set[int]) -> list[int]:
        """Pids that map the object writable and are not in `tracked`."""
        mappers = find_mappers(self.obj.object_id, exclude={os.getpid()})
        return sorted(pid for pid, maps in mappers.items()
                      if pid not in tracked and any(m.writable for m in maps))

    def attachable(self, pids: list[int]) -> list[int]:
        """Those of `pids` an agent could attach to: not already registered with a uffd (a
        child of a tracked process, which its agent is about to report)."""
        return [pid for pid in pids if not registered_mapper(pid, self.obj.object_id)]

    async def attach_first(self) -> None:
        """Attach every writable mapper, none of them tracked yet (a one-shot snapshot, or a
        long-running coordinator's first; later ones go straight to protect, and the look
        before T attaches a newcomer while the others wait, as one that maps the object during
        the protect). Nothing is tracked, so none can be a tracked process's child: they are not
        asked whether they are registered already (/proc/PID/smaps walks every page table: 2 ms
        a process); one that another userfaultfd user registered fails its attach (EBUSY), which
        fails the snapshot. ScanUnstable if /proc would not hold still."""
        await self.attach(self.untracked_writers(set()))

    async def attach(self, pids: list[int]) -> None:
        """Start attach agents for `pids` and wait until each has joined or its process is gone."""
        if not pids or self.attacher is None:
            return
        assert self._nursery is not None
        agents = await self.attacher.start(pids, self._nursery)
        await self.attacher.wait_joined(agents, lambda: {p.pid for p in self.peers},
                                        lambda: self.peers_changed, self.join_timeout)

    def stuck_agents(self, peers: list[Peer]) -> None:
        """These agents did not release in time. Attach agents are ours to end: their host is
        killed, which releases every target it holds (they are attached anew next time).
        (An enlisted agent belongs to its workload; its connection is closed, which tells it.)"""
        for peer in peers:
            if peer.mode == "attach" and self.attacher is not None:
                self.attacher.kill_host(f"the agent for pid {peer.pid} did not release")
            else:
                peer.chan.close()

    async def aclose(self) -> None:
        """Let the attach agents go (their host exits once the last one has released)."""
        if self.attacher is not None:
            await self.attacher.aclose()

    # ---- the snapshot ----------------------------------------------------------------------

    async def snapshot(self, output: str, *, overwrite: bool = False,
                       stream: StreamOptions | None = None, incremental: bool = False,
                       files: tuple[int, int] | None = None) -> dict[str, Any]:
        """Take one snapshot into `output`, or streamed to a receiver (`stream`: then
        `output` is ignored); return its summary or raise SnapshotFailed. `incremental`: a
        delta of what was written since the last image we published, if we can prove we saw
        every write (the first such request starts write tracking; see _tracking). `files`:
        an unnamed image file and manifest file (which this call now owns) to fill instead of
        publishing `output` ourselves: the caller names them."""
        async with self._snapshot_lock:
            if incremental:
                self.tracking.start()
            self.last_run = None
            if stream is not None:
                return await snapshot_to_receiver(self, stream, incremental)
            return await snapshot_to_file(self, output, overwrite, incremental, files)

    async def take(self, core: SnapCore, *, writer: ImageWriter | None = None,
                   stream: StreamJob | None = None,
                   incremental: bool = False) -> dict[str, Any]:
        """One run over `core`, saving into `writer` or streamed (`stream`); under the
        snapshot lock."""
        if self.test_hooks.get("unprotect_before_save"):  # wrong on purpose
            core.set_test_flags(native_core.TEST_UNPROTECT_BEFORE_SAVE)
        run = Run(self, self._next_id, writer, core, stream)
        self._next_id += 1
        self.last_run = run
        if self.tracking.active:
            run.track(self.tracking.begin(), incremental)
        for peer in self.peers:
            run.joined(peer)
        self.run = run
        try:
            with unwrap_group():
                return await run.take()
        finally:
            self.run = None



async def _goodbye(chan: Channel, why: str) -> None:
    """Say why the connection ends, if the peer still listens (bounded; errors ignored): a
    client waiting for its request's answer gets a failed result, anyone else an abort."""
    why = _one_line(why)
    msg = Result(False, why) if chan.conn.state == State.REQUESTED else Abort(why)
    with trio.move_on_after(1):
        try:
            await chan.send(msg)
        except (PeerClosed, ProtocolError, OSError):
            pass


def _one_line(text: str) -> str:
    """`text` as a reason the protocol carries: one line, within its length limit."""
    return " ".join(text.split())[:MAX_TEXT]


def stream_options(msg: Snap) -> StreamOptions | None:
    """A `snap` request's stream (its `to` and the options that travel with it), if any."""
    if not msg.to:
        return None
    options = StreamOptions(msg.to, msg.compress, msg.max_rate, msg.staging,
                            msg.stream_timeout_ms / 1000 if msg.stream_timeout_ms else
                            STREAM_TIMEOUT_S)
    options.check(remote=True)  # UserError: the client's answer says why
    return options
