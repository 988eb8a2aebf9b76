"""Real-size models on this machine, projector by projector: ``python -m bench.realsize``.

The stack a user starts from, at its real sizes with random weights (``bench.hub_models``, saved
and loaded as hub directories): a Qwen2.5-0.5B-shaped LLM (bf16, as shipped), DINOv2-base and SAM
ViT-B, whose embeddings the precompute job stores in the shards (so no step runs SAM's encoder, as
in a real run), beside DINOv2's patch features. For ``mlp``, ``pool`` (at svp's mean token budget)
and ``svp``, each in a process of its own so that its peak memory is its own: parameters trained and
frozen; the median train step (forward, backward, AdamW) at each ``--batch-sizes``, in fp32 and
under bf16 autocast, on the stored vision features and with the vision encoder run, split into
its parts (vision encoder, projector, LLM body, LM head, mask head, backward, optimizer: forward
hooks and timed blocks, ``bench.common.PartClock``); the inference latency of one sample; the
bytes of a training checkpoint as ``svp train`` writes it, with each of its ``--optimizer``s; and
the peak RSS of the steps. Steps and latency also as ratios to ``mlp``.

Not a part of ``python -m bench`` (it takes ~3 GB per model and minutes of building); results go to
``RESULTS/realsize.json``."""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import hub_models
from bench.common import (
    DTYPES,
    OutputOptions,
    PartClock,
    describe_device,
    measure_in_child,
    measured_main,
    median_parts,
    model_parts,
    save_random_sam,
)
from bench.tokens import pool_budget
from bench.train_step import Timer, first_batch, format_prefix_sharing, prefix_sharing
from jobs.options import OptionsParser
from pipeline.shards import read_manifest
from trainer.data import DataConfig
from trainer.model import PROJECTORS, ModelConfig, ProjectorConfig, SegmentationMLLM
from trainer.optimizers import OPTIMIZERS, optimizer_class
from trainer.stored_features import data_config as stored_data_config

NAME = "realsize"
LLMS = {"qwen2.5-0.5b": hub_models.save_qwen2, "llama-3.2-1b": hub_models.save_llama}
VISIONS = {"dinov2-base": hub_models.save_dinov2, "clip-vit-l-14-336": hub_models.save_clip,
           "siglip-base-16-224": hub_models.save_siglip}


@dataclass(frozen=True)
class RealsizeOptions:
    """The real-size stack and how it is measured."""

    work: Path = field(default=Path("/tmp/svp-bench-realsize"), metadata={"help": (
        "where the hub directories, data and shards go (kept: a rerun reuses them)")})
    llm: str = field(default="qwen2.5-0.5b", metadata={"choices": tuple(sorted(LLMS)), "help": "LLM architecture"})
    vision: str = field(default="dinov2-base", metadata={"choices": tuple(sorted(VISIONS)), "help": (
        "vision encoder architecture")})
    projectors: str = field(default=",".join(PROJECTORS), metadata={"help": "projectors to measure, comma-separated"})
    batch_sizes: tuple[int, ...] = field(default=(2, 8), metadata={"help": "samples per train step, comma-separated"})
    dtypes: tuple[str, ...] = field(default=("fp32", "bf16"), metadata={"help": (
        "comma-separated: fp32, and/or bf16 (steps and latency under bf16 autocast)")})
    repeats: int = field(default=2, metadata={"help": "timed steps after a warm-up one (the median is kept)"})
    vision_features: tuple[str, ...] = field(default=("stored", "encoded"), metadata={"help": (
        "comma-separated: stored (steps read the shards' vision.npy: the vision encoder never runs) and/or encoded "
        "(the encoder runs at every step)")})
    images: int = field(default=24, metadata={"help": (
        "synthetic images precomputed (the train split must hold the largest batch)")})
    measure: str | None = field(default=None, metadata={"choices": PROJECTORS, "metavar": "PROJECTOR", "help": (
        "measure this projector alone, in this process, and print its row as JSON (what each projector's child "
        "process of a run does, so that the peak RSS is its own); writes no results")})


OPTIONS = (RealsizeOptions, OutputOptions)
# A step's parts, in the order they run; "other" is the rest of the step (splicing, the losses, ...).
STEP_PARTS = ("vision", "projector", "llm_body", "lm_head", "mask_head", "backward", "optimizer", "other")
VISION_FEATURES = ("stored", "encoded")


def build_parser() -> OptionsParser:
    """``python -m bench.realsize``'s flags, from :data:`OPTIONS` (tests/test_options.py walks them with every
    other command's)."""
    parser = OptionsParser(prog="python -m bench.realsize", description=__doc__.split("\n")[0])
    parser.add_options(*OPTIONS)
    return parser


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """Hub directories, the ViT-B checkpoint and shards with its embeddings and the vision encoder's
    features (each made once)."""
    from jobs.precompute import main as precompute
    from pipeline.synth import synthesize

    unknown = set(args.vision_features) - set(VISION_FEATURES)
    if unknown:
        raise SystemExit(f"bench.realsize: --vision-features takes {', '.join(VISION_FEATURES)}, not "
                         f"{', '.join(sorted(unknown))}")
    work = args.work
    paths = {"llm": work / args.llm, "vision": work / args.vision, "sam": work / "sam_vit_b.pth",
             "refer": work / f"refer-{args.images}", "shards": work / f"shards-{args.images}-{args.vision}"}
    for key, builders, name in (("llm", LLMS, args.llm), ("vision", VISIONS, args.vision)):
        if not (paths[key] / "config.json").is_file():
            builders[name](paths[key])
    save_random_sam(paths["sam"], "vit_b")
    if not (paths["refer"] / "refcoco").is_dir():
        synthesize(paths["refer"], images=args.images, seed=0)
    if not (paths["shards"] / "manifest.json").is_file():
        code = precompute(["--refer-root", str(paths["refer"]), "--dataset", "refcoco", "--split-by", "unc",
                           "--out", str(paths["shards"]), "--backend", "felzenszwalb", "--shard-size", "4",
                           "--store-sam-embeddings", "--sam-checkpoint", str(paths["sam"]), "--sam-model", "vit_b",
                           "--store-vision-features", "--vision", str(paths["vision"])])
        if code != 0:
            raise SystemExit(f"bench.realsize: the precompute job failed ({code})")
    return paths


def measure(kind: str, args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    """One projector on the real-size stack (run in a fresh process: RSS is this model's)."""
    started = time.perf_counter()
    config = ModelConfig(llm=str(paths["llm"]), vision=str(paths["vision"]), sam_checkpoint=str(paths["sam"]),
                         sam_model="vit_b",
                         projector=ProjectorConfig(kind=kind, pool_tokens=pool_budget(paths["shards"])))
    model = SegmentationMLLM(config)
    built_s = time.perf_counter() - started
    configs = {"encoded": DataConfig(**model.data_config_fields(), use_sam_embeddings=True),
               "stored": stored_data_config(model, read_manifest(str(paths["shards"])))}
    if configs["stored"].vision_features_shape is None:
        raise SystemExit(f"bench.realsize: {paths['shards']} holds no vision features of {paths['vision']}")
    batches = {(features, size): first_batch(paths["shards"], configs[features], size)
               for features in args.vision_features for size in args.batch_sizes}
    one = first_batch(paths["shards"], configs["encoded"], min(args.batch_sizes))  # a new image: encoded
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trained
    tokens = float(model.predict_masks(one)[1].float().mean())
    clock = PartClock(model_parts(model))
    steps, latency, prefix = {}, {}, {}
    for dtype in args.dtypes:
        timer = Timer(torch.device("cpu"), DTYPES[dtype], args.repeats)
        for (features, size), batch in batches.items():
            measured = median_parts(train_step(model, batch, timer, clock), clock, args.repeats)
            steps[f"batch{size}_{dtype}_{features}"] = {part: measured.get(part, 0.0)
                                                        for part in (*STEP_PARTS, "total")}
        latency[dtype] = timer.latency(model, one)
        if kind == "svp":  # the rule of SegmentationMLLM.min_shared_positions, at this size: the largest batch
            prefix[dtype] = prefix_sharing(model, batches[(args.vision_features[0], max(args.batch_sizes))], timer)
    clock.close()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the checkpoint's own memory
    return {"projector": kind, "visual_tokens_mean": tokens, "parameters_trained": trained,
            "parameters_frozen": frozen, "build_s": built_s, "steps": steps, "latency_s": latency,
            "peak_rss_gib": peak_rss, "checkpoint_bytes": checkpoint_bytes(model, one, args.work),
            **({"prefix_sharing": prefix} if prefix else {})}


def train_step(model: SegmentationMLLM, batch: dict, timer: Timer, clock: PartClock) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of ``model`` on ``batch``, its backward and
    optimizer charged to ``clock`` (the forward's parts are by the clock's hooks)."""
    optimizer = optimizer_class("adamw")([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        with timer.autocast():
            loss = model(batch).loss
        with clock.stage("backward"):
            loss.backward()
        with clock.stage("optimizer"):
            optimizer.step()
            optimizer.zero_grad()

    return step


def checkpoint_bytes(model: SegmentationMLLM, batch: dict, work: Path) -> dict[str, int]:
    """The bytes of a training checkpoint of ``model`` after one step with each optimizer of ``svp train
    --optimizer``, written as ``svp train`` writes it (``trainer.checkpoint``: the trained tensors,
    optimizer, schedule and RNG states)."""
    from accelerate import Accelerator

    from trainer.checkpoint import save_checkpoint, save_trained_weights_only

    sizes = {}
    for name in OPTIMIZERS:
        accelerator = Accelerator(cpu=True)  # a fresh one: save_state writes every optimizer it prepared
        optimizer = optimizer_class(name)([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        save_trained_weights_only(accelerator)
        accelerator.backward(prepared(batch).loss)
        optimizer.step()
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            checkpoint = Path(scratch) / "step_000001"
            save_checkpoint(accelerator, checkpoint)
            sizes[name] = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    return sizes


def measure_child(args: argparse.Namespace) -> dict:
    """What the child process of ``--measure PROJECTOR`` prints."""
    return measure(args.measure, args, prepare(args))


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    prepare(args)  # once, before the children that each read it
    rows = {kind: measure_in_child("bench.realsize", argv, kind) for kind in args.projectors.split(",") if kind}
    if "mlp" in rows:
        for row in rows.values():
            row["step_ratio_to_mlp"] = {key: step["total"] / rows["mlp"]["steps"][key]["total"]
                                        for key, step in row["steps"].items()}
            row["latency_ratio_to_mlp"] = {key: value / rows["mlp"]["latency_s"][key]
                                           for key, value in row["latency_s"].items()}
            row["peak_rss_ratio_to_mlp"] = row["peak_rss_gib"] / rows["mlp"]["peak_rss_gib"]
    return {"llm": args.llm, "vision": args.vision, "sam": "vit_b", "batch_sizes": list(args.batch_sizes),
            "dtypes": list(args.dtypes), "vision_features": list(args.vision_features), "repeats": args.repeats,
            "device": describe_device("cpu"),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "projectors": rows}


def format_table(results: dict) -> str:
    lines = [f"real size: {results['llm']} + {results['vision']} + SAM {results['sam']} (SAM embeddings stored; "
             "vision features stored, or encoded at each step), "
             f"{results['device']}",
             f"{'projector':<10}{'tokens':>8}{'trained':>14}{'frozen':>15}{'peak RSS':>10}{'x mlp':>7}"
             + "".join(f"{'checkpoint ' + name:>21}" for name in OPTIMIZERS)]
    for kind, row in results["projectors"].items():
        lines.append(f"{kind:<10}{row['visual_tokens_mean']:>8.1f}{row['parameters_trained']:>14,}"
                     f"{row['parameters_frozen']:>15,}{row['peak_rss_gib']:>7.2f}GiB"
                     f"{row.get('peak_rss_ratio_to_mlp', float('nan')):>7.2f}"
                     + "".join(f"{row['checkpoint_bytes'][name] / 1e6:>18.1f} MB" for name in OPTIMIZERS))
    lines += ["", "train step, seconds: total and its parts",
              f"{'projector':<10}{'step':<22}{'total':>8}{'x mlp':>7}" + "".join(f"{p[:9]:>10}" for p in STEP_PARTS)]
    for kind, row in results["projectors"].items():
        for key, step in row["steps"].items():
            lines.append(f"{kind:<10}{key:<22}{step['total']:>8.2f}"
                         f"{row.get('step_ratio_to_mlp', {}).get(key, float('nan')):>7.2f}"
                         + "".join(f"{step[part]:>10.3f}" for part in STEP_PARTS))
    for kind, row in results["projectors"].items():
        for dtype, sharing in row.get("prefix_sharing", {}).items():
            lines.append(f"{kind} step, batch {max(results['batch_sizes'])}, {dtype}: {format_prefix_sharing(sharing)}")
    lines += ["", "latency of one sample, seconds: " + ", ".join(
        f"{kind} " + " / ".join(f"{dtype} {value:.2f}" for dtype, value in row["latency_s"].items())
        for kind, row in results["projectors"].items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict | None:
    return measured_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
