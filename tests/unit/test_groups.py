"""Exception groups at API boundaries (uffdsnap.groups), under the newest trio's strict
nurseries: what escapes a nursery reaches callers as the one exception they were promised."""

from __future__ import annotations

import pytest
import trio

from uffdsnap.errors import SnapshotFailed
from uffdsnap.groups import principal, unwrap_group


async def _fail_in_nursery(exc: BaseException) -> None:
    async def boom() -> None:
        raise exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(boom)
        await trio.sleep_forever()


async def test_a_lone_error_comes_out_plain() -> None:
    with pytest.raises(SnapshotFailed, match="why"):
        with unwrap_group():
            await _fail_in_nursery(SnapshotFailed("why"))


async def test_strict_nurseries_wrap_without_it() -> None:
    """The control: the same failure, not unwrapped, is a group (what broke `except X:`)."""
    with pytest.raises(BaseExceptionGroup):
        await _fail_in_nursery(SnapshotFailed("why"))


async def test_nested_groups_are_flattened() -> None:
    async def nested() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(_fail_in_nursery, OSError(5, "inner"))
            await trio.sleep_forever()

    with pytest.raises(OSError, match="inner"):
        with unwrap_group():
            await nested()


def test_interrupts_win_over_errors_and_errors_over_cancellation() -> None:
    err, intr = ValueError("x"), KeyboardInterrupt()
    assert principal(BaseExceptionGroup("", [err, intr])) is intr
    assert principal(ExceptionGroup("", [err, ExceptionGroup("", [OSError()])])) is err
    plain = RuntimeError("plain")
    assert principal(plain) is plain


async def test_only_cancellations_stay_a_group_for_trio() -> None:
    """A group of Cancelled is left alone: the cancel scope that owns it absorbs it."""
    with trio.CancelScope() as scope:
        with unwrap_group():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                scope.cancel()
                await trio.sleep_forever()
    assert scope.cancelled_caught
