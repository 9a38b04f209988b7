"""Measure the negative controls' detection rates: run tests/system/test_controls.py (and the other
controls) N times and tally, per test, how often it passed. A control passes when the bug it
plants was caught in its one snapshot, so its pass rate is its detection rate per snapshot; a
positive twin's pass rate is one minus its false-alarm rate.

    python tests/system/measure_controls.py --runs 20 > rates.md

Prints a markdown table (docs/testing.md records one)."""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time

TARGETS = ["tests/system/test_controls.py",
           "tests/system/test_snapshot.py::test_copy_without_protection_is_caught"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    passed: collections.Counter[str] = collections.Counter()
    seen: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    for run in range(args.runs):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p",
                               "no:cacheprovider", *TARGETS], capture_output=True, text=True,
                              timeout=3600)
        for status, node in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", proc.stdout, re.M):
            seen[node] += 1
            passed[node] += status == "PASSED"
        print(f"run {run + 1}/{args.runs}: {sum(passed.values())}/{sum(seen.values())} passed "
              f"so far ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    print("| test | kind | passed | rate |")
    print("|---|---|---|---|")
    for node in sorted(seen):
        kind = "positive" if "[None" in node or "-None" in node or "bug" not in node and \
            "control" not in node and "caught" not in node else "control"
        print(f"| `{node.split('::', 1)[1]}` | {kind} | {passed[node]}/{seen[node]} | "
              f"{passed[node] / seen[node]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
