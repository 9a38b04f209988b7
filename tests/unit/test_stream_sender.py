"""The sender's pure parts: options and their errors, the default staging bound, the pace (on
trio's virtual clock: no real time), runs of faulted pages, and the `snap` request that carries
a stream to a coordinator."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from uffdsnap.coordinator._copy import _runs
from uffdsnap.errors import UserError
from uffdsnap.protocol import PROTOCOL_VERSION, Connection, Hello, Role, Snap, Welcome
from uffdsnap.stream import StreamOptions, TokenBucket, default_staging

MiB = 1 << 20
P = 4096


def test_default_staging() -> None:
    assert default_staging(16 * MiB, P) == 16 * MiB  # a small object: all of it
    assert default_staging(256 * MiB, P) == 64 * MiB  # at least 64 MiB
    assert default_staging(4096 * MiB, P) == 512 * MiB  # an eighth of a large one
    assert default_staging(0, P) == P  # never nothing
    assert StreamOptions("h:1", staging=10_000).staging_bytes(MiB, P) == 8192  # whole pages
    assert StreamOptions("h:1", staging=100).staging_bytes(MiB, P) == P


@pytest.mark.parametrize("options,remote,needle", [
    (StreamOptions("-"), True, "not with --coordinator"),
    (StreamOptions("h:1", max_rate=-1), False, "--max-rate"),
    (StreamOptions("h:1", staging=-1), False, "--staging"),
    (StreamOptions("h:1", stream_timeout=0), False, "--stream-timeout"),
    (StreamOptions("h:1", stream_timeout=float("inf")), False, "--stream-timeout"),
    (StreamOptions("h:0"), False, "port 0"),
    (StreamOptions("ftp://h:1"), False, "unknown scheme"),
])
def test_bad_options_are_one_line(options: StreamOptions, remote: bool, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        options.check(remote=remote)


def test_good_options() -> None:
    assert StreamOptions("-").check().kind == "stdio"
    assert StreamOptions("unix:/run/r.sock").check(remote=True).path == "/run/r.sock"
    assert StreamOptions("tcp://[::1]:7000").check().port == 7000


async def test_token_bucket_paces_to_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    """1 MiB at 256 KiB/s takes ~4 s of (virtual) time, less the burst it starts with."""
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    bucket = TokenBucket(256 << 10)
    start = trio.current_time()
    for _ in range(16):
        await bucket.take(64 << 10)
    took = trio.current_time() - start
    assert (MiB - bucket.burst) / (256 << 10) * 0.99 <= took <= MiB / (256 << 10) * 1.01


def test_runs_of_faulted_pages() -> None:
    assert list(_runs([1, 2, 3, 7, 9, 10], 100)) == [(1, 3), (7, 1), (9, 2)]
    assert list(_runs([0, 1, 2, 3, 4], 2)) == [(0, 2), (2, 2), (4, 1)]
    assert list(_runs([], 4)) == []


def test_snap_carries_a_stream() -> None:
    client, coord = Connection(Role.CLIENT), Connection(Role.COORDINATOR)
    coord.receive_data(client.send(Hello(PROTOCOL_VERSION, "client", 1)))
    coord.next_message()
    client.receive_data(coord.send(Welcome(PROTOCOL_VERSION, 1 << 20, P, 0, 1, 7)))
    client.next_message()
    msg = Snap("", False, "tcp://backup:7000", True, 10 << 20, 64 << 20, 2500)
    coord.receive_data(client.send(msg))
    assert coord.next_message() == msg
