"""Accuracy at an equal training budget, per projector and along the ablation ladder: ``python -m bench.accuracy``.

Every configuration trains with the same steps, batch, learning rate and seeds on the shared
synthetic dataset (``trainer.loop.train`` through ``jobs.workflow``, tiny random-initialised models,
felzenszwalb superpixels) and is evaluated by ``svp eval``'s code on val, testA and testB:

- ``mlp`` (one token per patch) and ``pool`` at svp's mean token budget (``bench.tokens.pool_budget``);
- the ladder: ``svp-pool`` (superpixel pooling only: ``--no-sspe --no-ssa``), ``svp+sspe``,
  ``svp+ssa``, and ``svp`` (both: the full projector).

Each figure is reported over ``--seeds`` seeds (model initialisation and data order; the dataset
is the same), ``--headline-seeds`` for ``mlp`` and ``svp``, as mean, std, min, max and each seed's
value. Seed ``s`` of every configuration sees the same batches in the same order, so each
configuration's cIoU is also compared with ``mlp``'s seed by seed (``ciou_minus_mlp``): the spread
of those paired differences, not the two configurations' spreads, says whether a gap of a point
is more than the seeds' noise. With tiny random models and a CPU budget these numbers show how
the projectors compare when they learn from scratch, not what they reach with DINOv2 and a
pretrained LLM.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.common import Workspace, run_alone, spread
from bench.options import option_of
from bench.tokens import pool_budget
from jobs.eval import run_eval
from jobs.workflow import tiny_model, train_config, train_on_shards
from trainer.config import TrainConfig
from trainer.model import ProjectorConfig

NAME = "accuracy"
SPLITS = ("val", "testA", "testB")
LADDER = ("mlp", "pool", "svp-pool", "svp+sspe", "svp+ssa", "svp")
HEADLINE = ("mlp", "svp")  # the pair of the "svp within a point of mlp" target: trained with --headline-seeds
HEADLINE_CONFIGS = ("mlp", "pool", "svp")  # the configurations whose cIoU are headline keys: the cpu preset's
STEPS = 200  # the cpu preset's: 7 runs in ~8 min on 2 cores, leaving the other parts the rest of ~15
SELECTS_AFTER_STEPS = 500  # the demo's head starts to pick the referred object after about as many steps (README)
PRESETS: dict[str, dict] = {
    "cpu": {},
    "full": {"steps": 1000, "seeds": 2, "headline_seeds": 5, "configs": ",".join(LADDER)},
    "quick": {"steps": 2, "seeds": 1, "headline_seeds": 1, "batch_size": 2, "configs": ",".join(LADDER)},
    "gpu": {"steps": 1500, "seeds": 3, "headline_seeds": 5, "batch_size": 16, "configs": ",".join(LADDER)},
}


@dataclass(frozen=True)
class AccuracyOptions:
    """accuracy: cIoU/gIoU at an equal training budget (every run trains as ``svp train`` would)."""

    steps: int = field(default=STEPS, metadata={"help": (
        f"training steps of every run (the full preset: 1000; the demo's head starts to pick the referred object "
        f"after ~{SELECTS_AFTER_STEPS}, and the notes say so below that; a run of 1000 and its evaluation take "
        "~4.3 min on 2 cores)")})
    seeds: int = field(default=1, metadata={"help": (
        "runs per configuration, seeds 0..N-1 (the full preset: 2; one seed cannot rank the ladder's rungs, and the "
        "results' notes say so)")})
    headline_seeds: int = field(default=3, metadata={"help": (
        "runs of mlp and svp (at least --seeds): their difference is the headline, a point or so, and one seed "
        "moves svp's cIoU by two or three, so 2 seeds cannot tell its sign (BENCHMARKS.md); the full preset: 5")})
    batch_size: int = option_of(TrainConfig, "batch_size", 8)
    lr: float = option_of(TrainConfig, "lr", 1e-3)  # the demo's
    configs: str = field(default=",".join(HEADLINE_CONFIGS), metadata={"help": (
        f"configurations to train, comma-separated, from {','.join(LADDER)} (the default: those of the headline; "
        "the full, quick and gpu presets: all)")})


OPTIONS = (AccuracyOptions,)


def projector(name: str, pool_tokens: int) -> ProjectorConfig:
    """The projector of a configuration of ``LADDER``."""
    if name in ("mlp", "pool"):
        return ProjectorConfig(kind=name, pool_tokens=pool_tokens)
    parts = {"svp-pool": (False, False), "svp+sspe": (True, False), "svp+ssa": (False, True), "svp": (True, True)}
    if name not in parts:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(LADDER)}")
    sspe, ssa = parts[name]
    return ProjectorConfig(kind="svp", sspe=sspe, ssa=ssa)


def seeds_per_config(args: argparse.Namespace, names: Sequence[str]) -> dict[str, int]:
    """How many seeds each configuration trains: ``--headline-seeds`` (at least ``--seeds``) for the
    headline pair, whose gap is the smallest difference the bench has to resolve; ``--seeds`` for the rest."""
    return {name: max(args.seeds, args.headline_seeds) if name in HEADLINE else args.seeds for name in names}


def train_and_evaluate(args: argparse.Namespace, workspace: Workspace, name: str, seed: int) -> dict:
    """One run: train configuration ``name`` with ``seed``, then {split: metrics}."""
    shards = workspace.shards()
    run_dir = workspace.root / "accuracy" / name / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun in the same --work starts over
    model = tiny_model(workspace.sam_checkpoint, seed=seed, projector=projector(name, pool_budget(shards)))
    train_on_shards(train_config(shards, run_dir, model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 seed=seed, mixed_precision="bf16" if args.dtype == "bf16" else "no"))
    return run_eval(run_dir, str(shards), list(SPLITS))[0]["splits"]


def summarise(runs: list[dict], mlp_runs: list[dict] | None) -> dict:
    """Per split: cIoU and gIoU over seeds (mean, std, min, max, per seed), tokens, the
    all-foreground floor; with ``mlp_runs`` (seeds 0.. as ``runs``, or more), cIoU minus mlp's,
    seed by seed."""
    summary = {}
    for split in SPLITS:
        ciou, giou = ([run[split][metric] for run in runs] for metric in ("ciou", "giou"))
        summary[split] = {
            "ciou": {**spread(ciou), "seeds": ciou},
            "giou": {**spread(giou), "seeds": giou},
            "tokens_mean": runs[0][split]["tokens_mean"],
            "all_foreground_ciou": runs[0][split]["all_foreground_ciou"],
            "samples": runs[0][split]["samples"],
        }
        if mlp_runs is not None:
            paired = zip(ciou, mlp_runs[: len(ciou)], strict=True)  # mlp may have run more seeds
            summary[split]["ciou_minus_mlp"] = spread([c - mlp[split]["ciou"] for c, mlp in paired])
    return summary


def run(args: argparse.Namespace, workspace: Workspace) -> dict:
    names = [name for name in args.configs.split(",") if name]
    for name in names:
        projector(name, 1)  # an unknown name fails before any training
    seeds = seeds_per_config(args, names)
    runs = {name: [train_and_evaluate(args, workspace, name, seed) for seed in range(seeds[name])] for name in names}
    configs = {name: summarise(results, runs.get("mlp") if name != "mlp" else None) for name, results in runs.items()}
    headline = {f"ciou_{name}": configs[name]["val"]["ciou"]["mean"] if name in configs else None
                for name in ("svp", "mlp", "pool")}
    if "svp" in configs and "mlp" in configs:  # the "within a point of mlp" target, with its seed noise
        paired = configs["svp"]["val"]["ciou_minus_mlp"]
        headline.update(ciou_svp_minus_mlp=paired["mean"], ciou_svp_minus_mlp_std=paired["std"])
    return {"steps": args.steps, "seeds": seeds, "batch_size": args.batch_size, "lr": args.lr, "dtype": args.dtype,
            "pool_tokens": pool_budget(workspace.shards()), "configs": configs, "headline": headline,
            "notes": budget_notes(seeds, args.steps)}


def budget_notes(seeds: dict[str, int], steps: int) -> list[str]:
    """The seeds and steps behind each configuration's figures; where a configuration ran one seed,
    that it cannot be ranked (noise between single runs is as large as the gaps between rungs); and
    below ~500 steps, that the figures are of a head that does not select the referred object yet."""
    by_count: dict[int, list[str]] = {}
    for name, count in seeds.items():
        by_count.setdefault(count, []).append(name)
    notes = ["; ".join(f"{', '.join(names)}: {count} seed{'s' if count > 1 else ''} × {steps} steps"
                       for count, names in sorted(by_count.items(), reverse=True))]
    if 1 in by_count:
        notes.append(f"{', '.join(by_count[1])}: one seed, which cannot rank a configuration: two runs of one "
                     "configuration differ by 2-3 points of cIoU, as much as configurations do (BENCHMARKS.md)")
    if steps < SELECTS_AFTER_STEPS:
        notes.append(f"{steps} steps, before the ~{SELECTS_AFTER_STEPS} after which the head starts to select the "
                     "referred object: these cIoU say how far each projector gets early in training, above the "
                     "all-foreground floor, not where it ends (the full preset's 1000 steps)")
    return notes


def format_table(results: dict) -> str:
    lines = [f"cIoU / gIoU after {results['steps']} steps (batch {results['batch_size']}, lr {results['lr']:g}), "
             f"over seeds: mean ± std [min, max]; pool asked for {results['pool_tokens']} tokens",
             f"{'config':<10}{'seeds':>6}{'tokens':>7}" + "".join(f"{split + ' cIoU':>26}" for split in SPLITS)
             + f"{'val gIoU':>16}{'val cIoU - mlp':>18}"]
    for name, splits in results["configs"].items():
        cells = [f"{s['ciou']['mean']:.3f}±{s['ciou']['std']:.3f} [{s['ciou']['min']:.3f},{s['ciou']['max']:.3f}]"
                 for s in splits.values()]
        val = splits["val"]
        paired = val.get("ciou_minus_mlp")
        lines.append(f"{name:<10}{results['seeds'][name]:>6}{val['tokens_mean']:>7.1f}"
                     + "".join(f"{cell:>26}" for cell in cells)
                     + f"{val['giou']['mean']:>9.3f}±{val['giou']['std']:.3f}"
                     + (f"{paired['mean']:>+11.3f}±{paired['std']:.3f}" if paired else f"{'':>18}"))
    lines.append("val cIoU - mlp: the paired difference, seed by seed (the same batches), over the seeds both ran: "
                 "mean ± std")
    floor = "  ".join(f"{split} {s['all_foreground_ciou']:.3f}"
                      for split, s in next(iter(results["configs"].values())).items())
    lines.append(f"all-foreground cIoU (the floor): {floor}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_alone(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
