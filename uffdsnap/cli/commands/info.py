"""`uffdsnap info OUT.img`: what an image's manifest records (and its chain's, for a delta),
without reading the images' bytes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from uffdsnap.cli.output import emit
from uffdsnap.image import info
from uffdsnap.stats import size_text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="OUT.img",
                        help="the image; its manifest OUT.img.json must be beside it")


def run(args: argparse.Namespace) -> int:
    d = info(args.image)
    emit(args.json, {"ok": True, **d}, _human(d))
    return 0




def _safe(value: Any) -> str:
    """A manifest value shown in one line with control characters escaped (it may be hostile)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=True)


def _human(d: dict[str, Any]) -> str:
    obj = d["object"]
    if d["image_exists"]:
        image = (f"{d['image']} ({size_text(d['image_size'])}, "
                 f"{size_text(d['image_allocated'])} allocated)")
        if d["image_size"] != obj["size"]:
            image += " -- SIZE DIFFERS FROM THE OBJECT: run `uffdsnap verify`"
    else:
        image = f"{d['image']} -- MISSING (only the manifest is here)"
    ident = ""
    if obj["dev"] is not None and obj["inode"] is not None:
        ident = f", dev {obj['dev']} inode {obj['inode']}"
    lines = [
        f"image       {image}",
        f"object      {obj['source']} ({obj['kind']}{ident})",
        f"            {size_text(obj['size'])} ({obj['size']} bytes), "
        f"page size {size_text(obj['page_size'])}",
        f"snapshot T  {d['snapshot_time']['iso8601']}",
        f"extents     {d['extents']}, {size_text(d['extent_bytes'])} saved "
        + ("(the rest is as in the parent)" if d["kind"] == "delta"
           else "(the rest of the object read as zeros)"),
        f"processes   {len(d['processes'])}",
    ]
    for p in d["processes"]:
        lines.append(f"            pid {p['pid']} {p['comm']} ({p['mode']}, "
                     f"{p['mappings']} mapping{'s' if p['mappings'] != 1 else ''})")
    stats = d["stats"]
    lines.append("stats       " + (" ".join(f"{_safe(k)[1:-1]}={_safe(v)}"
                                            for k, v in stats.items()) or "(none)"))
    lines.append(f"created by  {d['created_by']['tool']} {d['created_by']['version']} "
                 f"(image format {d['format_version']})")
    lines.extend(_chain(d))
    return "\n".join(lines)


def _chain(d: dict[str, Any]) -> list[str]:
    """The chain, root first: each link's T, kind, saved bytes and name."""
    if d["kind"] == "full" and len(d["chain"]) == 1:
        return []
    lines = [f"chain       {len(d['chain'])} images, root first"
             + ("" if d["chain_problem"] is None else " (as far as it could be followed)")]
    for link in d["chain"]:
        lines.append(f"            {link['snapshot_time']} {link['kind']:5} "
                     f"{size_text(link['extent_bytes']):>10} {_safe(link['image'])}")
    if d["chain_problem"] is not None:
        lines.append(f"            BROKEN: {_safe(d['chain_problem'])}")
    return lines
