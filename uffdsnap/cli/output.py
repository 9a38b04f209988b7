"""How every command prints its result: one JSON object with --json, readable text otherwise."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(as_json: bool, result: dict[str, Any], human: str) -> None:
    """Print `result` as one JSON object, or `human` as text."""
    if as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        sys.stdout.write(human.rstrip("\n") + "\n")
    sys.stdout.flush()


def say(line: str) -> None:
    """One line of progress for a person, on stdout (flushed: scripts wait for it)."""
    sys.stdout.write(line.rstrip("\n") + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    """The one line a failed command writes to stderr."""
    sys.stderr.write(f"uffdsnap: error: {message}\n")
    sys.stderr.flush()
