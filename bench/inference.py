"""What a new image costs end to end, svp beside mlp: ``python -m bench.inference``.

Training reads superpixels and SAM embeddings from the shards; a new image has neither. ``svp``
then pays for SAM's automatic masks (the point grid's decoding and the partition) on top of what
``mlp`` pays (decoding the image, SAM's encoder for the mask decoder, the vision encoder, the
projector, the LLM, the mask decoder), and saves in the LLM what its few tokens save. Both are
timed through ``trainer.predict.Predictor``, the code ``svp predict`` runs (one SAM encoder pass
per image, shared by the mask generator and the mask decoder; SAM in bf16 where the CPU has it, as
``--sam-precision auto``; ``--point-grid`` as predict's), stage by stage: forward hooks on the
model's parts, the superpixel backend's own stage timer, and the rest as ``other``. For one image
alone and for a batch of ``--batch-size`` images (one expression each), at two sizes:

- ``demo``: the demo's tiny random models (LLM, vision encoder, SAM);
- ``realsize``: ``bench.realsize``'s stack: a Qwen2.5-0.5B-shaped LLM (bf16, as shipped),
  DINOv2-base and SAM ViT-B, random weights built from configs;

and the same with superpixels, SAM embeddings and vision features precomputed (what evaluation
reads from shards that store both), where only the projector, LLM and mask decoder run. Results go to
``RESULTS/inference.json``; not a part of ``python -m bench`` (the real-size stack takes minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bench import hub_models
from bench.common import (
    DTYPES,
    MeasurementOptions,
    OutputOptions,
    PartClock,
    describe_device,
    measure_in_child,
    measured_main,
    median_parts,
    model_parts,
    save_random_sam,
)
from bench.options import RANDOM_WEIGHT_THRESHOLDS, option_of
from jobs.options import OptionsParser
from pipeline.images import decode_image
from pipeline.partition import PartitionConfig
from pipeline.superpixels.base import SamOptions
from pipeline.superpixels.sam import SamSuperpixels
from pipeline.superpixels.sam_embeddings import compute_dtype
from trainer.model import ModelConfig, ProjectorConfig, SegmentationMLLM
from trainer.predict import Predictor

NAME = "inference"
STACKS = ("demo", "realsize")
PROJECTORS = ("mlp", "svp")
# Stages in the order an image goes through them; "superpixels" is the automatic masks' decoding
# of the point grid, "partition" turning the masks into one label map.
STAGES = ("decode", "sam_encoder", "superpixels", "partition", "vision", "projector", "llm_body", "mask_head", "other")
TEXT = "the red circle on the left"


@dataclass(frozen=True)
class InferenceOptions:
    """The stacks, the batch and how often each measurement is repeated."""

    work: Path = field(default=Path("/tmp/svp-bench-inference"), metadata={"help": (
        "where the random models and images go (kept: a rerun reuses them)")})
    stacks: tuple[str, ...] = field(default=STACKS, metadata={"help": (
        "comma-separated: demo (tiny models), realsize (0.5B-shaped LLM, DINOv2-base, SAM ViT-B)")})
    batch_size: int = field(default=4, metadata={"help": "images in the batch measurement (one expression each)"})
    repeats: int = field(default=2, metadata={"help": "timed runs of each measurement after a warm-up (median)"})
    points_per_side: int = option_of(SamOptions, "points_per_side", SamOptions.points_per_side)
    point_grid: str = option_of(SamOptions, "point_grid", SamOptions.point_grid)
    measure: str | None = field(default=None, metadata={"metavar": "STACK:PROJECTOR", "help": (
        "measure this one alone, in this process, and print its row as JSON (what each child process of a run "
        "does, so that no model's memory holds another's); writes no results")})


OPTIONS = (InferenceOptions, OutputOptions, MeasurementOptions)


def stack_config(stack: str, work: Path) -> tuple[dict, SamOptions]:
    """The ModelConfig fields (all but the projector) and the SAM of a stack, its models saved once."""
    if stack == "demo":
        sam = save_random_sam(work / "sam_tiny.pth", "tiny")
        return {"sam_checkpoint": str(sam), "sam_model": "tiny"}, SamOptions(sam_checkpoint=str(sam), sam_model="tiny")
    llm, vision = work / "qwen2.5-0.5b", work / "dinov2-base"
    if not (llm / "config.json").is_file():
        hub_models.save_qwen2(llm)
    if not (vision / "config.json").is_file():
        hub_models.save_dinov2(vision)
    sam = save_random_sam(work / "sam_vit_b.pth", "vit_b")
    return ({"llm": str(llm), "vision": str(vision), "sam_checkpoint": str(sam), "sam_model": "vit_b"},
            SamOptions(sam_checkpoint=str(sam), sam_model="vit_b"))


def sample_images(work: Path, count: int) -> list[bytes]:
    """JPEG bytes of synthetic REFER images (what a user's files are: decoding is a stage)."""
    from pipeline.synth import synthesize

    root = work / "refer"
    if not (root / "refcoco").is_dir():
        synthesize(root, images=max(count, 4), seed=0)
    return [path.read_bytes() for path in sorted(root.rglob("*.jpg"))[:count]]


def measure(stack: str, kind: str, args: argparse.Namespace, images: list[bytes]) -> dict:
    """Per-image stage seconds of one projector on one stack: new images alone and batched, and
    with superpixels, SAM embeddings and vision features precomputed."""
    fields, sam = stack_config(stack, args.work)
    # A random SAM's masks all fall below SAM's own thresholds. These keep some of the tiny SAM's; of the random
    # ViT-B's, none: that stack's figure is the decoder's IoUs for every prompt, without the upscaling a prompt
    # whose mask passes costs (bench.kernels' upscaling rows), which real weights add per passing prompt.
    sam = replace(sam, points_per_side=args.points_per_side, point_grid=args.point_grid, **RANDOM_WEIGHT_THRESHOLDS)
    model = SegmentationMLLM(ModelConfig(**fields, projector=ProjectorConfig(kind=kind))).eval()
    clock = PartClock(model_parts(model))  # also the generator's timer: its stages are charged to it
    backend = (SamSuperpixels(sam, PartitionConfig(), "cpu", clock, image_encoder=model.mask_head.sam.image_encoder)
               if model.projector.reads_superpixels else None)
    predictor = Predictor(model, backend, batch_size=args.batch_size)
    autocast = torch.autocast("cpu", DTYPES[args.dtype]) if args.dtype != "fp32" else nullcontext()

    def new_images(count: int) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast:
                with clock.stage("decode"):
                    decoded = [decode_image(data).rgb for data in images[:count]]
                prepared = predictor.prepare(decoded)
                predictor.masks([(image, TEXT) for image in prepared])
        return run

    with torch.no_grad(), autocast:
        stored = predictor.prepare([decode_image(data).rgb for data in images[:args.batch_size]])

    def precomputed(count: int) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast:
                predictor.masks([(image, TEXT) for image in stored[:count]])
        return run

    measured = {}
    for mode, make in (("new", new_images), ("precomputed", precomputed)):
        for count in (1, args.batch_size):
            seconds = median_parts(make(count), clock, args.repeats)
            measured[f"{mode}_{count}"] = {stage: seconds.get(stage, 0.0) / count for stage in (*STAGES, "total")}
    clock.close()
    tokens = predictor.masks([(stored[0], TEXT)])[0][1]
    return {"projector": kind, "visual_tokens": tokens, "seconds_per_image": measured}


def measure_child(args: argparse.Namespace) -> dict:
    """What the child process of ``--measure STACK:PROJECTOR`` prints."""
    stack, kind = args.measure.split(":")
    return measure(stack, kind, args, sample_images(args.work, args.batch_size))


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Each (stack, projector) in a process of its own, so that one model's memory never holds another's."""
    args.work.mkdir(parents=True, exist_ok=True)
    sample_images(args.work, args.batch_size)
    rows = {stack: {kind: measure_in_child("bench.inference", argv, f"{stack}:{kind}") for kind in PROJECTORS}
            for stack in args.stacks}
    for stack_rows in rows.values():
        if "mlp" in stack_rows and "svp" in stack_rows:
            mlp, svp = stack_rows["mlp"]["seconds_per_image"], stack_rows["svp"]["seconds_per_image"]
            stack_rows["svp_over_mlp"] = {mode: svp[mode]["total"] / mlp[mode]["total"] for mode in svp}
    return {"stacks": rows, "batch_size": args.batch_size, "repeats": args.repeats, "dtype": args.dtype,
            "points_per_side": args.points_per_side, "point_grid": args.point_grid,
            "sam_dtype": str(compute_dtype("cpu")).removeprefix("torch."), "device": describe_device("cpu"),
            "date": time.strftime("%Y-%m-%d")}


def format_table(results: dict) -> str:
    lines = [f"seconds per new image by stage, {results['dtype']} (SAM {results['sam_dtype']}), batch "
             f"{results['batch_size']}, SAM {results['points_per_side']}² points ({results['point_grid']}), "
             f"{results['device']}"]
    header = f"{'stack':<9}{'projector':<10}{'mode':<14}" + "".join(f"{s[:9]:>10}" for s in (*STAGES, "total"))
    lines.append(header + f"{'x mlp':>7}")
    for stack, rows in results["stacks"].items():
        for kind in PROJECTORS:
            for mode, seconds in rows[kind]["seconds_per_image"].items():
                ratio = rows.get("svp_over_mlp", {}).get(mode) if kind == "svp" else None
                lines.append(f"{stack:<9}{kind:<10}{mode:<14}" + "".join(f"{seconds[s]:>10.3f}" for s in
                                                                       (*STAGES, "total"))
                             + (f"{ratio:>7.2f}" if ratio is not None else ""))
    return "\n".join(lines)


def build_parser() -> OptionsParser:
    parser = OptionsParser(prog="python -m bench.inference", description=__doc__.split("\n")[0])
    parser.add_options(*OPTIONS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict | None:
    return measured_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
