"""The ablation ladder on probe data, each part on the probe it is for: ``python -m bench.ablation``.

``bench.accuracy`` ranks the projectors on the plain synthetic data, where colour and shape single
out almost every object: a flat-coloured superpixel's mean keeps all it holds, and place rarely
matters, so SSPE and SSA have nothing to add there. Here every rung of the ladder

    pool → svp-pool (superpixel pooling only: ``--no-sspe --no-ssa``) → svp+sspe → svp+ssa → svp (both), and mlp

trains on three datasets made by ``svp synth``: the plain one and the two probes (``--probe place``:
twins told apart only by place or size; ``--probe inside``: twins told apart only by stripes of the
same mean colour, or by what is next to them). The svp rungs give the LLM their tokens in shuffled
order (``--shuffle-tokens``): label order follows the raster and would tell the LLM where each token
lies without SSPE, and the place probe would measure that order instead of SSPE.

Each (rung, dataset) trains ``--seeds`` times, seed ``s`` of every rung on the same data, the same
batches in the same order and the same initialisation of the shared parts, by ``trainer.loop``
through ``jobs.workflow`` as ``svp train`` would, and is evaluated by ``svp eval``'s code on the
held-out splits (val, testA, testB: their mean). Beside cIoU each run reports the referred share
(``svp eval``'s ``referred_share``): of its predicted pixels on the image's objects, the share on
the one meant. A rung whose share is 0.5 marks both twins, so it has not learned the probe at all,
whatever its cIoU. Each part's effect is the paired difference on its own probe, seed by seed, with
a 95% t-interval over the seeds:

- ``sspe``: svp+sspe minus svp-pool on the place probe;
- ``ssa``: svp (both) minus svp+sspe on the inside probe.

Trainings run ``--jobs`` at a time, side by side, with one torch thread each. A sweep started
again with the same ``--work`` keeps every run that finished with the same settings
(``train_and_evaluate``). Writes ``RESULTS/ablation.json`` and ``RESULTS/ablation.png`` (cIoU per
rung and dataset, with each seed's value).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.accuracy import LADDER, projector
from bench.common import Workspace, run_alone, spread
from bench.options import option_of
from bench.tokens import pool_budget
from jobs.workflow import SyntheticData, synthetic_data, tiny_model, train_config, train_on_shards
from pipeline.plotting import pyplot, save_figure
from pipeline.synth import PROBES
from trainer.config import TrainConfig
from trainer.model import ProjectorConfig

NAME = "ablation"
DATASETS = ("plain", *PROBES)
SPLITS = ("val", "testA", "testB")  # the held-out splits; a run's figure is their mean
REFERRED = "referred_share"  # svp eval's share of the predicted object pixels on the one meant: the twin picked
# Each part: (the rung with it, the rung below without it, the probe it is for).
PARTS = {"sspe": ("svp+sspe", "svp-pool", "place"), "ssa": ("svp", "svp+sspe", "inside")}
# 1000, as bench.accuracy's full preset: the demo's head starts selecting the referred object after ~500, and at
# 600 the place probe's first seed still had svp+sspe 2 points below svp-pool.
STEPS = 1000
PRESETS: dict[str, dict] = {
    "cpu": {},
    "full": {"steps": 2500, "seeds": 3},  # the demo's recipe: several hours on 2 cores
    "quick": {"steps": 2, "seeds": 2, "batch_size": 2, "jobs": 1, "rungs": "svp-pool,svp+sspe,svp",
              "datasets": ",".join(PROBES)},
    "gpu": {"steps": 2500, "seeds": 5, "jobs": 1},
}


@dataclass(frozen=True)
class AblationOptions:
    """ablation: the ladder on the plain data and on the probes, paired seeds, each part's difference."""

    steps: int = field(default=STEPS, metadata={"help": (
        "training steps of every run (the demo's recipe: 2500, the full preset); every rung on every dataset is "
        "54 runs at 3 seeds: hours on 2 cores, where --rungs and --datasets pick the part that is needed")})
    seeds: int = field(default=3, metadata={"help": (
        "runs of every (rung, dataset), seeds 0..N-1; the paired differences' t-intervals need at least 2")})
    batch_size: int = option_of(TrainConfig, "batch_size", 8)
    lr: float = option_of(TrainConfig, "lr", 1e-3)  # the demo's
    rungs: str = field(default=",".join(LADDER), metadata={"help": (
        f"rungs to train, comma-separated, from {','.join(LADDER)}")})
    datasets: str = field(default=",".join(DATASETS), metadata={"help": (
        f"datasets to train on, comma-separated, from {','.join(DATASETS)} (plain: svp synth without --probe)")})
    jobs: int = field(default=2, metadata={"help": (
        "trainings side by side, each in a process of its own with one torch thread; 1: one after another, in "
        "this process, with torch's threads")})
    only_parts: bool = field(default=False, metadata={"help": (
        "train only each part's two rungs on its own probe (sspe: svp-pool and svp+sspe on place; ssa: svp+sspe "
        "and svp on inside), within --rungs and --datasets: the paired differences without the rest of the "
        "table, 12 runs at 3 seeds")})
    shuffle_tokens: bool = option_of(ProjectorConfig, "shuffle_tokens", True)


OPTIONS = (AblationOptions,)


@dataclass(frozen=True)
class Run:
    """One training and its evaluation: what a worker process needs, and nothing it would have to rebuild."""

    rung: str
    dataset: str
    seed: int
    data: SyntheticData
    run_dir: Path
    projector: ProjectorConfig
    steps: int
    batch_size: int
    lr: float
    mixed_precision: str
    images: int  # and data_seed: what the dataset was drawn with
    data_seed: int
    threads: int | None  # torch threads of a worker process; None: leave torch's default

    def identity(self) -> dict:
        """Everything that decides the run's figures (not where it runs, nor with how many threads)."""
        return {"rung": self.rung, "dataset": self.dataset, "seed": self.seed, "projector": asdict(self.projector),
                "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "mixed_precision": self.mixed_precision, "images": self.images, "data_seed": self.data_seed}


def train_and_evaluate(run: Run) -> dict[str, dict]:
    """Train ``run`` as ``svp train`` would, then {split: metrics} by ``svp eval``'s code.

    The metrics are kept in the run directory with the run's identity: a sweep stopped part way
    (an hour is long on a shared machine) and started again in the same ``--work`` takes each
    finished run of the same identity from there, and trains only the others."""
    import torch

    from jobs.eval import run_eval

    record = run.run_dir / "ablation_run.json"
    saved = json.loads(record.read_text()) if record.exists() else None
    trained = saved is not None and saved["run"] == run.identity()
    if trained and all(REFERRED in metrics for metrics in saved["splits"].values()):
        return saved["splits"]
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    if not trained:  # (a run evaluated before the referred share was counted is only evaluated again)
        shutil.rmtree(run.run_dir, ignore_errors=True)  # anything else there is another run's, or unfinished
        model = tiny_model(run.data.sam_checkpoint, seed=run.seed, projector=run.projector)
        train_on_shards(train_config(run.data.shards, run.run_dir, model, steps=run.steps,
                                     batch_size=run.batch_size, lr=run.lr, seed=run.seed,
                                     mixed_precision=run.mixed_precision))
    splits = run_eval(run.run_dir, str(run.data.shards), list(SPLITS))[0]["splits"]
    record.write_text(json.dumps({"run": run.identity(), "splits": splits}, indent=2) + "\n")
    return splits


def datasets(args: argparse.Namespace, workspace: Workspace, names: Sequence[str]) -> dict[str, SyntheticData]:
    """Each dataset, made once per workspace: the plain one is the workspace's own (``bench.common``),
    each probe ``svp synth --probe`` by the same chain."""
    return {name: workspace.data() if name == "plain" else
            synthetic_data(workspace.root / f"data-{name}", images=args.images, seed=args.seed,
                           sam_pretrain_steps=args.sam_pretrain_steps, probe=name)
            for name in names}


def runs(args: argparse.Namespace, workspace: Workspace, rungs: Sequence[str],
         data: dict[str, SyntheticData]) -> list[Run]:
    """Every (dataset, rung, seed) (with ``--only-parts``, those of the parts' pairs), seeds
    interleaved so that a partial sweep still pairs them."""
    mixed_precision = "bf16" if args.dtype == "bf16" else "no"
    threads = 1 if args.jobs > 1 else None
    pairs = {(probe, rung) for upper, lower, probe in PARTS.values() for rung in (upper, lower)}
    listed = []
    for dataset, paths in data.items():
        budget = pool_budget(paths.shards)  # pool at svp's mean token count on this dataset
        for seed in range(args.seeds):
            for rung in (r for r in rungs if not args.only_parts or (dataset, r) in pairs):
                config = projector(rung, budget)
                if config.kind == "svp":
                    config = replace(config, shuffle_tokens=args.shuffle_tokens)
                listed.append(Run(rung, dataset, seed, paths, workspace.root / NAME / dataset / rung / f"seed{seed}",
                                  config, args.steps, args.batch_size, args.lr, mixed_precision, args.images,
                                  args.seed, threads))
    return listed


def execute(listed: list[Run], jobs: int) -> list[dict[str, dict]]:
    """Each run's metrics, in order: ``jobs`` worker processes (spawned: no forked torch threads), or
    this process when 1."""
    if jobs <= 1:
        return [train_and_evaluate(run) for run in listed]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_and_evaluate, listed))


def held_out(splits: dict[str, dict], metric: str) -> float | None:
    """A run's figure: ``metric`` averaged over the held-out splits (each about a tenth of the images)
    that have it (the referred share is None on a split where no prediction touched an object)."""
    values = [splits[split][metric] for split in SPLITS if splits[split][metric] is not None]
    return statistics.fmean(values) if values else None


def t_interval(differences: Sequence[float]) -> dict[str, float]:
    """Mean and 95% t-interval of paired differences (``low`` = ``high`` = the mean for one pair)."""
    from scipy import stats  # scikit-image's dependency

    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "low": mean, "high": mean, "pairs": len(differences)}
    half = stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half, "pairs": len(differences)}


def summarise(listed: list[Run], metrics: list[dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """{dataset: {rung: cIoU and gIoU over the seeds (spread and each seed's value), tokens, the
    all-foreground floor}}."""
    by_config: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for run, splits in zip(listed, metrics, strict=True):
        by_config.setdefault((run.dataset, run.rung), []).append((run.seed, splits))
    summary: dict[str, dict[str, dict]] = {}
    for (dataset, rung), seeded in by_config.items():
        seeded.sort(key=lambda item: item[0])
        ciou = [held_out(splits, "ciou") for _, splits in seeded]
        giou = [held_out(splits, "giou") for _, splits in seeded]
        referred = [held_out(splits, REFERRED) for _, splits in seeded]  # None where no prediction touched an object
        known = [value for value in referred if value is not None]
        summary.setdefault(dataset, {})[rung] = {
            "ciou": {**spread(ciou), "seeds": ciou},
            "giou": {**spread(giou), "seeds": giou},
            REFERRED: {**spread(known), "seeds": referred} if known else None,
            "tokens_mean": held_out(seeded[0][1], "tokens_mean"),
            "all_foreground_ciou": held_out(seeded[0][1], "all_foreground_ciou"),
            "samples": sum(seeded[0][1][split]["samples"] for split in SPLITS),
        }
    return summary


def _share_seeds(rung: dict) -> list[float | None]:
    """A rung's referred share seed by seed (None where no prediction of that seed touched an object)."""
    share = rung[REFERRED]
    return share["seeds"] if share else [None] * len(rung["ciou"]["seeds"])


def paired_differences(probes: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Each part whose two rungs ran on its probe: the cIoU with it minus without it, seed by seed (and
    under ``referred_share`` the same for the referred share, over the seeds where both have one)."""
    paired = {}
    for part, (upper, lower, probe) in PARTS.items():
        rungs = probes.get(probe, {})
        if upper in rungs and lower in rungs:
            with_part, without = rungs[upper]["ciou"]["seeds"], rungs[lower]["ciou"]["seeds"]
            paired[part] = {**t_interval([a - b for a, b in zip(with_part, without, strict=True)]),
                            "rungs": [upper, lower], "probe": probe}
            shares = [(a, b) for a, b in zip(_share_seeds(rungs[upper]), _share_seeds(rungs[lower]), strict=True)
                      if a is not None and b is not None]
            if shares:  # the picking alone, in share units
                paired[part][REFERRED] = t_interval([a - b for a, b in shares])
    return paired


def run(args: argparse.Namespace, workspace: Workspace) -> dict:
    rungs = [name for name in args.rungs.split(",") if name]
    names = [name for name in args.datasets.split(",") if name]
    for flag, given, known in (("--rungs", rungs, LADDER), ("--datasets", names, DATASETS)):
        unknown = [name for name in given if name not in known]
        if unknown or not given:  # refused before any data is made
            print(f"python -m bench.{NAME}: error: {flag}: unknown {', '.join(unknown) or 'nothing given'}; choose "
                  f"from {', '.join(known)}", file=sys.stderr)
            raise SystemExit(2)
    if args.seeds < 1 or args.steps < 1 or args.jobs < 1:
        print(f"python -m bench.{NAME}: error: --seeds, --steps and --jobs must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    if args.only_parts:  # no data for a dataset none of whose rungs would train
        names = [name for name in names if name in {probe for _, _, probe in PARTS.values()}]
    listed = runs(args, workspace, rungs, datasets(args, workspace, names))
    probes = summarise(listed, execute(listed, args.jobs))
    paired = paired_differences(probes)
    results = {
        "steps": args.steps, "seeds": args.seeds, "batch_size": args.batch_size, "lr": args.lr, "dtype": args.dtype,
        "images": args.images, "jobs": args.jobs, "shuffle_tokens": args.shuffle_tokens, "only_parts": args.only_parts,
        "rungs": rungs,
        "datasets": names, "probes": probes, "paired_difference": paired,
        "headline": {f"ablation_{part}_ciou_gain": value["mean"] for part, value in paired.items()},
        "notes": notes(args),
    }
    results["figure"] = str(plot(results, args.results / f"{NAME}.png"))
    return results


def notes(args: argparse.Namespace) -> list[str]:
    """What the figures rest on, said next to them."""
    said = [f"{args.seeds} seed{'s' if args.seeds > 1 else ''} × {args.steps} steps per (rung, dataset); cIoU and "
            f"gIoU: the mean over {', '.join(SPLITS)}"]
    if args.steps < PRESETS["full"]["steps"]:
        said.append(f"{args.steps} steps, fewer than the demo's {PRESETS['full']['steps']} (the full preset): the "
                    "rungs are compared early in training, not where they end")
    if args.seeds < 2:
        said.append("one seed: the paired differences have no interval")
    if not args.shuffle_tokens:
        said.append("--no-shuffle-tokens: the svp rungs' token order follows the raster, a position code of its own")
    return said


def plot(results: dict, path: Path) -> Path:
    """cIoU per rung, a group of bars per dataset, each seed's value as a dot on its bar."""
    figure, axis = pyplot().subplots(figsize=(8, 4))
    names = list(results["probes"])  # the rungs trained somewhere (--only-parts trains a few): no empty bars
    rungs = [rung for rung in results["rungs"] if any(rung in results["probes"][name] for name in names)]
    width = 0.8 / len(rungs)
    for i, rung in enumerate(rungs):
        xs = [j + (i - (len(rungs) - 1) / 2) * width for j in range(len(names))]
        trained = [(x, results["probes"][name][rung]["ciou"]) for x, name in zip(xs, names, strict=True)
                   if rung in results["probes"][name]]
        axis.bar([x for x, _ in trained], [f["mean"] for _, f in trained], width, label=rung)
        for x, f in trained:
            axis.plot([x] * len(f["seeds"]), f["seeds"], "k.", markersize=3)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("cIoU (val, testA, testB: mean)")
    axis.set_title(f"ablation ladder: {results['seeds']} seeds × {results['steps']} steps")
    axis.legend(fontsize=7, ncols=3)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)


def format_table(results: dict) -> str:
    rungs = results["rungs"]
    lines = [f"cIoU per rung (mean over {results['seeds']} seeds; {results['steps']} steps, batch "
             f"{results['batch_size']}, lr {results['lr']:g})",
             f"{'dataset':<8}" + "".join(f"{rung:>10}" for rung in rungs) + f"{'floor':>8}"]
    for name, by_rung in results["probes"].items():
        lines.append(f"{name:<8}" + "".join(f"{by_rung[rung]['ciou']['mean']:>10.3f}" if rung in by_rung
                                            else f"{'-':>10}" for rung in rungs)
                     + f"{next(iter(by_rung.values()))['all_foreground_ciou']:>8.3f}")
    lines.append("referred share per rung (of the predicted pixels on the image's referred objects, the share on "
                 "the one meant)")
    for name, by_rung in results["probes"].items():
        lines.append(f"{name:<8}" + "".join(f"{by_rung[rung][REFERRED]['mean']:>10.3f}"
                                            if rung in by_rung and by_rung[rung][REFERRED] else f"{'-':>10}"
                                            for rung in rungs))
    for part, value in results["paired_difference"].items():
        upper, lower = value["rungs"]
        lines.append(f"{part}: {upper} - {lower} on the {value['probe']} probe: {100 * value['mean']:+.1f} cIoU "
                     f"points, 95% interval [{100 * value['low']:+.1f}, {100 * value['high']:+.1f}] over "
                     f"{value['pairs']} seeds")
        if REFERRED in value:
            share = value[REFERRED]
            lines.append(f"      referred share {share['mean']:+.3f}, 95% interval [{share['low']:+.3f}, "
                         f"{share['high']:+.3f}] over {share['pairs']} seeds")
    lines.append(f"figure: {results['figure']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_alone(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
