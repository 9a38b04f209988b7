"""`uffdsnap demo`: snapshot an embedded multi-process workload while it writes, and check it."""

from __future__ import annotations

import argparse
import sys

from uffdsnap.cli.output import emit
from uffdsnap.demo import run_demo


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", metavar="DIR", help="keep the image and manifest in DIR")


def run(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    result = run_demo(args.keep, say)
    if args.json:
        emit(True, result, "")
    sys.stdout.flush()
    return 0
