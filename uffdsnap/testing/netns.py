"""A real network path for tests and the bench, built with pyroute2 (a test dependency) and torn
down afterwards.

    with netns_link(rate_bits=100_000_000) as link:
        receiver = link.popen([sys.executable, "-m", "uffdsnap", "receive", "--listen",
                               f"{link.receiver_addr}:7000", "-o", out], stdout=PIPE)
        sock = link.socket()          # a TCP socket inside the sender's namespace
        sender = link.popen([...], side="sender")

Two network namespaces made here, the receiver's and the sender's, each with loopback up and one
end of a veth pair; the addresses are on a /30 of 198.18.0.0/15 (RFC 2544: reserved for testing
network devices, never routed), assigned inside those namespaces only. Nothing is added to the
host's own namespace (the veth pair passes through it for an instant, under a random name), so
traffic between the two ends cannot leave the machine. With `rate_bits`, tbf shapes both
directions of the link. Every process started through the link is killed, and both namespaces
are removed (which destroys the veth pair), when the block ends. Needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN for setns).
"""

from __future__ import annotations

import secrets
import socket as _socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pyroute2 import IPRoute, NetNS, netns

from uffdsnap.native.libc import CLONE_NEWNET, setns

NETNS_DIR = getattr(netns, "NETNS_RUN_DIR", "/var/run/netns")
SENDER_ADDR = "198.18.0.1"
RECEIVER_ADDR = "198.18.0.2"
PREFIX_LEN = 30
TBF_LATENCY = "100ms"  # how long a packet may queue in tbf before it is dropped

Side = Literal["receiver", "sender"]

# Run argv inside a namespace: setns() the process, then exec (no iproute2 needed).
_ENTER = """\
import ctypes, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
    sys.exit("setns %s: %s" % (sys.argv[1], os.strerror(ctypes.get_errno())))
os.close(fd)
os.execvp(sys.argv[2], sys.argv[2:])
"""


@dataclass
class NetLink:
    """Two namespaces joined by a veth pair: names, addresses, and ways in."""

    receiver_ns: str
    sender_ns: str
    receiver_ifname: str
    sender_ifname: str
    rate_bits: int | None
    receiver_addr: str = RECEIVER_ADDR
    sender_addr: str = SENDER_ADDR
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def ns(self, side: Side) -> str:
        return self.receiver_ns if side == "receiver" else self.sender_ns

    def command(self, argv: list[str], *, side: Side = "receiver") -> list[str]:
        """`argv` made to run inside the namespace of `side`."""
        return [sys.executable, "-c", _ENTER, f"{NETNS_DIR}/{self.ns(side)}", *argv]

    def popen(self, argv: list[str], *, side: Side = "receiver",
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside the namespace; it is killed when the link is torn down."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(argv, side=side), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], *, side: Side = "receiver", timeout: float = 60,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` inside the namespace to completion (bounded by `timeout`)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(argv, side=side), timeout=timeout, **kwargs)

    def socket(self, family: int = _socket.AF_INET, kind: int = _socket.SOCK_STREAM, *,
               side: Side = "sender") -> _socket.socket:
        """A socket that lives in the namespace of `side` (made by a thread that enters it, so
        this process stays where it is)."""
        made: list[_socket.socket | BaseException] = []

        def make() -> None:
            try:
                setns(f"{NETNS_DIR}/{self.ns(side)}", CLONE_NEWNET)
                made.append(_socket.socket(family, kind))
            except BaseException as e:  # handed to the caller's thread
                made.append(e)

        thread = threading.Thread(target=make)
        thread.start()
        thread.join(timeout=10)
        if not made:
            raise TimeoutError("could not make a socket in the namespace")
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    def set_rate(self, rate_bits: int | None) -> None:
        """Shape both directions to `rate_bits` (None: no shaping)."""
        for side, ifname in (("sender", self.sender_ifname), ("receiver", self.receiver_ifname)):
            with NetNS(self.ns(side)) as ns:  # type: ignore[arg-type]
                index = ns.link_lookup(ifname=ifname)[0]
                try:
                    ns.tc("del", index=index)
                except Exception:  # no qdisc of ours yet
                    pass
                if rate_bits:
                    ns.tc("add", "tbf", index, 0x10000, rate=f"{rate_bits}bit",
                          burst=max(rate_bits // 8 // 250, 16 << 10), latency=TBF_LATENCY)
        self.rate_bits = rate_bits

    def set_up(self, up: bool) -> None:
        """Cut the link (the sender's end down: packets go nowhere, TCP retransmits into the
        void) or restore it."""
        with NetNS(self.sender_ns) as ns:
            index = ns.link_lookup(ifname=self.sender_ifname)[0]
            ns.link("set", index=index, state="up" if up else "down")


@contextmanager
def netns_link(rate_bits: int | None = None) -> Iterator[NetLink]:
    """A sender's and a receiver's namespace joined by a veth pair (shaped to `rate_bits`
    each way with tbf, if given); all of it removed afterwards."""
    tag = secrets.token_hex(3)
    link = NetLink(receiver_ns=f"uffdsnap-rcv-{tag}", sender_ns=f"uffdsnap-snd-{tag}",
                   receiver_ifname=f"usv{tag}r", sender_ifname=f"usv{tag}s", rate_bits=None)
    made: list[str] = []
    try:
        for name in (link.sender_ns, link.receiver_ns):
            netns.create(name)
            made.append(name)
        with IPRoute() as ip:
            ip.link("add", ifname=link.sender_ifname, kind="veth", peer=link.receiver_ifname)
            for ifname, side in ((link.sender_ifname, "sender"),
                                 (link.receiver_ifname, "receiver")):
                ip.link("set", index=ip.link_lookup(ifname=ifname)[0],
                        net_ns_fd=link.ns(side))  # type: ignore[arg-type]
        for side, ifname, addr in (("sender", link.sender_ifname, link.sender_addr),
                                   ("receiver", link.receiver_ifname, link.receiver_addr)):
            with NetNS(link.ns(side)) as ns:  # type: ignore[arg-type]
                index = ns.link_lookup(ifname=ifname)[0]
                ns.addr("add", index=index, address=addr, prefixlen=PREFIX_LEN)
                ns.link("set", index=index, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        if rate_bits:
            link.set_rate(rate_bits)
        yield link
    finally:
        for proc in link.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for name in made:
            netns.remove(name)  # the veth pair goes with the namespace
        with IPRoute() as ip:  # unless it never got there
            for ifname in (link.sender_ifname, link.receiver_ifname):
                for index in ip.link_lookup(ifname=ifname):
                    ip.link("del", index=index)

