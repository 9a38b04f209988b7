"""The wire protocol as a pure state machine: no sockets, no processes."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdsnap.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Abort,
    Connection,
    Fault,
    Gone,
    Hello,
    LocalProtocolError,
    Protect,
    Protected,
    Release,
    Released,
    RemoteProtocolError,
    Result,
    Role,
    Snap,
    State,
    Unprotect,
    Welcome,
    decode,
    encode,
)

PS = 4096
SIZE = 64 * PS


def frame(obj: object) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def joined_pair() -> tuple[Connection, Connection]:
    """An agent end and a coordinator end that have exchanged hello/welcome."""
    agent, coord = Connection(Role.AGENT), Connection(Role.COORDINATOR)
    coord.receive_data(agent.send(Hello(PROTOCOL_VERSION, "agent", 42, "attach", "w")))
    assert isinstance(coord.next_message(), Hello)
    agent.receive_data(coord.send(Welcome(PROTOCOL_VERSION, SIZE, PS, 0, 1, 7)))
    assert isinstance(agent.next_message(), Welcome)
    return agent, coord


def deliver(sender: Connection, receiver: Connection, msg: object) -> object:
    receiver.receive_data(sender.send(msg))  # type: ignore[arg-type]
    return receiver.next_message()


def test_full_snapshot_conversation() -> None:
    agent, coord = joined_pair()
    assert agent.state == coord.state == State.IDLE
    assert deliver(coord, agent, Protect(1)) == Protect(1)
    assert deliver(agent, coord, Fault(PS, 9, 123)) == Fault(PS, 9, 123)  # held while protecting
    got = deliver(agent, coord, Protected(1, ((0x7000_0000, SIZE, 0),), 55))
    assert got == Protected(1, ((0x7000_0000, SIZE, 0),), 55)
    assert agent.state == coord.state == State.ACTIVE
    assert deliver(coord, agent, Unprotect(((0, 2 * PS), (8 * PS, PS)))) == \
        Unprotect(((0, 2 * PS), (8 * PS, PS)))
    assert deliver(coord, agent, Release(1)) == Release(1)
    assert deliver(agent, coord, Fault(3 * PS)) == Fault(3 * PS)  # a late fault is legal
    assert deliver(agent, coord, Released(1, 2, ((100, 2),), 999)) == Released(1, 2, ((100, 2),),
                                                                                999)
    assert agent.state == coord.state == State.IDLE
    # and again: snapshots repeat on one connection
    deliver(coord, agent, Protect(2))
    assert agent.state == State.PROTECTING


def test_client_conversation() -> None:
    client, coord = Connection(Role.CLIENT), Connection(Role.COORDINATOR)
    coord.receive_data(client.send(Hello(PROTOCOL_VERSION, "client", 1)))
    coord.next_message()
    client.receive_data(coord.send(Welcome(PROTOCOL_VERSION, SIZE, PS, 0, 1, 7)))
    client.next_message()
    assert deliver(client, coord, Snap("/tmp/x.img", True)) == Snap("/tmp/x.img", True)
    res = Result(True, "", {"faults": 3, "image": "/tmp/x.img"})
    assert deliver(coord, client, res) == res
    with pytest.raises(LocalProtocolError):  # a client cannot pose as an agent...
        client.send(Fault(0))
    coord.receive_data(frame({"t": "fault", "offset": 0}))
    with pytest.raises(RemoteProtocolError):  # ...nor get one past the coordinator
        coord.next_message()


@pytest.mark.parametrize("bad", [
    Fault(SIZE),  # beyond the object
    Fault(PS + 1),  # not page-aligned
])
def test_out_of_range_fault_is_rejected(bad: Fault) -> None:
    agent, coord = joined_pair()
    deliver(coord, agent, Protect(1))
    raw = {"t": "fault", "offset": bad.offset, "tid": 0, "seen_ns": 0}
    coord.receive_data(frame(raw))
    with pytest.raises(RemoteProtocolError, match="page-aligned inside the object"):
        coord.next_message()
    with pytest.raises(LocalProtocolError):  # and we refuse to send one ourselves
        agent.send(bad)


def test_out_of_turn_messages() -> None:
    agent, coord = joined_pair()
    deliver(coord, agent, Protect(1))
    with pytest.raises(LocalProtocolError):  # the rule: nothing is un-protected before T
        coord.send(Unprotect(((0, PS),)))
    agent, coord = joined_pair()
    coord.receive_data(frame({"t": "protected", "snapshot": 1, "mappings": [], "protect_ns": 0}))
    with pytest.raises(RemoteProtocolError, match="may not send protected in state idle"):
        coord.next_message()


def test_hello_must_come_first_and_match_version() -> None:
    coord = Connection(Role.COORDINATOR)
    coord.receive_data(frame({"t": "fault", "offset": 0}))
    with pytest.raises(RemoteProtocolError, match="expected hello"):
        coord.next_message()
    coord = Connection(Role.COORDINATOR)
    coord.receive_data(frame({"t": "hello", "version": 99, "role": "agent", "pid": 1}))
    with pytest.raises(RemoteProtocolError, match="version 99"):
        coord.next_message()
    coord = Connection(Role.COORDINATOR)
    coord.receive_data(frame({"t": "hello", "version": 1, "role": "coordinator", "pid": 1}))
    with pytest.raises(RemoteProtocolError):
        coord.next_message()


@pytest.mark.parametrize("obj,match", [
    ({"t": "nope"}, "unknown message type"),
    ({"t": "fault"}, "missing fields"),
    ({"t": "fault", "offset": -1}, "unsigned integer"),
    ({"t": "fault", "offset": 2**63}, "unsigned integer"),
    ({"t": "fault", "offset": "0"}, "unsigned integer"),
    ({"t": "fault", "offset": True}, "unsigned integer"),
    ({"t": "fault", "offset": 0, "evil": 1}, "unknown fields"),
    ([1, 2, 3], "not a map"),
    ({"t": "unprotect", "ranges": [[0]]}, "2 integers"),
    ({"t": "unprotect", "ranges": [[0, PS]] * 5000}, "at most"),
    ({"t": "gone", "reason": "x" * 5000}, "at most"),
    ({"t": "result", "ok": True, "summary": {"a": [1]}}, "scalars"),
])
def test_malformed_messages(obj: object, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(msgpack.packb(obj))


def test_garbage_and_oversized_frames() -> None:
    coord = Connection(Role.COORDINATOR)
    coord.receive_data(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        coord.next_message()
    coord = Connection(Role.COORDINATOR)
    coord.receive_data(struct.pack(">I", MAX_MESSAGE_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        coord.next_message()


def test_partial_frames_wait_for_more_bytes() -> None:
    agent, coord = joined_pair()
    deliver(coord, agent, Protect(1))
    data = agent.send(Fault(2 * PS)) + agent.send(Fault(3 * PS))
    for byte in data[:-1]:
        coord.receive_data(bytes([byte]))
    assert coord.next_message() == Fault(2 * PS)
    assert coord.next_message() is None
    coord.receive_data(data[-1:])
    assert coord.next_message() == Fault(3 * PS)


def test_messages_crossing_released_are_legal_in_idle() -> None:
    """The coordinator may un-protect after the agent sent `released` (they cross in flight),
    and an agent may read one last fault after it: stale, harmless, and not a protocol error."""
    agent, coord = joined_pair()
    deliver(coord, agent, Protect(1))
    deliver(agent, coord, Protected(1, (), 0))
    deliver(coord, agent, Release(1))
    late = coord.send(Unprotect(((0, PS),)))  # coordinator: still releasing
    deliver(agent, coord, Released(1))
    agent.receive_data(late)
    assert agent.next_message() == Unprotect(((0, PS),))
    assert deliver(agent, coord, Fault(PS)) == Fault(PS)
    assert agent.state == coord.state == State.IDLE


def test_abort_and_gone_close_from_any_state() -> None:
    for closer in ("abort", "gone"):
        agent, coord = joined_pair()
        deliver(coord, agent, Protect(1))
        msg = Abort("bye") if closer == "abort" else Gone("process exited")
        deliver(agent, coord, msg)
        assert coord.state == State.CLOSED
        with pytest.raises(LocalProtocolError):
            coord.send(Release(1))


def test_every_transition_names_a_known_message() -> None:
    from uffdsnap.protocol import MESSAGES

    assert {t for (_, t, _) in TRANSITIONS} <= set(MESSAGES)


# Any byte string fed to a coordinator either yields valid messages or raises
# RemoteProtocolError: never another exception, never a hang.
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    coord = Connection(Role.COORDINATOR)
    coord.receive_data(data)
    try:
        while coord.next_message() is not None:
            pass
    except RemoteProtocolError:
        pass


scalars = st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.text(max_size=20),
                    st.booleans(), st.none(), st.binary(max_size=10), st.floats())


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["fault", "unprotect", "protected", "released", "hello", "welcome"]),
       st.dictionaries(st.sampled_from(["offset", "ranges", "mappings", "snapshot", "version",
                                        "role", "pid", "size", "page_size", "service_hist",
                                        "faults", "x"]),
                       st.one_of(scalars, st.lists(st.lists(scalars, max_size=4), max_size=4)),
                       max_size=6))
def test_random_structured_messages_are_checked(kind: str, fields: dict[str, object]) -> None:
    agent, coord = joined_pair()
    deliver(coord, agent, Protect(1))
    coord.receive_data(frame({"t": kind, **fields}))
    try:
        msg = coord.next_message()
    except RemoteProtocolError:
        return
    # what was accepted re-encodes to itself and lies inside the object
    assert msg is not None
    assert decode(encode(msg)[4:]) == msg


def test_fault_channel_golden_frames() -> None:
    """The fault channel's fixed encoding: the codec writes the golden bytes, reads them back,
    refuses the same message in another msgpack shape, and the general decoder accepts them
    (they are protocol messages). tests/system/test_snapcore.py feeds the same bytes to the C
    core."""
    from uffdsnap.protocol import faultchannel as fc

    fault, fault_bytes = fc.GOLDEN["fault"]
    unprotect, unprotect_bytes = fc.GOLDEN["unprotect"]
    assert fc.encode_fault(fault) == fault_bytes
    assert fc.encode_unprotect(*unprotect.ranges[0]) == unprotect_bytes
    for msg, frame in ((fault, fault_bytes), (unprotect, unprotect_bytes)):
        assert fc.decode_frame(frame) == msg
        assert decode(frame[4:]) == msg
        with pytest.raises(RemoteProtocolError):
            fc.decode_frame(encode(msg))  # same message, ordinary (smallest) integers
    with pytest.raises(RemoteProtocolError):
        fc.decode_frame(fault_bytes[:-1])
