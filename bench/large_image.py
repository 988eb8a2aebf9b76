"""Time and peak memory of our SAM superpixels on one 3000×2000 photo: the case the working
resolution is for (full-size mask stacks of such an image took gigabytes).

    python -m bench.large_image [--pred-iou-thresh 0.2 --stability-score-thresh 0.6]

Peak memory is the process's max RSS, so run it in a fresh process (as this command does).
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.options import RANDOM_WEIGHT_THRESHOLDS, option_of
from jobs.options import OptionsParser, build
from pipeline.images import decode_image
from pipeline.partition import PartitionConfig
from pipeline.sam_model import save_tiny_sam
from pipeline.superpixels.base import SamOptions
from pipeline.superpixels.sam import SamSuperpixels
from pipeline.synth import synthesize


@dataclass(frozen=True)
class LargeImageOptions:
    """SAM's settings: svp precompute's, at the thresholds that let a random-weight tiny SAM's masks
    through (bench.options.RANDOM_WEIGHT_THRESHOLDS: SAM's own keep none of them) and an 8² grid."""

    points_per_side: int = option_of(SamOptions, "points_per_side", 8)
    pred_iou_thresh: float = option_of(SamOptions, "pred_iou_thresh", RANDOM_WEIGHT_THRESHOLDS["pred_iou_thresh"])
    stability_score_thresh: float = option_of(SamOptions, "stability_score_thresh",
                                              RANDOM_WEIGHT_THRESHOLDS["stability_score_thresh"])


OPTIONS = (LargeImageOptions,)


def build_parser() -> OptionsParser:
    """``python -m bench.large_image``'s flags, from :data:`OPTIONS` (tests/test_options.py walks them with every
    other command's)."""
    parser = OptionsParser(prog="python -m bench.large_image", description=__doc__.split("\n\n")[0])
    parser.add_options(*OPTIONS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    given = build(LargeImageOptions, build_parser().parse_args(argv))
    with tempfile.TemporaryDirectory() as scratch:
        dataset = synthesize(Path(scratch), images=1, seed=0, sizes=[(3000, 2000)])
        image = decode_image(next(dataset.image_dir.glob("*.jpg")).read_bytes()).rgb
        options = SamOptions(str(save_tiny_sam(Path(scratch) / "sam.pth")), "tiny", points_per_batch=64,
                             stability_score_offset=RANDOM_WEIGHT_THRESHOLDS["stability_score_offset"],
                             **asdict(given))
        backend = SamSuperpixels(options, PartitionConfig())
        start = time.perf_counter()
        (result,) = backend([image])
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{image.shape[1]}x{image.shape[0]} image: {seconds:.1f} s, peak RSS {peak:.0f} MiB, "
          f"{int(result.labels.max()) + 1} superpixels")


if __name__ == "__main__":
    main()
