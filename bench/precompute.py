"""SAM superpixels, ours vs the reference; the precompute job with 1 and 2 workers: ``python -m bench.precompute``.

Both generators get the same SAM, the same points grid, the same thresholds, the same images and
the same partition clean-up (``PartitionConfig``):

- reference: ``SamAutomaticMaskGenerator(output_mode="binary_mask")``, one image at a time, then
  ``partition_from_masks`` on its full-size masks;
- ours: :class:`SamSuperpixels` (images batched through the encoder and the decoder, IoU filter
  before upsampling, masks kept as tensors on the device, partition at the working resolution
  of at most 1024 px and upsampled). Up to 1024 px both partition at full size.

The SAM: ``--sam-checkpoint`` if given. Otherwise a ``tiny`` SAM is first pretrained on the
bench's own synthetic images (``svp tiny-sam --pretrain-on``, ``--precompute-sam-pretrain-steps``):
its masks are then masks of objects, so the partitions compared are real ones. Briefly trained, it
predicts lower IoUs than SAM's released weights, whose default thresholds (0.88, 0.95) would keep
none of its masks; it gets ``PRETRAINED_TINY_THRESHOLDS``, which keep the objects'. A random
SAM's masks are speckle (logits of about ±0.05) that the partition clean-up merges into one
region per image, which makes any two generators "agree" and times a workload no user has.
Random weights remain for the other model types (a random ViT-H on a GPU: its cost is the real
model's) and for ``--precompute-sam-pretrain-steps 0``; they get lowered thresholds
(``RANDOM_WEIGHT_THRESHOLDS``) to let masks through.

Partition agreement (``pipeline.partition.partition_agreement``): each reference superpixel is
matched to the superpixel of ours with which it has the highest IoU; we report the mean of those
IoUs (every superpixel counts once) and the area-weighted mean (every pixel counts once), averaged
over images. 1.0 means identical partitions.

The job comparison runs ``svp precompute`` (local Ray, SAM backend, one shard per image) with 1 and
with 2 workers on the same ``--workers-images`` images: wall time of the whole job, actor start-up
and model loading included (what a user waits for), but not Ray's own start-up. Those fixed
seconds do not shrink with more workers, so a job of a few images measures them, not the scaling;
each job's timing.json says how long its busiest worker spent in its stages, which splits the wall
time into the work that 2 workers share (``work_speedup``) and the fixed rest (``fixed_s``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from bench.common import Workspace, run_alone, speed_sam_checkpoint
from bench.options import RANDOM_WEIGHT_THRESHOLDS, option_of
from jobs import tiny_sam
from pipeline.images import decode_image
from pipeline.partition import PartitionConfig, partition_agreement, partition_from_masks
from pipeline.shards import read_timing
from pipeline.superpixels.base import SamOptions
from pipeline.superpixels.sam import SamSuperpixels
from pipeline.synth import synthesize
from trainer.checkpoint import git_commit

NAME = "precompute"
PRESETS: dict[str, dict] = {
    "cpu": {},
    "full": {"workers_images": 128, "realsize": True},
    "quick": {"precompute_images": 2, "workers_images": 2, "image_size": 64, "points_per_side": 2,
              "precompute_sam_pretrain_steps": 2},
    "gpu": {"precompute_images": 16, "workers_images": 32, "image_size": 1024, "points_per_side": 32,
            "realsize": True, "realsize_images": 8},
}
PRETRAINED_TINY_THRESHOLDS = {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.8}
# The real-size comparison's small SAM, pretrained on the synthetic train images: SAM's own thresholds.
REALSIZE_THRESHOLDS: dict = {}
REALSIZE_PRETRAIN_IMAGES = 16  # synthetic 1024 px images made for it (its train split pretrains the small SAM)
THRESHOLDS = {"checkpoint": {}, "pretrained": PRETRAINED_TINY_THRESHOLDS, "random": RANDOM_WEIGHT_THRESHOLDS}


@dataclass(frozen=True)
class PrecomputeOptions:
    """precompute: SAM superpixels vs the reference, 1 vs 2 workers. SAM's settings are svp
    precompute's, sized for 2 CPU cores (8² points, a few minutes; SAM's own grid is 32²);
    --images-per-batch batches ours only (the reference takes one image at a time)."""

    precompute_images: int = field(default=8, metadata={"help": "synthetic images both generators segment"})
    workers_images: int = field(default=64, metadata={"help": (
        "synthetic images of the 1 vs 2 workers job (the full preset: 128; half a minute or a minute of work per "
        "worker, so that the job's ~5 fixed start-up seconds and this machine's noise do not hide the scaling)")})
    image_size: int = field(default=256, metadata={"help": (
        "long side of those images in px (above 1024 ours partitions at 1024)")})
    points_per_side: int = option_of(SamOptions, "points_per_side", 8)
    points_per_batch: int | None = option_of(SamOptions, "points_per_batch", None)
    images_per_batch: int = option_of(SamOptions, "images_per_batch", SamOptions.images_per_batch)
    precompute_sam_pretrain_steps: int = field(default=200, metadata={"help": (
        "without --sam-checkpoint and with --sam-model tiny: first pretrain the tiny SAM on the synthetic images "
        "for this many steps, so that its masks are objects (200: about 1.5 min on 2 cores); 0: random weights, "
        "whose masks are speckle")})
    skip_workers: bool = field(default=False, metadata={"help": "skip the 1 vs 2 Ray workers job comparison"})
    realsize: bool = field(default=False, metadata={"help": (
        "also compare the generators at SAM's real sizes (the full preset does): SAM's own prompt encoder and mask "
        "decoder on a small encoder (--sam-model small, pretrained here on 1024 px synthetic images), 1024 px, "
        "SAM's 32x32 grid, with the full grid and with coarse-to-fine (the reference: about 2 min per image on "
        "2 cores)")})
    realsize_images: int = field(default=2, metadata={"help": "images of the real-size comparison"})
    realsize_pretrain_steps: int = field(default=300, metadata={"help": (
        "pretraining steps of the real-size comparison's small SAM (2 images a step: 300 take about 20 min on 2 "
        "cores, and bring the IoU of its best output from 0.13 at step 100 to about 0.9; kept in the workspace: a "
        "--work directory pretrains once)")})
    profile: bool = field(default=False, metadata={"help": (
        "also run each generator once more under cProfile and print where its time goes (mask decoder, mask "
        "upsampling, encoder, the rest)")})


OPTIONS = (PrecomputeOptions,)


def dataset_images(root: Path, count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` images of a synthetic REFER dataset at ``root`` (landscape and portrait alternate), as RGB arrays."""
    sizes = [(size, size * 3 // 4) if i % 2 == 0 else (size * 3 // 4, size) for i in range(count)]
    summary = synthesize(root, images=count, seed=seed, sizes=sizes)
    return [decode_image(path.read_bytes()).rgb for path in sorted(summary.image_dir.glob("*.jpg"))]


def reference_backend(options: SamOptions, ours: SamSuperpixels) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """SAM's own generator on our model (float32, as SAM's code runs it on a CPU), one image at a
    time, then the partition at full size."""
    generator = SamAutomaticMaskGenerator(
        ours.sam,
        points_per_side=options.points_per_side,
        points_per_batch=options.points_per_batch or 64,  # omitted: the generator's own default
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
            stacked = (torch.from_numpy(np.stack(masks)) if masks
                       else torch.zeros((0, *image.shape[:2]), dtype=torch.bool))
            labels.append(partition_from_masks(stacked.to(ours.device), ours.partition))
        return labels

    return run


def timed(run: Callable[[Sequence[np.ndarray]], list[np.ndarray]], images: Sequence[np.ndarray],
          device: str, warm_up: bool = True) -> tuple[dict, list[np.ndarray]]:
    """Warm up on one image, then time the whole set; returns throughput (and on a GPU the peak
    memory allocated) and the label maps, which are on the host: the GPU work is done when the
    timer stops. ``warm_up=False`` for a run whose one image takes minutes (the reference at real
    size on a CPU), where a first call's set-up is a rounding error."""
    if warm_up:
        run(images[:1])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    labels = run(images)
    seconds = time.perf_counter() - start
    stats = {
        "seconds": seconds,
        "images_per_s": len(images) / seconds,
        "superpixels_per_image": float(np.mean([int(x.max()) + 1 for x in labels])),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    return stats, labels


def compare_generators(options: SamOptions, images: list[np.ndarray], device: str) -> dict:
    """Reference generator vs ours on the same model and images: throughput and agreement."""
    ours = SamSuperpixels(options, PartitionConfig(), device=device)
    reference = timed(reference_backend(options, ours), images, device)
    return {"reference": reference[0], **against_reference(ours, images, device, reference)}


def against_reference(ours: SamSuperpixels, images: list[np.ndarray], device: str,
                      reference: tuple[dict, list[np.ndarray]], warm_up: bool = True) -> dict:
    """Ours timed on ``images`` against the reference's (stats, labels) of them: throughput, where
    ours spends its time per image (``stages``), the masks per image after each filter, agreement."""
    if warm_up:
        ours(images[:1])
    ours.stages.take(), ours.counts.update(dict.fromkeys(ours.counts, 0))  # the timed run's alone
    stats, labels = timed(lambda batch: [r.labels for r in ours(batch)], images, device, warm_up=False)
    agreement = np.array([partition_agreement(r, o) for r, o in zip(reference[1], labels)]).mean(0)
    return {
        "ours": stats,
        "speedup": stats["images_per_s"] / reference[0]["images_per_s"],
        "agreement": {"mean_iou": float(agreement[0]), "area_weighted_iou": float(agreement[1])},
        "stages": {stage: seconds / len(images) for stage, seconds in ours.stages.take().items()},
        "masks_per_image": {name: count / len(images) for name, count in ours.counts.items()},
    }


# The real-size comparison's variants of ours: (name, SamOptions fields). The first is the default
# settings' entry, the others nest under their names: the fewer-prompts mode, and float32 (the
# reference's arithmetic: what bf16 costs in agreement).
REALSIZE_MODES = (("full", {}), ("coarse-to-fine", {"point_grid": "coarse-to-fine"}),
                  ("fp32", {"sam_precision": "fp32"}))


def compare_at_real_size(args: argparse.Namespace, scratch: Path) -> dict:
    """The generators at SAM's real sizes, the reference once and ours in each of
    :data:`REALSIZE_MODES` (``full`` at the top, the others nested under their names); see the module doc."""
    root = scratch / "refer1024"
    images = dataset_images(root, max(args.realsize_images, REALSIZE_PRETRAIN_IMAGES), 1024)[: args.realsize_images]
    checkpoint = pretrained_sam(root, "small", args.realsize_pretrain_steps, images_per_step=2)
    entries = {}
    reference, commit = None, git_commit()  # the code that runs: what HEAD is now, not after minutes of timing
    for mode, settings in REALSIZE_MODES:
        options = SamOptions(str(checkpoint), "small", points_per_side=32, points_per_batch=args.points_per_batch,
                             **REALSIZE_THRESHOLDS, **settings)
        ours = SamSuperpixels(options, PartitionConfig(), device=args.device)
        if reference is None:
            reference = timed(reference_backend(options, ours), images, args.device, warm_up=False)
        compared = against_reference(ours, images, args.device, reference)
        entries[mode] = {"sam_model": "small", "image_size": 1024, "points_per_side": 32, "images": len(images),
                         "point_grid": options.point_grid, "dtype": str(ours.dtype).removeprefix("torch."),
                         "superpixels_per_image": compared["ours"]["superpixels_per_image"], **compared,
                         "sam": {k: v for k, v in asdict(options).items() if k != "sam_checkpoint"},
                         "sam_weights": f"pretrained here for {args.realsize_pretrain_steps} steps",
                         "reference": reference[0], "git_commit": commit}
    default, _ = REALSIZE_MODES[0]
    return {**entries.pop(default), **entries}


def earlier_realsize(path: Path) -> dict | None:
    """The ``realsize`` entry of an earlier run's results, which a run without ``--realsize`` (``make
    bench``'s cpu preset) would otherwise overwrite: kept as it was, its ``git_commit`` saying when."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    earlier = results.get("realsize") if isinstance(results, dict) else None
    return {**earlier, "kept_from_an_earlier_run": True} if isinstance(earlier, dict) else None


def format_realsize(realsize: dict) -> list[str]:
    """The real-size comparison's lines: the reference, then each mode of ours with its stages and counts."""
    if realsize.get("kept_from_an_earlier_run"):
        return [f"real size: not measured in this run; kept from the one at {realsize.get('git_commit')} "
                f"(--realsize measures it)"]
    reference = realsize["reference"]
    lines = [f"real size: SAM {realsize['sam_model']} ({realsize['sam_weights']}), {realsize['images']} images of "
             f"{realsize['image_size']} px, {realsize['points_per_side']}² points, SAM's thresholds; reference "
             f"{reference['seconds'] / realsize['images']:.1f} s/image, {reference['superpixels_per_image']:.1f} "
             "superpixels/image"]
    modes = {REALSIZE_MODES[0][0]: realsize, **{name: realsize[name] for name, _ in REALSIZE_MODES[1:]}}
    for name, entry in modes.items():
        agreement, counts = entry["agreement"], entry["masks_per_image"]
        seconds = entry["ours"]["seconds"] / entry["images"]
        lines.append(f"  {name} ({entry['point_grid']}, {entry['dtype']}): {seconds:.1f} s/image, speedup "
                     f"{entry['speedup']:.2f}x, agreement mean {agreement['mean_iou']:.4f}, area-weighted "
                     f"{agreement['area_weighted_iou']:.4f}, {entry['superpixels_per_image']:.1f} superpixels/image")
        lines.append("    masks per image: " + " -> ".join(f"{count:g} {stage}" for stage, count in counts.items()))
        lines.append("    s/image: " + ", ".join(f"{stage} {took:.2f}" for stage, took in entry["stages"].items()))
    return lines


# Where a generator's time goes: (label, (file, function) whose cumulative time it is; either side's).
PROFILED = (
    ("mask decoder", (("mask_decoder.py", "predict_masks"), ("superpixels/sam.py", "_decode"))),
    ("mask upsampling", (("modeling/sam.py", "postprocess_masks"),)),
    ("image encoder", (("image_encoder.py", "forward"),)),
)


def profile_generators(options: SamOptions, images: list[np.ndarray], device: str) -> dict:
    """{generator: {"total_s": ..., label: seconds}}: one cProfile'd run of each on ``images``."""
    ours = SamSuperpixels(options, PartitionConfig(), device=device)
    generators = {"reference": reference_backend(options, ours), "ours": lambda batch: [r.labels for r in ours(batch)]}
    profiles = {}
    for name, run in generators.items():
        run(images[:1])  # warm-up, as timed() does
        profiler = cProfile.Profile()
        profiler.enable()
        run(images)
        profiler.disable()
        stats = pstats.Stats(profiler)  # .stats: {(file, line, function): (calls, calls, own, cumulative, callers)}
        profiles[name] = {"total_s": stats.total_tt, **{
            label: max((row[3] for (file, _, function), row in stats.stats.items()
                        if any(file.endswith(f) and function == fn for f, fn in places)), default=0.0)
            for label, places in PROFILED}}
    return profiles


def compare_workers(refer_root: Path, options: SamOptions, scratch: Path, device: str) -> dict:
    """The precompute job (local Ray, SAM backend, one shard per image) with 1 and with 2 workers.
    On a GPU the workers share it (``--gpus-per-worker`` 1/workers).

    Besides the wall times, each job's busiest worker's stage seconds (from its timing.json): the
    work that more workers split, against the fixed seconds (actor start-up, imports, model load,
    outputs) that they do not, so that a user can tell what a longer job will scale like.
    """
    import ray

    from jobs.precompute import main as precompute

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="WARNING")

    flags = ["--refer-root", str(refer_root), "--dataset", "refcoco", "--split-by", "unc", "--shard-size", "1",
             "--backend", "sam", "--sam-checkpoint", options.sam_checkpoint, "--sam-model", options.sam_model,
             "--points-per-side", str(options.points_per_side), "--pred-iou-thresh", str(options.pred_iou_thresh),
             "--stability-score-thresh", str(options.stability_score_thresh),
             "--stability-score-offset", str(options.stability_score_offset)]
    jobs = {}
    for workers in (1, 2):
        out = scratch / f"workers{workers}"
        shutil.rmtree(out, ignore_errors=True)  # a complete output from an earlier run would be resumed: no work
        gpus = ["--gpus-per-worker", str(1 / workers)] if torch.device(device).type == "cuda" else []
        start = time.perf_counter()
        if precompute([*flags, *gpus, "--out", str(out), "--workers", str(workers)]) != 0:
            raise RuntimeError(f"precompute with {workers} workers failed")
        seconds = time.perf_counter() - start
        per_worker = read_timing(out)["per_worker"].values()
        busiest = max(sum(worker["seconds"].values()) for worker in per_worker)
        jobs[str(workers)] = {"seconds": seconds, "busiest_worker_s": busiest, "fixed_s": seconds - busiest}
    one, two = jobs["1"], jobs["2"]  # string keys, as the results' JSON has them
    return {"seconds_1_worker": one["seconds"], "seconds_2_workers": two["seconds"],
            "speedup": one["seconds"] / two["seconds"],
            "work_speedup": one["busiest_worker_s"] / two["busiest_worker_s"], "jobs": jobs}


def precompute_sam(args: argparse.Namespace, workspace: Workspace, refer_root: Path) -> tuple[Path, str]:
    """(checkpoint, how its weights came: ``checkpoint``, ``pretrained`` or ``random``); see the module doc."""
    if args.sam_checkpoint is not None:
        return Path(args.sam_checkpoint), "checkpoint"
    steps = args.precompute_sam_pretrain_steps
    if args.sam_model != "tiny" or steps <= 0:
        return speed_sam_checkpoint(args, workspace), "random"
    return pretrained_sam(refer_root, "tiny", steps), "pretrained"


def pretrained_sam(refer_root: Path, model_type: str, steps: int, images_per_step: int | None = None) -> Path:
    """A ``model_type`` SAM (``tiny`` or ``small``) pretrained on ``refer_root``'s train images by
    ``svp tiny-sam --pretrain-on``, kept beside the data: a workspace pretrains it once."""
    path = refer_root.parent / f"sam_{model_type}_pretrained{steps}.pth"
    per_step = [] if images_per_step is None else ["--images-per-step", str(images_per_step)]
    if not path.exists() and tiny_sam.main(["--out", str(path), "--sam-model", model_type, "--pretrain-on",
                                            str(refer_root), "--steps", str(steps), *per_step]) != 0:
        raise RuntimeError(f"pretraining the {model_type} SAM on {refer_root} failed")
    return path


def run(args: argparse.Namespace, workspace: Workspace) -> dict:
    scratch = workspace.root / "precompute"
    dataset_size = max(args.precompute_images, args.workers_images)  # the job's; the generators take the first
    images = dataset_images(scratch / "refer", dataset_size, args.image_size)[: args.precompute_images]
    checkpoint, weights = precompute_sam(args, workspace, scratch / "refer")
    options = SamOptions(
        str(checkpoint),
        args.sam_model,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        images_per_batch=args.images_per_batch,
        **THRESHOLDS[weights],
    )
    generators = compare_generators(options, images, args.device)
    results = {
        "images": len(images),
        "image_size": args.image_size,
        "sam": {k: v for k, v in asdict(options).items() if k != "sam_checkpoint"},
        "sam_weights": f"pretrained here for {args.precompute_sam_pretrain_steps} steps" if weights == "pretrained"
                       else weights,
        "partition": PartitionConfig().as_dict(),
        "generators": generators,
        "headline": {"precompute_speedup_vs_reference": generators["speedup"],
                     "partition_agreement": generators["agreement"]["mean_iou"], "workers2_speedup": None},
    }
    if args.profile:
        results["profile"] = profile_generators(options, images, args.device)
    if args.realsize:
        results["realsize"] = compare_at_real_size(args, scratch)
    elif (earlier := earlier_realsize(args.results / f"{NAME}.json")) is not None:
        results["realsize"] = earlier
    if not args.skip_workers:
        workers = compare_workers(scratch / "refer", options, scratch, args.device)
        results["workers"] = {"images": dataset_size, **workers}
        results["headline"]["workers2_speedup"] = results["workers"]["speedup"]
    return results


def format_table(results: dict) -> str:
    sam, generators = results["sam"], results["generators"]
    rows = [("reference: SamAutomaticMaskGenerator + partition", generators["reference"]),
            ("ours: SamSuperpixels", generators["ours"])]
    lines = [
        f"SAM {sam['sam_model']} ({results['sam_weights']}) on {results['device']}, {results['images']} images "
        f"≤{results['image_size']} px, {sam['points_per_side']}² points, pred_iou>{sam['pred_iou_thresh']}, "
        f"stability≥{sam['stability_score_thresh']} (offset {sam['stability_score_offset']}), "
        f"NMS {sam['box_nms_thresh']}",
        f"{'method':<52}{'images/s':>10}{'s/image':>10}{'superpixels/image':>19}{'peak GPU GiB':>14}",
    ]
    lines += [
        f"{name:<52}{s['images_per_s']:>10.3f}{s['seconds'] / results['images']:>10.3f}"
        f"{s['superpixels_per_image']:>19.1f}"
        + (f"{s['peak_gpu_memory_gib']:>14.2f}" if s["peak_gpu_memory_gib"] is not None else f"{'-':>14}")
        for name, s in rows
    ]
    agreement = generators["agreement"]
    lines += [
        f"speedup: {generators['speedup']:.2f}x",
        f"partition agreement (IoU of each reference superpixel with its best match in ours): "
        f"mean {agreement['mean_iou']:.4f}, area-weighted {agreement['area_weighted_iou']:.4f}",
    ]
    if "realsize" in results:
        lines += format_realsize(results["realsize"])
    for name, profile in results.get("profile", {}).items():
        total = profile["total_s"]
        lines.append(f"profile, {name}: {total:.2f} s under cProfile; " + ", ".join(
            f"{label} {seconds:.2f} s ({seconds / total:.0%})"
            for label, seconds in profile.items() if label != "total_s"))
    if "workers" in results:
        w = results["workers"]
        lines.append(f"precompute job (local Ray, SAM backend, {w['images']} images): "
                     f"1 worker {w['seconds_1_worker']:.1f} s, "
                     f"2 workers {w['seconds_2_workers']:.1f} s, speedup {w['speedup']:.2f}x")
        jobs = w["jobs"]
        lines.append(f"  busiest worker's stages: 1 worker {jobs['1']['busiest_worker_s']:.1f} s, 2 workers "
                     f"{jobs['2']['busiest_worker_s']:.1f} s: the work {w['work_speedup']:.2f}x; fixed seconds "
                     f"(start-up, imports, model load, outputs) {jobs['1']['fixed_s']:.1f} and "
                     f"{jobs['2']['fixed_s']:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_alone(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
