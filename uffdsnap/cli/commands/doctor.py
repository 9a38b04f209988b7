"""`uffdsnap doctor`: can this machine or container take snapshots, and if not, why.

Glue only: the checks live in uffdsnap.doctor; this module prints them and picks the exit code
(0 when snapshots are possible here, 1 otherwise).
"""

from __future__ import annotations

import argparse
import sys

from uffdsnap.cli.output import emit, error_line
from uffdsnap.doctor import ATTACH, INFO, REQUIRED, USEFUL, Check, Diagnosis, diagnose
from uffdsnap.errors import UserError
from uffdsnap.procfs import ObjectError, open_object

_MARKS = {"ok": "✓", "fail": "✗", "warn": "!", "info": "·", "skip": "–", "fix": "→"}
_ASCII_MARKS = {"ok": "+", "fail": "x", "warn": "!", "info": "-", "skip": "~", "fix": "->"}
_ROUTE_LABELS = {"syscall": "syscall", "device": "/dev/userfaultfd"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="longest wait on each probe process (default: 10)")
    parser.add_argument("--shm", metavar="OBJECT",
                        help="also audit this object now, as a snapshot does at T: "
                             "processes that hold it open for writing without mapping it, and "
                             "mappers we cannot see (another PID namespace)")


def run(args: argparse.Namespace) -> int:
    obj = None
    if args.shm is not None:
        try:
            obj = open_object(args.shm)
        except ObjectError as e:
            raise UserError(str(e)) from None
    try:
        diag = diagnose(timeout=args.timeout, shm=obj)
    finally:
        if obj is not None:
            obj.close()
    marks = _marks_for(sys.stdout)
    text = render(diag, marks)
    if marks is _ASCII_MARKS:
        text = _to_ascii(text)
    emit(args.json, diag.to_json(), text)
    if not diag.ok:
        error_line("snapshots are not possible here: " + "; ".join(diag.reasons()))
        return 1
    return 0


def _marks_for(stream: object) -> dict[str, str]:
    """Unicode marks when the terminal can show them, ASCII otherwise."""
    try:
        "".join(_MARKS.values()).encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return _ASCII_MARKS
    return _MARKS


def _to_ascii(text: str) -> str:
    """For terminals that cannot show the table's punctuation (e.g. LANG=C)."""
    text = text.translate({ord("—"): "-", ord("→"): "->", ord("…"): "..."})
    return text.encode("ascii", "replace").decode("ascii")


def _mark(ok: bool, level: str, marks: dict[str, str], skipped: bool = False) -> str:
    if skipped:
        return marks["skip"]
    if level == INFO:
        return marks["info"]
    if ok:
        return marks["ok"]
    return marks["warn"] if level == USEFUL else marks["fail"]


def render(diag: Diagnosis, marks: dict[str, str] = _MARKS) -> str:
    """The human table: one aligned row per check (routes under `userfaultfd`), fixes below
    failed rows, and a verdict line."""
    rows: list[tuple[str, str, str, str]] = []  # (indent+mark, name, detail, fix)
    for check in diag.checks:
        rows.append((f"  {_mark(check.ok, check.level, marks, check.skipped)}", check.name,
                     check.detail,
                     "" if check.ok else check.fix))
        if check.name == "userfaultfd":
            for name, route in diag.routes.items():
                rows.append((f"      {_mark(route.ok, USEFUL, marks)}",
                             _ROUTE_LABELS.get(name, name), route.detail,
                             "" if route.ok else route.fix))
    width = max(len(prefix) + 1 + len(name) for prefix, name, _, _ in rows) + 2
    lines = [f"uffdsnap doctor — uid {diag.facts.get('uid')}"]
    for prefix, name, detail, fix in rows:
        head = f"{prefix} {name}"
        lines.append(f"{head:<{width}}{detail}")
        if fix:
            lines.append(f"{'':<{width}}{marks['fix']} {fix}")
    lines.append(_verdict(diag, marks))
    return "\n".join(lines)


def _verdict(diag: Diagnosis, marks: dict[str, str]) -> str:
    if not diag.ok:
        failed = [c.name for c in diag.checks
                  if c.level == REQUIRED and not c.ok and not c.skipped]
        return f"snapshots: NOT possible here (failed: {', '.join(failed)})"
    attach = marks["ok"] if diag.attach_ok else marks["fail"]
    text = f"snapshots: possible here (enlist {marks['ok']}, attach {attach})"
    if not diag.attach_ok:
        text += " — attach failed: " + ", ".join(_names(diag.checks, ATTACH))
    return text


def _names(checks: list[Check], level: str) -> list[str]:
    return [c.name for c in checks if c.level == level and not c.ok]
