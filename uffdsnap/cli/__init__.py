"""The `uffdsnap` command: one entry point, one subcommand per module.

Each command module exposes `configure(parser)` and `run(args) -> int`; this file only builds the
parser, dispatches, and turns every expected failure into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from typing import NoReturn

from uffdsnap.cli.output import error_line
from uffdsnap.errors import ProtocolError, SnapshotFailed, UserError
from uffdsnap.groups import principal

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("uffdsnap.cli.commands.doctor",
               "check whether this machine can take snapshots, and why not"),
    "snapshot": ("uffdsnap.cli.commands.snapshot",
                 "take one consistent snapshot of live shared memory"),
    "coordinator": ("uffdsnap.cli.commands.coordinator",
                    "run a long-lived coordinator that enlisting workloads join"),
    "agent": ("uffdsnap.cli.commands.agent", "run the agent for one process (attach or enlist)"),
    "verify": ("uffdsnap.cli.commands.verify", "check an image against its manifest"),
    "info": ("uffdsnap.cli.commands.info", "show what an image's manifest records"),
    "restore": ("uffdsnap.cli.commands.restore", "write an image's bytes back to a file or object"),
    "compact": ("uffdsnap.cli.commands.compact",
                "merge a chain of delta images into one full image"),
    "receive": ("uffdsnap.cli.commands.receive", "receive a snapshot streamed from another host"),
    "demo": ("uffdsnap.cli.commands.demo",
             "snapshot an embedded multi-process workload, end to end"),
    "bench": ("uffdsnap.cli.commands.bench", "measure snapshots against the baselines"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (plus a pointer to --help)."""

    def error(self, message: str) -> NoReturn:
        error_line(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, just that command's options are filled in (its module is
    the only one imported: every agent process starts through here, and start-up counts)."""
    parser = _Parser(prog="uffdsnap", description="Consistent point-in-time snapshots of live "
                     "multi-process shared memory (userfaultfd write-protect).")
    parser.add_argument("--version", action="version", version="uffdsnap 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="log what happens (and the traceback of an internal error) on stderr")
        p.set_defaults(_module=module)
        if only is None or name == only:
            importlib.import_module(module).configure(p)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv (its first non-option word), if it is one of ours."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


# `snapshot` and `coordinator` run at this priority (--nice) when root may set it: the way to T
# and the copy compete with busy writers for the CPUs.
DEFAULT_NICE = -10


def _early_priority(command: str | None, argv: list[str]) -> None:
    """Take the priority that --nice asks for (default DEFAULT_NICE; for `agent`, the one it
    inherited) before importing what the command runs: start-up is on the way to T. The command
    validates --nice and sets it again; anything unparsable here is left to it."""
    if command not in ("snapshot", "coordinator", "agent"):
        return
    nice = DEFAULT_NICE if command != "agent" else 0
    for i, word in enumerate(argv):
        text = argv[i + 1] if word == "--nice" and i + 1 < len(argv) else \
            word.removeprefix("--nice=") if word.startswith("--nice=") else None
        if text is not None:
            try:
                nice = int(text)
            except ValueError:
                return
    if nice != 0 and -20 <= nice <= 19:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def apply_nice(args: argparse.Namespace) -> None:
    """Raise (or set) our priority to --nice, best effort: threads and processes we start
    inherit it. Only root may raise it; others keep theirs, silently."""
    if args.nice == 0:
        return
    if not -20 <= args.nice <= 19:
        raise UserError(f"--nice {args.nice}: between -20 and 19")
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    _early_priority(command, argv)
    parser = build_parser(only=command) if command else build_parser(only="")
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose)
    module = importlib.import_module(args._module)
    try:
        try:
            return int(module.run(args))
        except BaseExceptionGroup as group:  # whatever a nursery let out: its principal error
            raise principal(group) from None
    except (UserError, SnapshotFailed) as e:
        return _fail(args, str(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except OSError as e:
        return _fail(args, str(e), 1)
    except ProtocolError as e:  # a peer that speaks the protocol wrongly
        return _fail(args, f"protocol error: {e}", 1)
    except Exception as e:  # a bug: still one line, never a traceback (unless asked for)
        logging.getLogger("uffdsnap").debug("internal error", exc_info=True)
        return _fail(args, f"internal error: {type(e).__name__}: {e} (please report it)", 1)


def _configure_logging(verbose: bool) -> None:
    """Warnings and errors of every module on stderr; everything with --verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format=("uffdsnap: %(relativeCreated)7.1f ms %(levelname)s %(name)s: "
                                "%(message)s") if verbose else "uffdsnap: %(message)s")


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
    error_line(message)
    return code
