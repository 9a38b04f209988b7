"""Measure every case of test_stalls.py with the deadline watch on and off (the "off" column is
how the code behaved before the watch existed), and print a Markdown table of the longest
writer stall per case (docs/testing.md, "Bounded waits, measured").

    cd tests && python system/measure_stalls.py [--only oneshot|longrun]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from test_stalls import CASES, PHASES, run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("oneshot", "longrun"))
    parser.add_argument("--watch", choices=("on", "off", "both"), default="both")
    args = parser.parse_args()
    watches = {"on": [True], "off": [False], "both": [True, False]}[args.watch]
    cells: dict[tuple[str, str, str, bool], dict[str, str]] = {}
    for case in CASES:
        if args.only and case.setup != args.only:
            continue
        for watch in watches:
            shm = f"/dev/shm/uffdsnap-measure-{uuid.uuid4().hex[:12]}"
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    outcome = run_case(case, shm, Path(tmp), watch)
                    own = (f" (own {max(outcome.stalls[i] for i in outcome.exempt):.1f})"
                           if outcome.exempt else "")
                    cell = (f"{outcome.bounded_max():.2f}{own} "
                            f"{'ok' if outcome.returncode == 0 else 'failed'}")
                except Exception as e:  # (a case that broke: say so in its cell)
                    cell = f"error: {type(e).__name__}"
                finally:
                    if os.path.exists(shm):
                        os.unlink(shm)
            cells.setdefault((case.setup, case.role, case.mode, watch), {})[case.phase] = cell
    print("| setup | stopped | mode | watch | " + " | ".join(PHASES) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASES))
    for (setup, role, mode, watch), row in cells.items():
        print(f"| {setup} | {role} | {mode} | {'on' if watch else 'off'} | "
              + " | ".join(row.get(p, "") for p in PHASES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
