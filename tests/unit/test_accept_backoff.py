"""The coordinator's pause while accept() runs out of descriptors (coordinator/_accept.py):
said once per outage, and an outage that comes straight back is not said again unless it lasts.
Pure logic on trio's mock clock; the real exhaustion is tests/system/test_security.py's."""

from __future__ import annotations

import errno
import logging

import pytest
import trio
import trio.testing

from uffdsnap.coordinator._accept import _QUIET_S, _Backoff

EMFILE = OSError(errno.EMFILE, "Too many open files")


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records]


def _run(steps: list[tuple[str, float]], caplog: pytest.LogCaptureFixture) -> list[str]:
    """Play `steps` ("fail": one failed accept, "ok": one that worked; each after sleeping
    the given seconds) on a mock clock; what was logged."""
    async def play() -> None:
        backoff = _Backoff()
        for what, after in steps:
            await trio.sleep(after)
            if what == "fail":
                await backoff.wait(EMFILE, trio.Event())
            else:
                backoff.reset()

    caplog.set_level(logging.WARNING, logger="uffdsnap.coordinator._accept")
    trio.run(play, clock=trio.testing.MockClock(autojump_threshold=0))
    return _said(caplog)


def test_one_outage_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    assert _run([("fail", 0), ("fail", 0), ("fail", 0), ("ok", 0), ("ok", 0)], caplog) == [
        "cannot accept connections", "accepting connections again"]


def test_an_outage_that_comes_straight_back_is_not_said_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """(a connection dropped for want of a descriptor frees one: accept works once, then
    fails again at once)"""
    steps = [("fail", 0), ("ok", 0)] + [("fail", 0), ("ok", 0.01)] * 20
    assert _run(steps, caplog) == ["cannot accept connections", "accepting connections again"]


def test_a_later_outage_is_said(caplog: pytest.LogCaptureFixture) -> None:
    steps = [("fail", 0), ("ok", 0), ("fail", _QUIET_S + 0.1), ("ok", 0)]
    assert _run(steps, caplog) == ["cannot accept connections", "accepting connections again"] * 2


def test_an_outage_that_comes_back_and_lasts_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """(control for the quiet rule: a real new outage is not hidden by it)"""
    steps = [("fail", 0), ("ok", 0), ("fail", 0)] + [("fail", 0)] * 10 + [("ok", 0)]
    assert _run(steps, caplog) == ["cannot accept connections", "accepting connections again"] * 2
