"""Exception groups at API boundaries.

trio (since 0.25) wraps whatever escapes a nursery in an ExceptionGroup, so a plain `except X:`
around `async with trio.open_nursery()` no longer sees X. Inside the package, nurseries stay
strict; functions that promise a plain exception (Coordinator.snapshot, run_agent, every command)
unwrap at their edge with `unwrap_group()`, which re-raises the one exception that matters.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside `exc`, groups flattened (depth first, in order)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def principal(exc: BaseException) -> BaseException:
    """The one exception a caller should see for `exc`: itself unless it is a group; for a group,
    the first interrupt (KeyboardInterrupt, SystemExit, ...), else the first error, else (only
    cancellations inside) the group unchanged, which trio's cancel scopes know how to absorb."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    found = list(leaves(exc))
    real = [e for e in found if not _is_cancellation(e)]
    interrupts = [e for e in real if not isinstance(e, Exception)]
    chosen = (interrupts or real or [exc])[0]
    for other in real:
        if other is not chosen:
            log.debug("also raised alongside %r: %r", chosen, other)
    return chosen


def _is_cancellation(exc: BaseException) -> bool:
    trio = sys.modules.get("trio")  # not imported here: the CLI uses this before trio loads
    return trio is not None and isinstance(exc, trio.Cancelled)


@contextmanager
def unwrap_group() -> Iterator[None]:
    """Re-raise an exception group escaping the block as its principal exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        chosen = principal(group)
        if chosen is group:
            raise
        raise chosen from None
