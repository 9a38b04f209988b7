"""The coordinator's policy (uffdsnap/coordinator/_policy.py) driven through whole snapshots as
event sequences: no processes, no root, no kernel. The system tests (tests/system) show the same
rules hold against real writers; these show every branch of the rules, quickly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdsnap.coordinator._policy import (
    BeforeT,
    FaultAction,
    Phase,
    PolicyError,
    SnapshotPolicy,
)

PAGE = 4096


def policy(*members: str, **kwargs: object) -> SnapshotPolicy:
    """A snapshot joined by agents named `members` (their pids 100, 101, ...)."""
    p = SnapshotPolicy(1, PAGE, **kwargs)  # type: ignore[arg-type]
    for i, key in enumerate(members):
        assert p.join(key, 100 + i, key, maps_object_writable=True) is False
    return p


def protect_all(p: SnapshotPolicy) -> None:
    for key in p.start_protect():
        p.protected(key, 1, 1000)


def to_t(p: SnapshotPolicy) -> None:
    protect_all(p)
    assert p.before_t([], False, False, False) == BeforeT.DECLARE_T
    p.declare_t()


def finish(p: SnapshotPolicy, **escapes: tuple[str, ...]) -> str | None:
    for key in p.start_release():
        p.released(key, escapes.get(str(key), ()))
    return p.verdict({k: True for k in p.members}, [])


def test_a_whole_snapshot() -> None:
    p = policy("a", "b")
    to_t(p)
    assert p.phase == Phase.COPYING
    assert finish(p) is None and p.phase == Phase.DONE


def test_faults_are_held_until_every_agent_has_protected() -> None:
    """Hold until T: a's fault waits while b is unprotected; T is declared only once b has
    protected and no untracked mapper remains; the held fault is served first."""
    p = policy("a", "b")
    assert sorted(p.start_protect()) == ["a", "b"]
    p.protected("a", 1, 10)
    assert p.fault("a", 3 * PAGE, 7, already_saved=False) == FaultAction.HOLD
    assert not p.all_protected()
    with pytest.raises(PolicyError):
        p.declare_t()  # the rule itself: no T while b is unprotected
    with pytest.raises(PolicyError):
        p.before_t([], False, False, False)
    p.protected("b", 1, 10)
    assert p.all_protected()
    assert p.before_t([], False, False, False) == BeforeT.DECLARE_T
    held = p.declare_t()
    assert [(h.key, h.offset, h.seen_ns) for h in held] == [("a", 3 * PAGE, 7)]
    assert p.fault("b", 3 * PAGE, 8, already_saved=False) == FaultAction.WAKE  # saved: once


def test_a_page_two_processes_fault_on_is_saved_once() -> None:
    p = policy("a", "b")
    to_t(p)
    assert p.fault("a", 5 * PAGE, 1, already_saved=False) == FaultAction.SAVE
    assert p.fault("b", 5 * PAGE, 2, already_saved=False) == FaultAction.WAKE
    assert p.fault("b", 6 * PAGE, 3, already_saved=True) == FaultAction.WAKE  # by the scan
    assert (p.faults, p.duplicate_faults) == (3, 2)


def test_stale_faults_are_woken_never_saved() -> None:
    p = policy("a")
    assert p.fault("a", 0, 1, already_saved=False) == FaultAction.WAKE  # nothing protected
    to_t(p)
    p.start_release()
    assert p.fault("a", 0, 1, already_saved=False) == FaultAction.WAKE  # after the copy


def test_a_forked_child_is_waited_for_then_tracked() -> None:
    """An untracked child of a tracked process (its agent has not reported it yet) is waited
    for; once reported (`tracked`) it counts as tracked and T can be declared."""
    p = policy("a")
    protect_all(p)
    assert p.before_t(["555 (child)"], True, True, False) == BeforeT.WAIT_FOR_FORKS
    p.tracked("a", [100, 555])
    assert 555 in p.tracked_pids()
    assert p.before_t([], False, True, False) == BeforeT.DECLARE_T


def test_untracked_mappers_are_attached_then_refused() -> None:
    p = policy("a", max_attach_rounds=2)
    protect_all(p)
    for _ in range(2):
        assert p.before_t(["7 (x)"], False, True, False) == BeforeT.ATTACH
        assert p.join("late", 7, "x", maps_object_writable=True) is True  # protect it now
        p.protected("late", 1, 1)
        p.members.pop("late")  # (as if it exited again: still someone untracked)
    assert p.before_t(["7 (x)"], False, True, False) == BeforeT.FAIL
    assert "untracked" in (p.failure or "") and "7 (x)" in (p.failure or "")
    assert p.before_t(["8 (y)"], False, False, False) == BeforeT.FAIL  # cannot attach


def test_a_late_mapper_before_t_joins_and_must_protect() -> None:
    p = policy("a")
    p.start_protect()
    p.protected("a", 1, 1)
    assert p.join("b", 101, "b", maps_object_writable=True) is True
    assert not p.all_protected()
    p.protected("b", 1, 1)
    assert p.all_protected()


def test_joining_after_t_fails_only_a_mapper() -> None:
    p = policy("a")
    to_t(p)
    assert p.join("idle", 5, "idle", maps_object_writable=False) is False
    assert p.failure is None and "idle" not in p.members
    p.join("w", 6, "writer", maps_object_writable=True)
    assert "joined after T" in (p.failure or "")


def test_exit_is_harmless_and_a_lost_agent_is_not() -> None:
    p = policy("a", "b", "c")
    p.start_protect()
    p.protected("a", 1, 1)
    p.protected("b", 1, 1)
    p.gone("c", "process exited")  # exited while protecting: not waited for
    assert p.all_protected()
    p.lost("b", processes_alive=False, why="")  # its process died with it
    assert p.failure is None and [m.pid for _, m, _ in p.departed] == [102, 101]
    p.lost("a", processes_alive=True, why="agent for pid 100 lost: EOF")
    assert p.failure == "agent for pid 100 lost: EOF"


def test_losing_an_agent_during_release_is_not_a_failure() -> None:
    p = policy("a")
    to_t(p)
    p.start_release()
    p.lost("a", processes_alive=True, why="gone")
    assert p.failure is None


@pytest.mark.parametrize("when", ["joining", "protecting", "copying"])
def test_every_failure_ends_in_release_of_everyone(when: str) -> None:
    p = policy("a", "b")
    if when != "joining":
        protect_all(p)
    if when == "copying":
        p.before_t([], False, False, False)
        p.declare_t()
    assert p.fail("the sink is full")
    assert not p.fail("a second reason")  # the first wins
    assert sorted(p.start_release()) == ["a", "b"]
    assert p.verdict({"a": True, "b": True}, []) == "the sink is full"


def test_protect_timeout_names_the_silent() -> None:
    p = policy("a", "b")
    p.start_protect()
    p.protected("a", 1, 1)
    p.protect_timed_out(2.0)
    assert p.failure == "agents for pids [101] did not protect within 2 s"


def test_a_writer_past_the_fault_deadline_names_who_kept_it() -> None:
    """Bounded waits: before T a held writer names the agents that have not protected (or
    that T was not reached); after T, whoever should have answered. The oldest fault held on
    the main connection is known, so its wait can be measured."""
    p = policy("a", "b")
    p.start_protect()
    p.protected("a", 1, 10)
    assert p.oldest_held() is None
    p.fault("a", PAGE, 70, already_saved=False)
    p.fault("a", 0, 50, already_saved=False)
    held = p.oldest_held()
    assert held is not None and (held.key, held.offset, held.seen_ns) == ("a", 0, 50)
    why = p.writer_overdue("pid 100 (a)", 2.1, 2.0, "the agent of pid 100")
    assert why.startswith("agents for pids [101] did not protect within 2 s, the fault "
                          "deadline") and "pid 100 (a) waited on a held write fault" in why
    p.protected("b", 1, 10)
    why = p.writer_overdue("pid 100 (a)", 2.1, 2.0, "x")
    assert why.startswith("T was not reached within the fault deadline (2 s)")
    p.declare_t()
    assert p.oldest_held() is None  # (served at T)
    why = p.writer_overdue("pid 101 (b)", 2.34, 2.0, "the agent host (pid 9) of pids [101]")
    assert why == ("pid 101 (b) waited 2.3 s on a write fault, past the fault deadline (2 s): "
                   "the agent host (pid 9) of pids [101] stopped answering")
    assert p.failure is None  # (the caller fails the run with it: its release wakes everyone)
    why = SnapshotPolicy.agent_stopped("the agent (pid 7) of pid 100 (a)", 2.05, 0.5)
    assert why == ("the agent (pid 7) of pid 100 (a) has been stopped for 2.0 s (SIGSTOP or a "
                   "tracer), past the fault deadline (0.5 s): it cannot answer")


def test_the_verdict_checks_audits_silence_and_untracked() -> None:
    p = policy("a", "b")
    to_t(p)
    assert "escaped tracking" in (finish(p, b=("pid 101 grew a mapping",)) or "")
    p = policy("a", "b")
    to_t(p)
    p.start_release()
    p.released("a", ())
    assert "did not confirm" in (p.verdict({"a": True, "b": True}, []) or "")
    p = policy("a")
    to_t(p)
    p.start_release()
    p.released("a", ())
    assert "untracked" in (p.verdict({"a": True}, ["9 (z)"]) or "")


def test_exec_means_its_own_process_is_untracked() -> None:
    p = policy("a")
    p.tracked("a", [])  # exec'd: the agent tracks nothing of it any more
    assert 100 not in p.tracked_pids()


def test_madv_remove_of_unsaved_pages_fails() -> None:
    p = policy("a")
    to_t(p)
    p.removed([])
    assert p.failure is None
    p.removed([3])
    assert "0x3000" in (p.failure or "")


def test_serve_before_t_hook_is_wrong_on_purpose() -> None:
    """The negative control's hook: once a's own agent protected, its faults are served."""
    p = policy("a", "b", serve_before_t=True)
    p.start_protect()
    assert p.fault("a", 0, 1, already_saved=False) == FaultAction.HOLD
    assert [h.offset for h in p.protected("a", 1, 1)] == [0]
    assert p.fault("a", PAGE, 2, already_saved=False) == FaultAction.SAVE  # before T


EVENTS = st.lists(st.tuples(
    st.sampled_from(["protect", "fault", "protected", "gone", "lost", "join", "t", "fail"]),
    st.sampled_from(["a", "b", "c"]), st.integers(0, 7)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_random_sequences_never_save_before_t(events: list[tuple[str, str, int]]) -> None:
    """Whatever happens in whatever order, no page is saved before T, T is never declared
    with a member unprotected, and the end releases everyone left."""
    p = policy("a", "b")
    for kind, key, n in events:
        try:
            if kind == "protect" and p.phase == Phase.JOINING:
                p.start_protect()
            elif kind == "fault":
                action = p.fault(key, n * PAGE, n, already_saved=False)
                assert action != FaultAction.SAVE or p.phase == Phase.COPYING
            elif kind == "protected":
                p.protected(key, 1, 1)
            elif kind == "gone":
                p.gone(key, "exited")
            elif kind == "lost":
                p.lost(key, processes_alive=bool(n % 2), why="lost")
            elif kind == "join":
                p.join(key, 200 + n, key, maps_object_writable=bool(n % 2))
            elif kind == "t" and p.phase == Phase.PROTECTING and p.all_protected():
                p.declare_t()
                assert all(m.protected for m in p.members.values())
            elif kind == "fail":
                p.fail("x")
        except PolicyError:
            pytest.fail(f"a legal event was refused: {kind} {key} in {p.phase}")
    left = p.start_release()
    assert set(left) == {k for k, m in p.members.items() if not m.released}
