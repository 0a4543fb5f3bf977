"""Command line of the data pipeline.

    python -m vilbert.data convert --from {tsv,official-lmdb,official-pretrain-lmdb} INPUT OUTPUT [--captions FILE]
    python -m vilbert.data synth OUTPUT --num-images N --seed S
    python -m vilbert.data info STORE [--verify]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .stores import FORMATS, NativeStore, convert, open_store, verify_store
from .synthetic import DEFAULT_NUM_IMAGES, DEFAULT_SEED, write_synthetic


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vilbert.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="convert a feature store into the native store")
    p.add_argument("--from", dest="source_format", required=True, choices=[f for f in FORMATS if f != "native"])
    p.add_argument("input", help="TSV file, or LMDB directory / file")
    p.add_argument("output", help="native store directory to create (must not exist)")
    p.add_argument("--captions", help="JSON {image_id: caption or [captions]} or COCO-style annotations; replaces "
                                      "the records' own captions")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")

    p = commands.add_parser("synth", help="write the built-in synthetic data as a native store")
    p.add_argument("output")
    p.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)

    p = commands.add_parser("info", help="print a store's counts and shapes")
    p.add_argument("store")
    p.add_argument("--verify", action="store_true", help="re-read every record and check count and checksum")
    p.add_argument("--sample", type=int, default=100, help="records read for the region statistics")
    return parser


def info(path: str, verify: bool = False, sample: int = 100) -> str:
    if sample < 1:
        raise ValueError(f"--sample must be at least 1, got {sample}")
    store = open_store(path)
    lines = [f"store       {os.path.abspath(path)}", f"format      {type(store).__name__}", f"records     {len(store)}"]
    if isinstance(store, NativeStore):
        meta = verify_store(path) if verify else store.meta
        lines += [f"version     {meta['version']}", f"feature_dim {meta['feature_dim']}",
                  f"num_classes {meta['num_classes']}", f"captions    {meta['num_captions']}",
                  f"checksum    {meta['checksum']:#010x}" + (" (verified)" if verify else ""),
                  f"source      {meta['source']}"]
    step = max(1, len(store) // max(sample, 1))
    records = [store[i] for i in range(0, len(store), step)][:sample]
    regions = np.array([r["features"].shape[0] for r in records])
    first = records[0]
    lines += [f"regions     min {regions.min()}  mean {regions.mean():.1f}  max {regions.max()}  "
              f"(over {len(records)} records)",
              f"record 0    image_id {first['image_id']!r}  {first['image_w']}x{first['image_h']}  " +
              "  ".join(f"{k} {tuple(first[k].shape)}" for k in ("features", "boxes", "cls_prob") if k in first)]
    if "captions" in first:
        lines.append(f"caption 0   {first['captions'][0]!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            meta = convert(args.input, args.output, args.source_format, captions=args.captions,
                           skip_bad=args.skip_bad)
            print(f"wrote {meta['count']} records to {args.output} (skipped {meta['skipped']} bad)")
        elif args.command == "synth":
            meta = write_synthetic(args.output, args.num_images, args.seed, progress=True)
            print(f"wrote {meta['count']} synthetic records to {args.output}")
        else:
            print(info(args.store, args.verify, args.sample))
    except (ValueError, OSError) as error:
        # Bad input or bad data: the message names the file and record; a traceback would only hide it.
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
