"""``svp inspect OUT`` / ``python -m jobs.inspect``: look at a precompute output before training on it.

Writes into the report directory:

  contact_sheet.png     sampled images: superpixel boundaries (yellow), one ref's mask (magenta),
                        its sentence, the sample key and its number of superpixels
  superpixels_hist.png  superpixels per image over every written image, by split
  area_hist.png         superpixel area as a fraction of the image (log scale), sampled images
  summary.txt           per split: images written / failed, shards, samples; failures by stage
                        with an example reason; superpixels per image; backend and config hash
  inspect.html          with --html: all of the above in one self-contained page

The summary is also printed. OUT may be a local directory or any fsspec URL (s3://bucket/prefix),
written by any superpixel backend; only the shards holding the sampled images are read.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from jobs import entry, options
from pipeline.inspect import inspect_output
from pipeline.storage import OutputStore


@dataclass(frozen=True)
class InspectOptions:
    """Which precompute output to look at, how much of it, and where the report goes."""

    out: str = field(metadata={"positional": True, "metavar": "OUT", "help": (
        "output of `svp precompute`: a directory or a URL prefix (s3://...)")})
    samples: int = field(default=16, metadata={"help": (
        "images on the contact sheet (and behind the area histogram)")})
    seed: int = field(default=0, metadata={"help": (
        "seed of the sampling: the same seed draws the same images and refs")})
    split: str | None = field(default=None, metadata={"help": (
        "sample only this split (e.g. val); omitted: every split, in turn")})
    report_dir: Path | None = field(default=None, metadata={"help": (
        "where the report goes; omitted: OUT/inspect/ for a local OUT, and ./inspect-NAME/ (NAME: OUT's last "
        "path part) for a URL")})
    html: bool = field(default=False, metadata={"help": (
        "also write inspect.html, one self-contained page with the pictures and the summary")})


OPTIONS = (InspectOptions,)


def default_report_dir(out: str) -> Path:
    """Next to the data when it is local; in the working directory when OUT is remote."""
    store = OutputStore(out)
    if store.local:
        return Path(store.root) / "inspect"
    return Path(f"inspect-{store.url.rsplit('/', 1)[-1]}")


def run(args: argparse.Namespace) -> int:
    given = options.build(InspectOptions, args)
    report_dir = given.report_dir or default_report_dir(given.out)
    report = inspect_output(given.out, report_dir, samples=given.samples, seed=given.seed, split=given.split,
                            with_html=given.html)
    print(report.text, end="")
    print("\nreport:\n" + "\n".join(f"  {name:<22}{path}" for name, path in report.files.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
