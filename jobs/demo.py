"""``svp demo [--out DIR]``: the whole product on a laptop CPU, end to end, in minutes.

synthetic RefCOCO-format data → precompute (classical superpixels, local Ray) → train the ``svp``
projector on tiny random-initialised models → evaluate on val → overlays and a histogram of
visual tokens per image. ``DIR/report.json`` holds the headline numbers, including the cIoU of
predicting every pixel (the floor to beat) and the tokens the ``mlp`` projector would have used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from jobs import entry, options, workflow
from jobs.eval import run_eval
from pipeline.images import decode_image
from pipeline.shards import decode_label_map, read_manifest, split_shard_urls
from trainer.config import TrainConfig
from trainer.export import load_exported_model
from trainer.predict import predict_mask, render_overlay

DEMO_OUTPUTS = ("refer", "shards", "run_svp", "overlays")


@dataclass(frozen=True)
class DemoOptions:
    """Where the demo's outputs go, and the sizes of its data and training."""

    out: Path = field(default=Path("demo_out"), metadata={"help": "output directory"})
    images: int = field(default=800, metadata={"help": (
        "synthetic images (70% train; at 80, training memorises the train images; at 400 train-batch cIoU ran "
        "well ahead of val)")})
    sam_pretrain_steps: int = field(default=workflow.SAM_PRETRAIN_STEPS, metadata={"help": (
        "steps of the tiny SAM's promptable pretraining on the train images (the stand-in for SAM's released "
        "weights; 0: a random SAM)")})
    steps: int = field(default=2500, metadata={"help": "training steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (tiny models trained from scratch)"})
    batch_size: int = field(default=8, metadata={"help": "training batch size"})
    workers: int = field(default=2, metadata={"help": "Ray workers for the precompute job"})
    loader_workers: int = field(default=1, metadata={"help": (
        "DataLoader worker processes of the training loop (without one the step waits for decoding ~30% of the "
        "time; on 2 cores the worker competes with the step)")})
    seed: int = field(default=0, metadata={"help": "seed of the data and the model"})
    overlays: int = field(default=6, metadata={"help": "val overlays to render"})


OPTIONS = (DemoOptions,)


def train_config(given: DemoOptions, data: workflow.SyntheticData) -> TrainConfig:
    """What the demo trains on ``data``; with the default options, ``recipes/demo.yaml``."""
    model = workflow.tiny_model(data.sam_checkpoint, seed=given.seed)
    return workflow.train_config(data.shards, given.out / "run_svp", model, steps=given.steps,
                                 batch_size=given.batch_size, lr=given.lr, seed=given.seed,
                                 num_workers=given.loader_workers)


def run(args: argparse.Namespace) -> int:
    given = options.build(DemoOptions, args)
    out = given.out
    timings: dict[str, float] = {}
    for stale in DEMO_OUTPUTS:  # the demo starts afresh: its own outputs only, nothing else in DIR
        shutil.rmtree(out / stale, ignore_errors=True)

    start = time.perf_counter()
    try:
        data = workflow.synthetic_data(out, images=given.images, seed=given.seed,
                                       sam_pretrain_steps=given.sam_pretrain_steps, workers=given.workers)
        shards = data.shards
        timings["data_s"] = time.perf_counter() - start
        start = time.perf_counter()
        run_dir = workflow.train_on_shards(train_config(given, data))
    except workflow.StepFailed as error:
        raise SystemExit(f"svp demo: {error}") from error
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    results, table = run_eval(run_dir, str(shards), ["val"])
    timings["eval_s"] = time.perf_counter() - start
    val = results["splits"]["val"]
    report = {
        "projector": "svp",
        "ciou": val["ciou"], "giou": val["giou"], "all_foreground_ciou": val["all_foreground_ciou"],
        "tokens_mean": val["tokens_mean"], "tokens_median": val["tokens_median"], "tokens_max": val["tokens_max"],
        "tokens_mlp": _mlp_tokens(run_dir),
        "val_samples": val["samples"], "train_steps": given.steps, "seconds": timings,
    }
    report["tokens_ratio_svp_to_mlp"] = report["tokens_mean"] / report["tokens_mlp"]
    _overlays(run_dir, out, given.overlays)
    _histogram(shards, out / "tokens_histogram.png", report["tokens_mlp"])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"\ndemo: svp cIoU {report['ciou']:.3f} (all-foreground {report['all_foreground_ciou']:.3f}), "
          f"{report['tokens_mean']:.1f} visual tokens per image vs {report['tokens_mlp']} for mlp "
          f"({100 * report['tokens_ratio_svp_to_mlp']:.1f}%)")
    print(f"  data:       {out / 'refer'}\n  shards:     {out / 'shards'}\n  run:        {run_dir} "
          f"(tensorboard --logdir {run_dir})\n  overlays:   {out / 'overlays'}\n"
          f"  histogram:  {out / 'tokens_histogram.png'}\n  report:     {out / 'report.json'}")
    return 0


def _mlp_tokens(run_dir: Path) -> int:
    """Tokens the mlp projector gives the LLM per image with the same vision encoder: one per patch."""
    model = load_exported_model(run_dir)
    return model.num_patches()


def _overlays(run_dir: Path, out: Path, count: int) -> None:
    """Predictions on the first val refs, with the expression written on them."""
    model = load_exported_model(run_dir)
    manifest = read_manifest(out / "shards")
    samples = wds.WebDataset(split_shard_urls(out / "shards", manifest, "val"), shardshuffle=False)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for sample in itertools.islice(samples, count):
        rgb = decode_image(sample["jpg"]).rgb
        labels = decode_label_map(sample["spx.png"])
        sentence = json.loads(sample["refs.json"])[0]["sentences"][0]["sent"]
        mask, _ = predict_mask(model, rgb, labels, sentence)
        render_overlay(rgb, mask, sentence).save(out / "overlays" / f"{sample['__key__']}.png")


def _histogram(shards: Path, path: Path, mlp_tokens: int) -> None:
    import pyarrow.parquet as pq

    tokens = [n for n in pq.read_table(shards / "index.parquet").column("num_superpixels").to_pylist() if n is not None]
    workflow.tokens_histogram(path, {"svp = superpixels": tokens},
                              f"svp: mean {sum(tokens) / len(tokens):.1f} tokens per image; mlp: {mlp_tokens}")


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
