"""`uffdsnap restore OUT.img --to PATH`: verify (for a delta, its whole chain), then write the
object's bytes at the image's T to PATH."""

from __future__ import annotations

import argparse

from uffdsnap.cli.output import emit
from uffdsnap.image import restore
from uffdsnap.stats import size_text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="OUT.img",
                        help="the image; its manifest OUT.img.json must be beside it")
    parser.add_argument("--to", required=True, metavar="PATH",
                        help="file to create, e.g. /dev/shm/NAME (must not exist unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing PATH in place (emptied, then resized to the "
                        "object); never do this to memory processes are using")


def run(args: argparse.Namespace) -> int:
    report = restore(args.image, args.to, force=args.force)
    emit(args.json, {"ok": True, **report.to_dict()},
         f"restored {args.image} to {args.to}: {size_text(report.size)} "
         f"({size_text(report.data_bytes)} of data, the rest sparse)"
         + (f" from a chain of {report.links} images" if report.links > 1 else "")
         + (" [replaced the existing file]" if report.replaced else ""))
    return 0
