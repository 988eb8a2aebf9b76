"""Time and peak memory of our SAM superpixels on one 3000×2000 photo: the case the working
resolution is for (full-size mask stacks of such an image took gigabytes).

    python -m bench.large_image [--pred-iou-thresh 0.2 --stability-score-thresh 0.6]

Peak memory is the process's max RSS, so run it in a fresh process (as this command does).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from pipeline.images import decode_image
from pipeline.partition import PartitionConfig
from pipeline.sam_model import save_tiny_sam
from pipeline.superpixels.base import SamOptions
from pipeline.superpixels.sam import SamSuperpixels
from pipeline.synth import synthesize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.large_image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred-iou-thresh", type=float, default=0.2, help="SAM predicted-IoU filter (0 disables)")
    parser.add_argument("--stability-score-thresh", type=float, default=0.6, help="SAM stability filter (0 disables)")
    parser.add_argument("--points-per-side", type=int, default=8, help="SAM point grid per side (default 8)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = synthesize(Path(scratch), images=1, seed=0, sizes=[(3000, 2000)])
        image = decode_image(next(dataset.image_dir.glob("*.jpg")).read_bytes()).rgb
        options = SamOptions(str(save_tiny_sam(Path(scratch) / "sam.pth")), "tiny",
                             points_per_side=args.points_per_side,
                             points_per_batch=64, pred_iou_thresh=args.pred_iou_thresh,
                             stability_score_thresh=args.stability_score_thresh, stability_score_offset=0.01)
        backend = SamSuperpixels(options, PartitionConfig())
        start = time.perf_counter()
        (result,) = backend([image])
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{image.shape[1]}x{image.shape[0]} image: {seconds:.1f} s, peak RSS {peak:.0f} MiB, "
          f"{int(result.labels.max()) + 1} superpixels")


if __name__ == "__main__":
    main()
