"""Train-step time and inference latency per projector: ``python -m bench.train_step``.

Side by side in one process, on the same tiny LLM, the same batch (synthetic images, felzenszwalb
superpixels, SAM embeddings precomputed by the real precompute job) and the same thread count:

- for ``mlp`` (one token per patch), ``pool`` (fixed grid) and ``svp`` (one token per superpixel):
  visual tokens per sample, forward+backward+optimizer step time, inference latency (one sample),
  and each as a ratio to ``mlp``;
- the ``svp`` step with precomputed ``sam.npy`` against the step that runs the SAM encoder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from jobs.precompute import main as precompute
from pipeline.shards import read_manifest, split_shard_urls
from pipeline.superpixels.sam import save_tiny_sam
from pipeline.synth import synthesize
from trainer.data import DataConfig, make_loader
from trainer.model import PROJECTORS, ModelConfig, ProjectorConfig, SegmentationMLLM


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (default 5)")
    parser.add_argument("--vision-size", type=int, default=224, help="vision input (default 224: 16x16 patches)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_step.json"), help="results file")
    return parser.parse_args(argv)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batches(workdir: Path, checkpoint: Path, data_config: DataConfig, batch_size: int) -> tuple[dict, dict]:
    """One training batch with SAM embeddings and the same batch with SAM pixels instead."""
    synthesize(workdir / "refer", images=batch_size * 2, seed=0)
    if precompute(["--refer-root", str(workdir / "refer"), "--dataset", "refcoco", "--split-by", "unc",
                   "--out", str(workdir / "shards"), "--backend", "felzenszwalb", "--store-sam-embeddings",
                   "--sam-checkpoint", str(checkpoint), "--sam-model", "tiny", "--shard-size", str(batch_size * 2)]) != 0:
        raise RuntimeError("precompute failed")
    urls = split_shard_urls(workdir / "shards", read_manifest(workdir / "shards"), "train")

    def first(config: DataConfig) -> dict:
        return next(iter(make_loader(urls, config, train=False, batch_size=batch_size)))

    return first(data_config), first(DataConfig(**{**vars(data_config), "use_sam_embeddings": False}))


def step_time(model: SegmentationMLLM, batch: dict, repeats: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    return median_seconds(step, repeats)


def latency(model: SegmentationMLLM, batch: dict, repeats: int) -> float:
    one = {k: v[:1] for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
    model.eval()
    with torch.no_grad():
        return median_seconds(lambda: model.predict_masks(one), repeats)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        checkpoint = save_tiny_sam(workdir / "sam_tiny.pth")
        config = lambda kind: ModelConfig(vision_size=args.vision_size, sam_checkpoint=str(checkpoint),  # noqa: E731
                                          sam_model="tiny", projector=ProjectorConfig(kind=kind))
        data_config = DataConfig(**SegmentationMLLM(config("svp")).data_config_fields())
        with_embeddings, with_pixels = batches(workdir, checkpoint, data_config, args.batch_size)
        rows = {}
        for kind in PROJECTORS:
            model = SegmentationMLLM(config(kind))
            rows[kind] = {
                "tokens_mean": float(model.predict_masks(with_embeddings)[1].float().mean()),
                "step_s": step_time(model, with_embeddings, args.repeats),
                "latency_s": latency(model, with_embeddings, args.repeats),
            }
            if kind == "svp":
                sam_encoder_step = step_time(model, with_pixels, args.repeats)
    for row in rows.values():
        for name in ("tokens_mean", "step_s", "latency_s"):
            row[f"{name}_ratio_to_mlp"] = row[name] / rows["mlp"][name]
    results = {
        "device": "cpu", "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "vision_size": args.vision_size, "projectors": rows,
        "svp_step_with_sam_embeddings_s": rows["svp"]["step_s"], "svp_step_with_sam_encoder_s": sam_encoder_step,
        "sam_embedding_step_ratio": rows["svp"]["step_s"] / sam_encoder_step,
    }
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    lines = [f"tiny LLM, batch {results['batch_size']}, vision {results['vision_size']} px, "
             f"{results['device']} ({results['torch_threads']} threads); ratios are to mlp",
             f"{'projector':<10}{'tokens':>8}{'ratio':>8}{'step s':>9}{'ratio':>8}{'latency s':>11}{'ratio':>8}"]
    for kind, r in results["projectors"].items():
        lines.append(f"{kind:<10}{r['tokens_mean']:>8.1f}{r['tokens_mean_ratio_to_mlp']:>8.3f}{r['step_s']:>9.3f}"
                     f"{r['step_s_ratio_to_mlp']:>8.3f}{r['latency_s']:>11.4f}{r['latency_s_ratio_to_mlp']:>8.3f}")
    lines.append(f"svp step with precomputed sam.npy {results['svp_step_with_sam_embeddings_s']:.3f} s vs running the "
                 f"SAM encoder {results['svp_step_with_sam_encoder_s']:.3f} s: ratio {results['sam_embedding_step_ratio']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
