"""``svp eval`` / ``python -m jobs.eval``: cIoU, gIoU, visual tokens and speed of a trained run, per split.

Split names are printed exactly as the REFER files spell them (refcoco/refcoco+ unc: val, testA,
testB; refcocog umd: val, test), with the dataset and split-by they come from.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from jobs import entry, options
from pipeline.shards import ManifestError, read_manifest, split_shard_urls
from trainer.checkpoint import load_trained_model
from trainer.data import DataConfig
from trainer.evaluate import evaluate, format_table
from trainer.plots import eval_chart

SPLIT_ORDER = ("val", "test", "testA", "testB", "testC")


@dataclass(frozen=True)
class EvalOptions:
    """Which run to evaluate on which shards, and where the report goes."""

    run: Path = field(metadata={"help": "run directory of `svp train` (or its export/)"})
    shards: str = field(metadata={"help": "directory or URL prefix written by `svp precompute`"})
    splits: tuple[str, ...] | None = field(default=None, metadata={"help": (
        "comma-separated splits to evaluate; omitted: every split in the manifest except train")})
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass"})
    max_samples: int | None = field(default=None, metadata={"help": "stop each split after this many samples"})
    out: Path | None = field(default=None, metadata={"help": (
        "JSON report; omitted: RUN/eval.json. A bar chart of cIoU/gIoU per split goes beside it, named as the "
        "report with .png (RUN/eval.png)")})


OPTIONS = (EvalOptions,)
RECIPES = True


def default_splits(manifest: dict) -> list[str]:
    present = [s for s in manifest["samples_by_split"] if s != "train"]
    return sorted(present, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


def run_eval(run_dir: Path, shards: str, splits: list[str] | None, batch_size: int = EvalOptions.batch_size,
             max_samples: int | None = None) -> tuple[dict, str]:
    """Evaluate a run on the shards' splits; return (results, printable table)."""
    manifest = read_manifest(shards)
    splits = splits or default_splits(manifest)
    if not splits:  # else an empty report, and a chart of nothing
        raise ManifestError(f"{shards} holds no split but train to evaluate; name one with --splits")
    urls = {split: split_shard_urls(shards, manifest, split) for split in splits}
    model = load_trained_model(run_dir)
    data_config = DataConfig(**model.data_config_fields())
    results = evaluate(model, urls, data_config, batch_size=batch_size, max_samples=max_samples)
    source = manifest["config"]
    title = (f"{source['dataset']} ({source['split_by']}), projector {model.config.projector.kind}, "
             f"superpixels {source['backend']}")
    return {"source": {k: source[k] for k in ("dataset", "split_by", "backend")},
            "config_hash": manifest["config_hash"], "projector": model.config.projector.kind,
            "splits": results}, format_table(results, title)


def run(args: argparse.Namespace) -> int:
    given = options.build(EvalOptions, args)
    report, table = run_eval(given.run, given.shards, list(given.splits or ()), given.batch_size, given.max_samples)
    out = given.out or (given.run / "eval.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    chart = eval_chart(report, out.with_suffix(".png"))
    print(table)
    print(f"report: {out}\nchart:  {chart}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
