"""``svp demo [--out DIR]``: the whole product on a laptop CPU, end to end, in minutes.

synthetic RefCOCO-format data → precompute (classical superpixels, local Ray) → train the ``svp``
projector on tiny random-initialised models → evaluate on val → overlays and a histogram of
visual tokens per image. ``DIR/report.json`` holds the headline numbers, including the cIoU of
predicting every pixel (the floor to beat) and the tokens the ``mlp`` projector would have used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import webdataset as wds

from jobs import entry, workflow
from jobs.eval import run_eval
from pipeline.images import decode_image
from pipeline.shards import decode_label_map, read_manifest, split_shard_urls
from trainer.checkpoint import load_trained_model
from trainer.predict import predict_mask, render_overlay

DEMO_OUTPUTS = ("refer", "shards", "run_svp", "overlays")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory; default demo_out/")
    parser.add_argument("--images", type=int, default=800,
                        help="synthetic images (70%% train); default 800 (at 80, training memorises the train images; "
                             "at 400 train-batch cIoU ran well ahead of val)")
    parser.add_argument("--sam-pretrain-steps", type=int, default=workflow.SAM_PRETRAIN_STEPS,
                        help="steps of the tiny SAM's promptable pretraining on the train images (the stand-in "
                             f"for SAM's released weights; 0: a random SAM); default {workflow.SAM_PRETRAIN_STEPS}")
    parser.add_argument("--steps", type=int, default=2500, help="training steps; default 2500")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate; default 1e-3 (tiny models trained from scratch)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size; default 8")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers for the precompute job; default 2")
    parser.add_argument("--loader-workers", type=int, default=1,
                        help="DataLoader worker processes of the training loop; default 1 (without one the step "
                             "waits for decoding ~30%% of the time; on 2 cores the worker competes with the step)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model; default 0")
    parser.add_argument("--overlays", type=int, default=6, help="val overlays to render; default 6")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    timings: dict[str, float] = {}
    for stale in DEMO_OUTPUTS:  # the demo starts afresh: its own outputs only, nothing else in DIR
        shutil.rmtree(out / stale, ignore_errors=True)

    start = time.perf_counter()
    try:
        data = workflow.synthetic_data(out, images=args.images, seed=args.seed,
                                       sam_pretrain_steps=args.sam_pretrain_steps, workers=args.workers)
        shards = data.shards
        timings["data_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model = workflow.tiny_model(data.sam_checkpoint, seed=args.seed)
        run_dir = workflow.train_on_shards(shards, out / "run_svp", model,
                                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                           num_workers=args.loader_workers)
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
        "val_samples": val["samples"], "train_steps": args.steps, "seconds": timings,
    }
    report["tokens_ratio_svp_to_mlp"] = report["tokens_mean"] / report["tokens_mlp"]
    _overlays(run_dir, out, args.overlays)
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
    model = load_trained_model(run_dir)
    return model.num_patches()


def _overlays(run_dir: Path, out: Path, count: int) -> None:
    """Predictions on the first val refs, with the expression written on them."""
    model = load_trained_model(run_dir)
    manifest = read_manifest(out / "shards")
    samples = wds.WebDataset(split_shard_urls(out / "shards", manifest, "val"), shardshuffle=False)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for index, sample in zip(range(count), samples):
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
