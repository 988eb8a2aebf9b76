"""``svp synth``: write a synthetic REFER-layout dataset (also ``python -m jobs.synth``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs import entry
from pipeline.synth import synthesize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="REFER root to write (refcoco/, refcoco+/, refcocog/ and images/ go under it)")
    parser.add_argument("--images", type=int, default=40, help="number of images to generate (default: 40)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed writes byte-identical files (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset; a bad argument is reported on stderr with exit status 2, like argparse."""
    try:
        summary = synthesize(args.out, images=args.images, seed=args.seed)
    except ValueError as error:
        print(f"svp synth: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary.images} images with {summary.objects} objects to {summary.root}")
    for dataset, splits in summary.images_per_split.items():
        counts = ", ".join(f"{split} {count}" for split, count in splits.items())
        print(f"  {dataset}: {summary.refs_files[dataset].name} ({counts} images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
