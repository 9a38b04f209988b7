"""Where a stream goes or comes from, as a user writes it: `tcp://HOST:PORT`, `HOST:PORT`
(`[V6ADDR]:PORT` for IPv6), `unix:PATH`, or `-` (standard input or output). Pure: parsing only;
names are resolved when they are used."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from uffdsnap.errors import UserError

MAX_UNIX_PATH = 107  # sun_path holds 108 bytes, the last one the terminating NUL
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Address:
    """A parsed address: TCP (host, port), a Unix socket path, or standard I/O."""

    kind: Literal["tcp", "unix", "stdio"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        return f"unix:{self.path}" if self.kind == "unix" else "-"


def parse_address(text: str, *, listen: bool = False) -> Address:
    """Parse `text`; UserError (one line) if it is not an address we can use. Port 0 (the
    kernel picks one) only makes sense to listen on."""
    if text == "-":
        return Address("stdio")
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise UserError("unix: needs a socket path, e.g. unix:/run/uffdsnap.sock")
        if "\0" in path:
            raise UserError("a socket path cannot contain a NUL byte")
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise UserError(f"socket path {path[:40]}... is longer than {MAX_UNIX_PATH} bytes")
        return Address("unix", path=path)
    rest = text[6:] if text.startswith("tcp://") else text
    if "://" in rest:
        raise UserError(f"{text!r}: unknown scheme (use tcp://HOST:PORT, HOST:PORT, "
                        "unix:PATH or -)")
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        raise UserError(f"{text!r}: not an address (use HOST:PORT, tcp://HOST:PORT, unix:PATH "
                        "or -)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or not re.fullmatch(r"[0-9A-Fa-f:.]+", host) or ":" not in host:
            raise UserError(f"{text!r}: not an IPv6 address in brackets")
    elif ":" in host:
        raise UserError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:7000")
    elif not host or not _HOST_RE.fullmatch(host):
        raise UserError(f"{text!r}: not a host name or address")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise UserError(f"{text!r}: port must be a number from {0 if listen else 1} to 65535")
    port = int(port_text)
    if port == 0 and not listen:
        raise UserError(f"{text!r}: port 0 can only be listened on")
    return Address("tcp", host=host, port=port)
