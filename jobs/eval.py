"""``svp eval`` / ``python -m jobs.eval``: cIoU, gIoU, visual tokens and speed of a trained run, per split.

Split names are printed exactly as the REFER files spell them (refcoco/refcoco+ unc: val, testA,
testB; refcocog umd: val, test), with the dataset and split-by they come from.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from jobs import entry, options
from pipeline.shards import ManifestError, read_manifest
from trainer.evaluate import evaluate, evaluation_splits, format_table, paper_csv, paper_markdown, paper_table
from trainer.export import load_exported_model
from trainer.plots import eval_chart
from trainer.stored_features import data_config as stored_data_config


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """Which runs to evaluate on which shards, and where the report goes."""

    run_dir: Path | None = field(default=None, metadata={"help": (
        "run directory of `svp train`, or an export (`svp export`, or a run's export/); give this or --run-dirs")})
    run_dirs: tuple[Path, ...] | None = field(default=None, metadata={"help": (
        "comma-separated run directories or exports, evaluated on the same splits and reported as one table, a "
        "row per run (e.g. the mlp, pool and svp runs); give this or --run-dir")})
    shards: str = field(metadata={"help": "directory or URL prefix written by `svp precompute`"})
    splits: tuple[str, ...] | None = field(default=None, metadata={"help": (
        "comma-separated splits to evaluate: as REFER spells them (val, testA) for an output of one dataset, as "
        "dataset/split (refcoco/val, refcocog/test) for one of several; omitted: every one but train, in the order "
        "the papers print them")})
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass"})
    max_samples: int | None = field(default=None, metadata={"help": (
        "stop each split after this many samples (per process under torchrun / accelerate launch)")})
    out: Path | None = field(default=None, metadata={"help": (
        "JSON report; omitted: RUN/eval.json for one --run-dir, ./eval.json for --run-dirs. The table goes beside it "
        "as .csv and .md, and a bar chart of cIoU/gIoU per split as .png (RUN/eval.csv, RUN/eval.md, RUN/eval.png)")})

    def evaluated(self) -> list[Path]:
        """The runs to evaluate: exactly one of --run-dir and --run-dirs names them."""
        if (self.run_dir is None) == (not self.run_dirs):
            raise options.OptionError("give either --run-dir RUN or --run-dirs RUN1,RUN2,... (not both)")
        return [self.run_dir] if self.run_dir is not None else list(self.run_dirs)


OPTIONS = (EvalOptions,)
RECIPES = True


def processes() -> PartialState:
    """This process among those ``torchrun``/``accelerate launch`` started (one, without a launcher).

    ``cpu=True`` where there is no GPU: that is what makes Accelerate join the launcher's processes
    over gloo (else each would see a world of one and evaluate every sample)."""
    return PartialState(cpu=not torch.cuda.is_available())


def run_eval(run_dir: Path, shards: str, splits: list[str] | None, batch_size: int = EvalOptions.batch_size,
             max_samples: int | None = None) -> tuple[dict, str]:
    """Evaluate a run on the shards' splits; return (results, printable table)."""
    manifest = read_manifest(shards)
    chosen = evaluation_splits(shards, manifest, splits or None)
    if not chosen:  # else an empty report, and a chart of nothing
        raise ManifestError(f"{shards} holds no split but train to evaluate; name one with --splits")
    model = load_exported_model(run_dir, device=processes().device)
    data_config = stored_data_config(model, manifest)
    results = evaluate(model, chosen, data_config, batch_size=batch_size, max_samples=max_samples)
    source = manifest["config"]
    title = (f"{run_dir}: {source['dataset']} ({source['split_by']}), projector {model.config.projector.kind}, "
             f"superpixels {source['backend']}")
    return {"run": str(run_dir), "source": {k: source[k] for k in ("dataset", "split_by", "backend")},
            "config_hash": manifest["config_hash"], "projector": model.config.projector.kind,
            "splits": results}, format_table(results, title)


def run(args: argparse.Namespace) -> int:
    given = options.build(EvalOptions, args)
    run_dirs = given.evaluated()
    state = processes()
    try:
        evaluated = [run_eval(run_dir, given.shards, list(given.splits or ()), given.batch_size, given.max_samples)
                     for run_dir in run_dirs]
        state.wait_for_everyone()
    finally:
        # A process that exits with its process group alive aborts in gloo's destructor
        # ("terminate called without an active exception"), failing the whole launch.
        state.destroy_process_group()
    if not state.is_main_process:  # every process evaluated its share; one reports
        return 0
    reports = [report for report, _ in evaluated]
    out = given.out or (run_dirs[0] / "eval.json" if given.run_dir is not None else Path("eval.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": reports}, indent=2) + "\n")
    out.with_suffix(".csv").write_text(paper_csv(reports))
    out.with_suffix(".md").write_text(paper_markdown(reports))
    chart = eval_chart(reports, out.with_suffix(".png"))
    print("\n\n".join(table for _, table in evaluated))
    print(f"\n{paper_table(reports)}")
    print(f"report: {out} (.csv, .md beside it)\nchart:  {chart}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
