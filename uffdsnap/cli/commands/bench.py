"""`uffdsnap bench`: measure our snapshots against their baselines, side by side in one run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from uffdsnap.bench.config import KINDS, MODES, PARTS, BenchConfig, parse_size
from uffdsnap.cli.output import emit
from uffdsnap.errors import UserError

DEFAULT_OUT = "uffdsnap-bench-results"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run every scenario of docs/benchmarks.md against its baseline in one run and print a "
        "table of ratios (with --json: every raw number). Needs root. The default run takes a "
        "few minutes; --quick well under a minute (CI smoke).")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 1-2 processes: a smoke run of every scenario")
    parser.add_argument("--sizes", metavar="LIST",
                        help="object sizes for scaling at 1 process; the smallest is also the "
                             "size of the latency and throughput runs (default 256M,1G,4G; "
                             "quick 64M)")
    parser.add_argument("--procs", metavar="LIST",
                        help="process counts for scaling, at the smallest size (default 1,8,64; "
                             "quick 1,2)")
    parser.add_argument("--pause-procs", metavar="LIST",
                        help="process counts of the start-pause and fault-service runs "
                             "(default 1,8; quick 1)")
    parser.add_argument("--kinds", metavar="LIST",
                        help=f"memory kinds of the start-pause runs (default {','.join(KINDS)})")
    parser.add_argument("--copy-size", metavar="SIZE",
                        help="object size of the idle-copy run (default 1G; quick 64M)")
    parser.add_argument("--hugetlb-size", metavar="SIZE",
                        help="object size of the hugetlb runs (default 256M; quick 32M)")
    parser.add_argument("--modes", metavar="LIST",
                        help=f"our modes to measure (default all: {','.join(MODES)})")
    parser.add_argument("--rate", type=float, metavar="OPS",
                        help="total writes/s of the paced writers (default 4000)")
    parser.add_argument("--dest", metavar="DIR",
                        help="where images and copies are written (default: the temp dir, "
                             "$TMPDIR or /tmp); everything written there is removed")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"where plots, result.json and table.md go (default ./{DEFAULT_OUT})")
    parser.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    parser.add_argument("--reserve-hugepages", action="store_true",
                        help="raise vm.nr_hugepages for the hugetlb runs if needed (restored "
                             "afterwards); without it they are skipped when pages are short")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--only", metavar="LIST",
                        help=f"run only these parts (of {','.join(PARTS)}; default all)")


def _list(text: str | None, what: str, conv: Any) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(conv(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    if not values:
        raise UserError(f"{what}: empty list")
    return values


def _sorted(values: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    return None if values is None else tuple(sorted(set(values)))


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"not a positive count: {text}")
    return n


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    kinds = _list(args.kinds, "--kinds", str)
    if kinds and set(kinds) - set(KINDS):
        raise UserError(f"--kinds: unknown {sorted(set(kinds) - set(KINDS))} (have {KINDS})")
    modes = _list(args.modes, "--modes", str)
    if modes and set(modes) - set(MODES):
        raise UserError(f"--modes: unknown {sorted(set(modes) - set(MODES))} "
                        f"(have {', '.join(MODES)})")
    parts = _list(args.only, "--only", str)
    if parts and set(parts) - set(PARTS):
        raise UserError(f"--only: unknown {sorted(set(parts) - set(PARTS))} "
                        f"(have {', '.join(PARTS)})")
    if args.rate is not None and not args.rate > 0:
        raise UserError("--rate must be positive")
    single = {}
    for name in ("copy_size", "hugetlb_size"):
        value = getattr(args, name)
        if value is not None:
            try:
                single[name] = parse_size(value)
            except ValueError as e:
                raise UserError(f"--{name.replace('_', '-')}: {e}") from None
    return BenchConfig.preset(
        args.quick,
        sizes=_sorted(_list(args.sizes, "--sizes", parse_size)),
        procs=_sorted(_list(args.procs, "--procs", _positive_int)),
        pause_procs=_sorted(_list(args.pause_procs, "--pause-procs", _positive_int)),
        kinds=kinds, modes=modes, rate=args.rate, dest_dir=args.dest, parts=parts,
        out_dir=os.path.abspath(args.out) if args.out else None,
        reserve_hugepages=args.reserve_hugepages or None,
        plots=False if args.no_plots else None, **single)


def run(args: argparse.Namespace) -> int:
    from uffdsnap.bench.report import render_scaling, render_table
    from uffdsnap.bench.run import run_bench

    cfg = config_from_args(args)

    def say(line: str) -> None:
        if not args.quiet:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    command = "uffdsnap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv[1:2] == ["bench"] else "uffdsnap bench"
    result = run_bench(cfg, say, command)
    text = "\n\n".join([render_table(result["table"]), "scaling:",
                        render_scaling(result["scenarios"])]
                       + [f"skipped {s['session']}: {s['reason']}" for s in result["skipped"]]
                       + [f"FAILED {e['session']} {e['event']}: {e['error']}"
                          for e in result["errors"]]
                       + result["notes"]
                       + ([f"plots: {', '.join(result['plots'])}"] if result["plots"] else []))
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
            f.write(render_table(result["table"], markdown=True) + "\n\n"
                    + render_scaling(result["scenarios"], markdown=True) + "\n")
    emit(args.json, result, text)
    return 0 if result["ok"] else 1
