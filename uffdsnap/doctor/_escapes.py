"""`doctor --shm OBJECT`: the escape audit a snapshot runs before T (uffdsnap/escapes.py), run
now, as checks: who could write to the object where write-protect cannot see it."""

from __future__ import annotations

from typing import Any

from uffdsnap import escapes
from uffdsnap.doctor._checks import INFO, USEFUL, Check
from uffdsnap.procfs import SharedObject

_OPENER_FIX = ("have it map the object (then it is attached and tracked) or close it; its "
               "write() calls would escape every snapshot (`snapshot --strict` refuses)")
_HIDDEN_FIX = ("run uffdsnap where it sees every process that maps the object (the host's PID "
               "namespace rather than a container's), or have those processes enlist")


def check_escapes(obj: SharedObject) -> tuple[list[Check], dict[str, Any]]:
    """The audit's checks, and its report for the JSON result."""
    try:
        found = escapes.audit(obj)
    except (OSError, RuntimeError, ValueError) as e:
        return [Check("escape audit", False, USEFUL, f"could not run: {e}",
                      "run as root, where the object's processes are visible")], \
            {"object": obj.spec, "error": str(e)}
    return escape_checks(found), {"object": obj.spec, **found.to_json()}


def escape_checks(found: escapes.Audit) -> list[Check]:
    """One row per kind of escape (pure: the CLI's table and the tests judge made-up audits)."""
    openers = found.writable_openers
    rows = [Check("writable openers", not openers, USEFUL,
                  f"hold the object open for writing without mapping it: {', '.join(openers)}"
                  if openers else "none: every writer of the object maps it",
                  _OPENER_FIX if openers else "")]
    hidden = found.hidden
    if not hidden.checked:
        rows.append(Check("hidden mappers", True, INFO, f"not checked: {hidden.reason}"))
    else:
        finding = hidden.finding()
        rows.append(Check("hidden mappers", finding is None, USEFUL,
                          finding or f"none: the map counts of {hidden.pages_compared} sampled "
                                     "page(s) match the processes we can see",
                          _HIDDEN_FIX if finding else ""))
    if found.unreadable:
        rows.append(Check("not audited", True, INFO,
                          f"processes we may not inspect: {', '.join(found.unreadable)}"))
    return rows
