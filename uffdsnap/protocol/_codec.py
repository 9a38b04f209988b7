"""Bytes ⇄ messages: framing (a 4-byte big-endian length, then one msgpack map), and validation
of every field (kind, range, size, offsets inside the object). Pure: no I/O."""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from uffdsnap.errors import ProtocolError
from uffdsnap.protocol._messages import (
    MAX_HISTOGRAM_BUCKETS,
    MAX_MAPS,
    MAX_MESSAGE_BYTES,
    MAX_RANGES,
    MAX_TEXT,
    MAX_TEXTS,
    MESSAGES,
    Delegate,
    Fault,
    Message,
    Protected,
    Removed,
    Unprotect,
    Written,
)

_U63 = (1 << 63) - 1
HEADER = struct.Struct(">I")


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized, unknown, out of range or out of turn."""


@dataclass(frozen=True)
class ObjectGeometry:
    """What offsets in messages are checked against once the coordinator has said it."""

    size: int
    page_size: int


def _check_u(name: str, v: Any) -> int:
    if type(v) is not int or not 0 <= v <= _U63:
        raise RemoteProtocolError(f"field {name!r} must be an unsigned integer, got {v!r:.60}")
    return v


def _check_list(name: str, v: Any, limit: int) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or len(v) > limit:
        raise RemoteProtocolError(f"field {name!r} must be a list of at most {limit} integers")
    return tuple(_check_u(name, x) for x in v)


def _check_pairs(name: str, v: Any, width: int, limit: int) -> tuple[tuple[int, ...], ...]:
    if not isinstance(v, list | tuple) or len(v) > limit:
        raise RemoteProtocolError(f"field {name!r} must be a list of at most {limit} entries")
    out = []
    for item in v:
        if not isinstance(item, list | tuple) or len(item) != width:
            raise RemoteProtocolError(f"field {name!r} entries must have {width} integers")
        out.append(tuple(_check_u(name, x) for x in item))
    return tuple(out)


def _check_field(name: str, kind: str, v: Any) -> Any:
    if kind == "u":
        return _check_u(name, v)
    if kind == "s":
        if not isinstance(v, str) or len(v) > MAX_TEXT:
            raise RemoteProtocolError(f"field {name!r} must be text of at most {MAX_TEXT} chars")
        return v
    if kind == "b":
        if not isinstance(v, bool):
            raise RemoteProtocolError(f"field {name!r} must be a boolean")
        return v
    if kind == "ranges":
        return _check_pairs(name, v, 2, MAX_RANGES)
    if kind == "maps":
        return _check_pairs(name, v, 3, MAX_MAPS)
    if kind == "texts":
        if not isinstance(v, list | tuple) or len(v) > MAX_TEXTS or not all(
                isinstance(t, str) and len(t) <= MAX_TEXT for t in v):
            raise RemoteProtocolError(f"field {name!r} must be a list of at most {MAX_TEXTS} "
                                      f"texts of at most {MAX_TEXT} chars")
        return tuple(v)
    if kind == "pids":
        return _check_list(name, v, MAX_RANGES)
    if kind == "hist":
        return _check_pairs(name, v, 2, MAX_HISTOGRAM_BUCKETS)
    if kind == "d":
        if not isinstance(v, dict) or len(v) > 64:
            raise RemoteProtocolError(f"field {name!r} must be a small map")
        for key, val in v.items():
            if not isinstance(key, str) or not isinstance(val, int | float | str | bool | None):
                raise RemoteProtocolError(f"field {name!r} must map names to scalars")
        return dict(v)
    raise AssertionError(kind)


def _check_span(what: str, offset: int, length: int, geo: ObjectGeometry) -> None:
    ps = geo.page_size
    # (an object whose size is not a multiple of the page size ends in a partial page)
    if offset % ps or length % ps or length == 0 or offset + length > -(-geo.size // ps) * ps:
        raise RemoteProtocolError(
            f"{what} [{offset:#x}, +{length:#x}) is not page-aligned inside the object "
            f"(size {geo.size:#x}, page {ps:#x})"
        )


def check_geometry(msg: Message, geo: ObjectGeometry | None) -> None:
    """Check that every offset in `msg` lies inside the object, page-aligned."""
    if geo is None:
        return
    if isinstance(msg, Fault):
        _check_span("fault", msg.offset, geo.page_size, geo)
    elif isinstance(msg, Unprotect | Removed | Written):
        for off, length in msg.ranges:
            _check_span("unprotect range", off, length, geo)
    elif isinstance(msg, Protected | Delegate):
        for addr, length, off in msg.mappings:
            # a mapping may reach past the object's end (those pages would SIGBUS): only its
            # start must lie inside the object
            if addr % geo.page_size or off % geo.page_size or length % geo.page_size \
                    or off >= geo.size:
                raise RemoteProtocolError(f"mapping at offset {off:#x} (+{length:#x}) is not "
                                          "page-aligned inside the object")


def decode(payload: bytes, error: type[ProtocolError] = RemoteProtocolError) -> Message:
    """One message from its msgpack payload, fully validated (not against the geometry)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise error(f"undecodable message ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise error("message is not a map with a type field 't'")
    cls = MESSAGES.get(obj["t"])
    if cls is None:
        raise error(f"unknown message type {obj['t']!r:.40}")
    declared = {f.name for f in fields(cls)}
    extra = set(obj) - declared - {"t"}
    if extra:
        raise error(f"{cls.TYPE}: unknown fields {sorted(extra)!r:.80}")
    values = {}
    try:
        for f in fields(cls):
            if f.name in obj:
                values[f.name] = _check_field(f.name, cls.KINDS[f.name], obj[f.name])
    except RemoteProtocolError as e:
        raise error(f"{cls.TYPE}: {e}") from None
    try:
        return cls(**values)
    except TypeError:
        missing = sorted(n for n in declared - set(values))
        raise error(f"{cls.TYPE}: missing fields {missing}") from None


def encode(msg: Message) -> bytes:
    """The framed bytes of `msg`; validates it the way the peer will."""
    obj: dict[str, Any] = {"t": msg.TYPE}
    for f in fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, tuple):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        obj[f.name] = v
    payload = msgpack.packb(obj, use_bin_type=True)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"{msg.TYPE} message of {len(payload)} bytes exceeds the limit")
    decode(payload, LocalProtocolError)  # what we send must pass the peer's checks
    return HEADER.pack(len(payload)) + payload
