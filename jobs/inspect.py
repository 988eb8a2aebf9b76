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
import sys
from pathlib import Path

from jobs import entry
from pipeline.inspect import InspectError, inspect_output
from pipeline.shards import ManifestError
from pipeline.storage import OutputStore, StorageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output of `svp precompute`: a directory or a URL prefix (s3://...)")
    parser.add_argument("--samples", type=int, default=16,
                        help="images on the contact sheet (and behind the area histogram); default 16")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling: the same seed draws the same images and refs; default 0")
    parser.add_argument("--split", default=None,
                        help="sample only this split (e.g. val); default: every split, in turn")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where the report goes; default OUT/inspect/ for a local OUT, and "
                             "./inspect-NAME/ (NAME: OUT's last path part) for a URL")
    parser.add_argument("--html", action="store_true",
                        help="also write inspect.html, one self-contained page with the pictures and the summary")


def default_report_dir(out: str) -> Path:
    """Next to the data when it is local; in the working directory when OUT is remote."""
    store = OutputStore(out)
    if store.local:
        return Path(store.root) / "inspect"
    return Path(f"inspect-{store.url.rsplit('/', 1)[-1]}")


def run(args: argparse.Namespace) -> int:
    report_dir = args.report_dir or default_report_dir(args.out)
    try:
        report = inspect_output(args.out, report_dir, samples=args.samples, seed=args.seed, split=args.split,
                                with_html=args.html)
    except (ManifestError, InspectError, StorageError) as exc:
        print(f"svp inspect: error: {exc}", file=sys.stderr)
        return 2
    print(report.text, end="")
    print("\nreport:\n" + "\n".join(f"  {name:<22}{path}" for name, path in report.files.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
