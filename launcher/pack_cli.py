"""`tdcompress pack SRC DST`: an ImageFolder tree -> tar shards + index.json (trainer/data/shard_writer.py)."""
from __future__ import annotations

import argparse
import os
import sys


def _max_side(text: str) -> int | None:
    if text.lower() in ("none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of px or 'none', got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``pack`` command on the CLI's subparsers."""
    p = sub.add_parser("pack", help="pack an ImageFolder tree (train/, val/) into tar shards for data.dataset=shards",
                       description="Pack SRC/{train,val}/<class>/<image> into SRC-independent tar shards in DST "
                                   "(<split>-NNNNN.tar with <key>.jpg + <key>.cls, index.json last). A rerun of the "
                                   "same command resumes after the last finished shard.")
    p.add_argument("src", help="ImageFolder root holding train/ and/or val/")
    p.add_argument("dst", help="output directory (shared storage for a cluster run)")
    p.add_argument("--max-side", type=_max_side, default=500, metavar="PX",
                   help="shrink images whose longer side exceeds PX (default 500, ImageNet's median longer side; "
                        "'none' keeps sizes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--shard-mb", type=float, default=256, help="target shard size in MB (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pack-time shuffle (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="encoding processes (default: all cores); the output does not depend on it")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable files out (named and counted) instead of stopping")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainer.data.shard_writer import PackError, PackOptions, pack

    try:
        options = PackOptions(max_side=args.max_side, quality=args.quality, shard_bytes=int(args.shard_mb * 2**20),
                              seed=args.seed)
    except ValueError as e:
        print(f"tdcompress pack: {e}", file=sys.stderr)
        return 2
    try:
        index = pack(args.src, args.dst, options, skip_bad=args.skip_bad, workers=max(1, args.workers),
                     progress=lambda line: print(line, flush=True))
    except PackError as e:
        print(f"tdcompress pack: {e}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{s}: {v['samples']:,} images in {len(v['shards'])} shards" for s, v in index["splits"].items())
    print(f"packed {args.src} -> {args.dst} ({splits}); train with data.dataset=shards data.root={args.dst}")
    return 0
