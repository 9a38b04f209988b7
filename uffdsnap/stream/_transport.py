"""Byte streams for the migration stream (trio): listening and connecting over TCP and Unix
sockets, standard I/O, and the receiver's one-line reply. Nothing here reads a record."""

from __future__ import annotations

import os
import socket
import stat
import struct

import trio

from uffdsnap.errors import UserError
from uffdsnap.stream._address import Address
from uffdsnap.stream._records import MAX_REPLY, Reply, StreamError, decode_reply

BACKLOG = 16
CONNECT_TIMEOUT_S = 30.0
_UCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


async def open_listener(address: Address) -> tuple[trio.SocketListener, str]:
    """A listening socket at `address` and how to name it (with the port the kernel chose if
    it was 0). UserError if we cannot listen there. A Unix socket is made mode 0600: whoever
    can connect can hand us a stream to write."""
    if address.kind == "tcp":
        try:
            infos = await trio.socket.getaddrinfo(address.host, address.port,
                                                  type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise UserError(f"cannot listen on {address}: {e.strerror}") from None
        family, kind, proto, _, sockaddr = infos[0]
        sock = trio.socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    elif address.kind == "unix":
        if os.path.lexists(address.path):
            raise UserError(f"{address.path} exists (another receiver, or a stale socket?)")
        sock, sockaddr = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), address.path
    else:
        raise UserError("`-` is not something to listen on (use -i - for standard input)")
    try:
        await sock.bind(sockaddr)
        if address.kind == "unix":
            os.chmod(address.path, 0o600)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {address}: {e.strerror or e}") from None
    if address.kind == "tcp":
        bound = sock.getsockname()
        shown = str(Address("tcp", host=bound[0], port=bound[1]))
    else:
        shown = str(address)
    return trio.SocketListener(sock), shown


def close_listener(listener: trio.SocketListener, address: Address) -> None:
    """Close the listening socket; a Unix socket's path goes with it."""
    listener.socket.close()
    if address.kind == "unix":
        try:
            if stat.S_ISSOCK(os.lstat(address.path).st_mode):
                os.unlink(address.path)
        except OSError:
            pass


def peer_name(stream: trio.SocketStream, address: Address) -> str:
    """Who is on the other end, for the log and the result: HOST:PORT, or the socket and the
    connecting process's pid."""
    sock = stream.socket
    if sock.family == socket.AF_UNIX:
        try:
            pid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _UCRED.size))[0]
            return f"{address} (pid {pid})"
        except OSError:
            return str(address)
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_input(spec: str) -> tuple[trio.lowlevel.FdStream, str]:
    """Standard input (`-`), or a file or FIFO that holds a stream, as a trio stream, and its
    name. UserError if it cannot be read."""
    if spec == "-":
        if os.isatty(0):
            raise UserError("standard input is a terminal: pipe a stream in (-i -), or give "
                            "a file")
        return trio.lowlevel.FdStream(os.dup(0)), "stdin"
    try:  # (a FIFO: the open waits for its writer)
        fd = os.open(spec, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"{spec}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{spec}: is a directory, not a stream")
    return trio.lowlevel.FdStream(fd), spec


async def connect(address: Address, *, timeout: float = CONNECT_TIMEOUT_S) -> trio.abc.Stream:
    """The sender's end: a connection to a receiver (or standard output for `-`). UserError
    if the receiver cannot be reached within `timeout`."""
    if address.kind == "stdio":
        return trio.lowlevel.FdStream(os.dup(1))
    try:
        with trio.fail_after(timeout):
            if address.kind == "tcp":
                return await trio.open_tcp_stream(address.host, address.port)
            return await trio.open_unix_socket(address.path)
    except trio.TooSlowError:
        raise UserError(f"cannot reach a receiver at {address}: no answer in {timeout:g} s"
                        ) from None
    except OSError as e:
        raise UserError(f"cannot reach a receiver at {address}: {e.strerror or e}") from None


async def read_reply(stream: trio.abc.ReceiveStream, timeout: float) -> Reply:
    """The receiver's answer (`ok SHA256` or `error: REASON`) within `timeout`, once the
    sender has sent END and closed its sending side (`send_eof`). A sender whose writes
    failed should still call this: the reply says why."""
    line = b""
    with trio.move_on_after(timeout):
        while not line.endswith(b"\n") and len(line) <= MAX_REPLY:
            try:
                piece = await stream.receive_some(MAX_REPLY)
            except trio.BrokenResourceError as e:
                raise StreamError(f"no reply from the receiver: {describe(e)}") from None
            if not piece:
                raise StreamError("the receiver closed the connection without a reply")
            line += piece
        return decode_reply(line.split(b"\n", 1)[0] + b"\n")
    raise StreamError(f"no reply from the receiver within {timeout:g} s")


async def send_line(stream: trio.abc.SendStream, line: bytes, timeout: float) -> bool:
    """Best effort: a peer that is gone or does not read just misses the line."""
    with trio.move_on_after(timeout):
        try:
            await stream.send_all(line)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    return False


async def linger(stream: trio.abc.Stream, timeout: float) -> None:
    """After an error reply: half-close and discard what the sender still had in flight (for
    at most `timeout`), so it can read the reply before the connection is reset."""
    with trio.move_on_after(timeout):
        try:
            if isinstance(stream, trio.SocketStream):
                await stream.send_eof()
            while await stream.receive_some(1 << 16):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def describe(e: BaseException) -> str:
    """A lost connection in a few words (trio wraps the OSError that says how)."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(e) or type(e).__name__
