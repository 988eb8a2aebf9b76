"""SAM superpixels, ours vs the reference: ``python -m bench.precompute``.

Both sides get the same SAM, the same points grid, the same thresholds, the same images and the
same partition clean-up (``PartitionConfig``):

- reference: ``SamAutomaticMaskGenerator(output_mode="binary_mask")``, one image at a time, then
  ``partition_from_masks`` on its full-size masks;
- ours: :class:`SamSuperpixels` (images batched through the encoder and the decoder, IoU filter
  before upsampling, masks kept as tensors on the device, partition at the working resolution
  of at most 1024 px and upsampled). Up to 1024 px both partition at full size.

Without ``--sam-checkpoint`` it runs the random-weight ``tiny`` SAM (saved to a temp dir), which
measures the pipeline mechanics on a CPU; real speed needs the real weights on a GPU. The tiny
model's predicted IoUs are about 0-0.3 and its logits about ±0.05, so for it the default
thresholds are lowered (``TINY_THRESHOLDS``) to let masks through; real models default to SAM's.

Partition agreement: each reference superpixel is matched to the superpixel of ours with which it
has the highest IoU; we report the mean of those IoUs (every superpixel counts once) and the
area-weighted mean (every pixel counts once), averaged over images. 1.0 means identical partitions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from pipeline.images import decode_image
from pipeline.partition import PartitionConfig, partition_agreement, partition_from_masks
from pipeline.superpixels.base import SamOptions
from pipeline.superpixels.sam import SAM_MODEL_TYPES, SamSuperpixels, save_tiny_sam
from pipeline.synth import synthesize

TINY_THRESHOLDS = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.6, "stability_score_offset": 0.01}


def dataset_images(root: Path, count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` images of a synthetic REFER dataset (landscape and portrait alternate), as RGB arrays."""
    sizes = [(size, size * 3 // 4) if i % 2 == 0 else (size * 3 // 4, size) for i in range(count)]
    summary = synthesize(root, images=count, seed=seed, sizes=sizes)
    return [decode_image(path.read_bytes()).rgb for path in sorted(summary.image_dir.glob("*.jpg"))]


def reference_backend(options: SamOptions, ours: SamSuperpixels) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """SAM's own generator on our model, one image at a time, then the same partition step."""
    generator = SamAutomaticMaskGenerator(
        ours.sam,
        points_per_side=options.points_per_side,
        points_per_batch=options.points_per_batch,
        pred_iou_thresh=options.pred_iou_thresh,
        stability_score_thresh=options.stability_score_thresh,
        stability_score_offset=options.stability_score_offset,
        box_nms_thresh=options.box_nms_thresh,
        output_mode="binary_mask",
    )

    def run(images: Sequence[np.ndarray]) -> list[np.ndarray]:
        labels = []
        for image in images:
            masks = [record["segmentation"] for record in generator.generate(image)]
            stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, *image.shape[:2]), dtype=torch.bool)
            labels.append(partition_from_masks(stacked.to(ours.device), ours.partition))
        return labels

    return run


def timed(run: Callable[[Sequence[np.ndarray]], list[np.ndarray]], images: Sequence[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    """Warm up on one image, then time the whole set; returns throughput and the label maps."""
    run(images[:1])
    start = time.perf_counter()
    labels = run(images)
    seconds = time.perf_counter() - start
    stats = {
        "seconds": seconds,
        "images_per_s": len(images) / seconds,
        "superpixels_per_image": float(np.mean([int(x.max()) + 1 for x in labels])),
    }
    return stats, labels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.precompute", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="synthetic images (default 8)")
    parser.add_argument("--size", type=int, default=256, help="long side of the images in px (default 256)")
    parser.add_argument("--points-per-side", type=int, default=8,
                        help="points grid (default 8: a few minutes on 2 CPU cores; SAM's own is 32)")
    parser.add_argument("--points-per-batch", type=int, default=64, help="prompts per decoder call, both sides (default 64)")
    parser.add_argument("--images-per-batch", type=int, default=4, help="images per encoder call, ours only (default 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the generator comparison (default: cuda if available)")
    parser.add_argument("--sam-checkpoint", type=Path, help="SAM .pth; default: a random tiny SAM in a temp dir")
    parser.add_argument("--sam-model", choices=SAM_MODEL_TYPES, default="tiny", help="architecture of --sam-checkpoint")
    parser.add_argument("--skip-workers", action="store_true", help="skip the 1 vs 2 Ray workers job comparison")
    parser.add_argument("--json", type=Path, default=Path("bench/results/precompute.json"),
                        help="where to write the results (default bench/results/precompute.json)")
    return parser.parse_args(argv)


def compare_generators(options: SamOptions, images: list[np.ndarray], device: str) -> dict:
    """Reference generator vs ours on the same model and images: throughput and agreement."""
    ours = SamSuperpixels(options, PartitionConfig(), device=device)
    reference_stats, reference_labels = timed(reference_backend(options, ours), images)
    ours_stats, ours_labels = timed(lambda batch: [r.labels for r in ours(batch)], images)
    agreement = np.array([partition_agreement(r, o) for r, o in zip(reference_labels, ours_labels)]).mean(0)
    return {
        "device": str(ours.device),
        "torch_threads": torch.get_num_threads(),
        "reference": reference_stats,
        "ours": ours_stats,
        "speedup": ours_stats["images_per_s"] / reference_stats["images_per_s"],
        "agreement": {"mean_iou": float(agreement[0]), "area_weighted_iou": float(agreement[1])},
    }


def compare_workers(refer_root: Path, options: SamOptions, scratch: Path) -> dict:
    """The precompute job (local Ray, SAM backend, one shard per image) with 1 and with 2 workers.

    Wall time of the whole job, actor start-up and model loading included (what a user waits
    for), but not Ray's own start-up, which is done once before either is timed.
    """
    import ray

    from jobs.precompute import main as precompute

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="WARNING")

    flags = ["--refer-root", str(refer_root), "--dataset", "refcoco", "--split-by", "unc", "--shard-size", "1",
             "--backend", "sam", "--sam-checkpoint", options.checkpoint, "--sam-model", options.model_type,
             "--points-per-side", str(options.points_per_side), "--pred-iou-thresh", str(options.pred_iou_thresh),
             "--stability-score-thresh", str(options.stability_score_thresh),
             "--stability-score-offset", str(options.stability_score_offset)]
    seconds = {}
    for workers in (1, 2):
        start = time.perf_counter()
        if precompute([*flags, "--out", str(scratch / f"workers{workers}"), "--workers", str(workers)]) != 0:
            raise RuntimeError(f"precompute with {workers} workers failed")
        seconds[workers] = time.perf_counter() - start
    return {"seconds_1_worker": seconds[1], "seconds_2_workers": seconds[2], "speedup": seconds[1] / seconds[2]}


def main(argv: Sequence[str] | None = None) -> dict:
    """Run both comparisons and return (and print) the results."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        checkpoint = args.sam_checkpoint or save_tiny_sam(scratch / "sam_tiny.pth")
        options = SamOptions(
            str(checkpoint),
            args.sam_model,
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            images_per_batch=args.images_per_batch,
            **(TINY_THRESHOLDS if args.sam_model == "tiny" else {}),
        )
        images = dataset_images(scratch / "refer", args.images, args.size)
        results = {
            "images": len(images),
            "image_size": args.size,
            "sam": {k: v for k, v in asdict(options).items() if k != "checkpoint"},
            "partition": PartitionConfig().as_dict(),
            "generators": compare_generators(options, images, args.device),
        }
        if not args.skip_workers:
            results["workers"] = compare_workers(scratch / "refer", options, scratch)
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    sam, generators = results["sam"], results["generators"]
    rows = [("reference: SamAutomaticMaskGenerator + partition", generators["reference"]),
            ("ours: SamSuperpixels", generators["ours"])]
    lines = [
        f"SAM {sam['model_type']} on {generators['device']} ({generators['torch_threads']} threads), {results['images']} images "
        f"≤{results['image_size']} px, {sam['points_per_side']}² points, pred_iou>{sam['pred_iou_thresh']}, "
        f"stability≥{sam['stability_score_thresh']} (offset {sam['stability_score_offset']}), NMS {sam['box_nms_thresh']}",
        f"{'method':<52}{'images/s':>10}{'s/image':>10}{'superpixels/image':>19}",
    ]
    lines += [
        f"{name:<52}{s['images_per_s']:>10.3f}{s['seconds'] / results['images']:>10.3f}{s['superpixels_per_image']:>19.1f}"
        for name, s in rows
    ]
    agreement = generators["agreement"]
    lines += [
        f"speedup: {generators['speedup']:.2f}x",
        f"partition agreement (IoU of each reference superpixel with its best match in ours): "
        f"mean {agreement['mean_iou']:.4f}, area-weighted {agreement['area_weighted_iou']:.4f}",
    ]
    if "workers" in results:
        w = results["workers"]
        lines.append(f"precompute job (local Ray, SAM backend): 1 worker {w['seconds_1_worker']:.1f} s, "
                     f"2 workers {w['seconds_2_workers']:.1f} s, speedup {w['speedup']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
