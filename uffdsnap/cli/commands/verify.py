"""`uffdsnap verify OUT.img`: exit 0 only if the image (and, for a delta, every image of its
chain) is exactly what its manifest says."""

from __future__ import annotations

import argparse
import json
from typing import Any

from uffdsnap.cli.output import emit, error_line
from uffdsnap.image import verify
from uffdsnap.stats import size_text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="OUT.img",
                        help="the image; its manifest OUT.img.json must be beside it")


def run(args: argparse.Namespace) -> int:
    """0 = OK, 1 = corrupt (one line naming the first bad offset); bad input raises (exit 2)."""
    report = verify(args.image)
    if report.ok:
        links = len(report.chain)
        chain = f", chain of {links} images" if links > 1 else ""
        emit(args.json, report.to_dict(),
             f"{args.image}: OK ({report.extents} extents, {size_text(report.bytes_checked)} "
             f"checked, object {size_text(report.object_size)}{chain})"
             + "".join(f"\n  {_link(link)}" for link in report.chain if links > 1))
        return 0
    if args.json:
        emit(True, report.to_dict(), "")
    error_line(f"{args.image}: CORRUPT: {report.problem}")
    return 1


def _link(link: dict[str, Any]) -> str:
    """One link of the chain in a line (its path may be hostile: escaped)."""
    return (f"{link['kind']:5} {link['snapshot_time']} {json.dumps(link['image'])} "
            f"({link['extents']} extents, {size_text(link['extent_bytes'])})")
