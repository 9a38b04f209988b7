"""`uffdsnap compact N.img -o FULL.img`: a chain's state at N's T as one full image."""

from __future__ import annotations

import argparse

from uffdsnap.cli.output import emit
from uffdsnap.image import compact
from uffdsnap.stats import size_text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="N.img",
                        help="the last image of the chain (a delta, or a full image: copied); "
                        "its manifest N.img.json must be beside it")
    parser.add_argument("-o", "--output", required=True, metavar="FULL.img",
                        help="the full image to publish, its manifest beside it (must not "
                        "exist unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing FULL.img (a regular file, not one of the "
                        "chain's)")


def run(args: argparse.Namespace) -> int:
    report = compact(args.image, args.output, force=args.force)
    emit(args.json, {"ok": True, **report.to_dict()},
         f"compacted {args.image} ({report.links} image{'s' if report.links != 1 else ''}) "
         f"into {args.output}: {size_text(report.size)}, {report.extents} extents "
         f"({size_text(report.data_bytes)} of data); manifest sha256 "
         f"{report.manifest_sha256}")
    return 0
