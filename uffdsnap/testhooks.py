"""Test hooks: deliberately wrong or restricted behaviours that tests switch on to prove the
consistency checker (or the product's own checks) catches them, to pause at a phase, or to
exercise a fallback path. Never set in normal use, and never read from the environment: a test
hands them in, as a dict to Coordinator(test_hooks=...) or run_agent(test_hooks=...), or across
processes as JSON in the hidden `--test-hooks` option of `uffdsnap snapshot|coordinator|agent`
(`enlist(test_hooks=...)` passes it to an enlisted agent). A coordinator passes its "agent" entry
on to the attach agents it starts.

Coordinator:
- `pause_in`: a phase ("joining", "protecting", "copying", "finishing"): say so on stderr and
  stay there (still serving faults) until SIGUSR1, a peer joins or leaves, or failure.
- `at_phase`: {phase: async callable}, in-process only: awaited on entering that phase.
- `no_protect`: copy without protecting anything.
- `scan_delay_s`: sleep this long before each copy window.
- `serve_before_t`: serve a process's faults as soon as its own agent has protected, not when
  every process has (breaks the consistency rule of DESIGN §2).
- `ignore_late_mappers`: neither attach nor refuse processes that start mapping the object
  after the snapshot began.
- `unprotect_before_save`: wake a faulting writer before its page is saved.
- `untracked_writes`: write tracking (incremental snapshots) answers writes between snapshots
  without recording them (a delta then misses them).
- `no_stall_watch`: do not enforce the fault deadline (coordinator/_watch.py): writers held
  before T, unanswered, or behind a stopped agent wait as long as that lasts.
- `no_unprotect_for_stopped`: when a snapshot fails, leave the processes of a stopped agent
  protected (delegated mode: we could un-protect them through our copies of their uffds).
- `agent`: hooks for the attach agents this coordinator starts.

Agent (a hook with a "pid" applies only to the agent tracking that process):
- `no_fault_channel`: faults and un-protects on the main connection (no native core).
- `hold_protect` {"pid", "fifo"}: on `protect`, write "held agent=A target=P" to the FIFO, then
  wait for SIGUSR1 before protecting (a deterministically slow protector).
- `skip_protect` {"pid", "which": "last"|"all"}: register but leave unprotected the last
  mapping, or every mapping, of that process, and report it protected.
- `drop_forks`: release a forked child's tracking at once, yet report the child as tracked.
- `ignore_remap`: do not follow mremap (the agent's address table goes stale).

Injection (`uffdsnap.inject.create_uffd_in(pid, test_hooks=...)`):
- `lend_unfrozen`: leave the target's other threads running while it holds the fds we lend
  it (the /dev/userfaultfd fd, its copy of the new uffd): they can then take them.
- `no_stall_watch`: do not release our writers when the coordinator stops answering them
  (agent/_corelink.py watch_coordinator).
"""

from __future__ import annotations

import json
from typing import Any

from uffdsnap.errors import UserError

Hooks = dict[str, Any]
HOOKS_OPTION = "--test-hooks"


def parse(raw: str | None) -> Hooks:
    """Hooks from the JSON of a --test-hooks option (none if absent)."""
    if not raw:
        return {}
    try:
        hooks = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{HOOKS_OPTION}: not JSON: {e}") from None
    if not isinstance(hooks, dict):
        raise UserError(f"{HOOKS_OPTION}: expected a JSON object")
    return hooks


def encode(hooks: Hooks) -> str:
    """The JSON for a --test-hooks option (callables, being in-process only, are left out)."""
    return json.dumps({k: v for k, v in hooks.items() if not callable(v) and k != "at_phase"})


def argv(hooks: Hooks | None) -> list[str]:
    """The --test-hooks option to pass `hooks` on to a child process, if there are any."""
    return [HOOKS_OPTION, encode(hooks)] if hooks else []


def for_pid(hooks: Hooks, name: str, pid: int | None) -> dict[str, Any] | None:
    """The hook `name` if it is set for process `pid` (a hook without "pid" applies to all)."""
    value = hooks.get(name)
    if not value:
        return None
    spec = value if isinstance(value, dict) else {}
    if "pid" in spec and spec["pid"] != pid:
        return None
    return spec
