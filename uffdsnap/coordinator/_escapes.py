"""The escape audit at the before-T decision (uffdsnap/escapes.py does the looking): once every
writable mapper we can see is protected, look for what could still change the object behind
write-protect's back; report it in the summary and manifest, and with --strict refuse to
declare T (the snapshot fails, nothing is published, every writer is released)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from uffdsnap import escapes, priority
from uffdsnap.coordinator._policy import BeforeT
from uffdsnap.procfs import ScanUnstable
from uffdsnap.stats import monotonic_ns

if TYPE_CHECKING:
    from uffdsnap.coordinator._run import Run

log = logging.getLogger(__name__)


class EscapeAuditor:
    """One per coordinator: audits each snapshot before T and keeps the last result for its
    summary."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict  # refuse a snapshot whose audit found an escape
        self._last: tuple[int, dict[str, Any]] | None = None  # (run id, report)
        # the audit armed for a run (see arm): its run, and set when it is done
        self._early: tuple[int, trio.Event] | None = None

    def arm(self, run: Run) -> None:
        """This run is audited beside its copy (audit_armed, started at T): before_t does not
        audit it on the way to T, where the look (tens of milliseconds of CPU) would compete
        with the agents' protect for the CPUs and held writers would wait it out. after_copy
        waits for it (--strict then fails the snapshot, which publishes nothing, as a refusal
        before T would)."""
        self._early = (run.id, trio.Event())

    async def audit_armed(self, run: Run) -> None:
        """The audit armed for `run` (a task of the run's, started at T)."""
        assert self._early is not None and self._early[0] == run.id
        done = self._early[1]
        try:
            await self._audit(run)
        finally:
            done.set()

    async def before_t(self, run: Run, decision: BeforeT) -> BeforeT:
        """`decision` as the policy made it, unless it is to declare T and no audit of this
        run was armed: then audit now (once per run); --strict refuses what the audit
        found (FAIL, the run failed with the finding as its reason); a writable mapper the
        audit's look found untracked (it appeared since the loop's look) has the loop look
        again (ATTACH)."""
        early = self._early is not None and self._early[0] == run.id
        if decision != BeforeT.DECLARE_T or early or (self._last and self._last[0] == run.id):
            return decision
        mappers = await self._audit(run)
        if self._refused(run):
            return BeforeT.FAIL
        if mappers is None:  # (the audit failed: a look of our own)
            try:
                mappers = set(run.coord.untracked_writers(set()))
            except ScanUnstable:
                return BeforeT.ATTACH  # (the loop's own look says so)
        newcomers = mappers - run.policy.tracked_pids()
        return BeforeT.ATTACH if newcomers else decision

    async def after_copy(self, run: Run) -> None:
        """The armed audit is done (bounded by its budget); --strict fails the run on
        what it found."""
        if self._early is None or self._early[0] != run.id:
            return
        await self._early[1].wait()
        self._early = None
        self._refused(run)

    def _refused(self, run: Run) -> bool:
        """--strict, and this run's audit found something: the run fails, naming it."""
        if not (self.strict and self._last and self._last[0] == run.id
                and self._last[1]["findings"]):
            return False
        findings = self._last[1]["findings"]
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        run.fail(f"--strict: {findings[0]}{more}")
        return True

    async def _audit(self, run: Run) -> set[int] | None:
        """Audit now; the writable mappers its last look found (None if it failed)."""
        coord = run.coord
        host = coord.attacher.host_pid if coord.attacher is not None else None
        ignore = {os.getpid(), *(() if host is None else (host,))}  # we, and our agent host
        started = monotonic_ns()
        try:  # in a thread: the event loop keeps serving agents meanwhile
            # (within half the fault deadline: held writers wait on it)
            budget = min(escapes.SETTLE_S, coord.fault_deadline / 2)
            found = await priority.in_worker_thread(escapes.audit, coord.obj, ignore,
                                                    escapes.SAMPLE_PAGES, budget,
                                                    abandon_on_cancel=True)
        except (OSError, RuntimeError, ValueError) as e:
            report, mappers = _failed(f"the escape audit could not run: {e}"), None
        else:
            report, mappers = {"audited": True, **found.to_json()}, set(found.writable_mappers)
        report["audit_ns"] = monotonic_ns() - started  # (it delays T: writers may wait on it)
        # (as text too: a coordinator's answer to a client carries scalars only)
        report["findings_text"] = "\n".join(report["findings"])
        report["notes_text"] = "\n".join(report["notes"])
        self._last = (run.id, report)
        for line in report["findings"]:
            log.info("escape audit: %s", line)  # (the summary says it to whoever asked)
        return mappers

    def report(self, run_id: int) -> dict[str, Any]:
        """What the audit of run `run_id` found (for its summary)."""
        if self._last is not None and self._last[0] == run_id:
            return self._last[1]
        return {"audited": False, "findings": [], "notes": ["no escape audit (T was not reached "
                                                            "through the before-T checks)"]}


def _failed(why: str) -> dict[str, Any]:
    """An audit that could not run is a finding: --strict cannot vouch for the snapshot."""
    return {"audited": False, "findings": [why], "notes": []}
