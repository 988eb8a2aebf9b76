"""``svp synth``: write a synthetic REFER-layout dataset (also ``python -m jobs.synth``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs import entry, options
from pipeline.synth import PROBES, synthesize


@dataclass(frozen=True)
class SynthOptions:
    """Where the synthetic dataset goes, and how it is drawn."""

    out: Path = field(metadata={"help": "REFER root to write (refcoco/, refcoco+/, refcocog/ and images/ go under it)"})
    images: int = field(default=40, metadata={"help": "number of images to generate"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed writes byte-identical files"})
    probe: str | None = field(default=None, metadata={"choices": PROBES, "help": (
        "probe data, on which colour and shape never single out the referred object: place (twins told apart "
        "only by place or size words) or inside (twins told apart only by what is inside them, striped vs plain "
        "of the same mean colour, or around them, next to another object vs alone); omitted: the plain dataset")})


OPTIONS = (SynthOptions,)


def run(args: argparse.Namespace) -> int:
    """Generate the dataset; a bad argument is reported on stderr with exit status 2, like argparse."""
    try:
        summary = synthesize(**asdict(options.build(SynthOptions, args)))
    except ValueError as error:  # the generator checks its own arguments, for its Python callers too
        raise options.OptionError(str(error)) from error
    print(f"wrote {summary.images} images with {summary.objects} objects to {summary.root}")
    for dataset, splits in summary.images_per_split.items():
        counts = ", ".join(f"{split} {count}" for split, count in splits.items())
        print(f"  {dataset}: {summary.refs_files[dataset].name} ({counts} images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
