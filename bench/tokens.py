"""Visual tokens per image for ``mlp``, ``pool`` and ``svp`` on the same images: ``python -m bench.tokens``.

Every image of the shared synthetic dataset (all splits) goes through the data loader and each
projector (the real modules, on the vision grid of the trainer's default input), and we count the
tokens each hands the LLM: ``mlp`` one per patch, ``pool`` its fixed grid, ``svp`` one per
superpixel. ``pool`` gets the same mean budget as ``svp`` (``pool_budget``). Writes a histogram
(``tokens_histogram.png`` in the results directory) next to the numbers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import Workspace, run_alone
from jobs.workflow import tokens_histogram
from pipeline.shards import read_manifest, split_shard_urls
from pipeline.vision_model import TINY, load_vision
from trainer.data import DataConfig, make_loader
from trainer.model import PROJECTORS, ProjectorConfig
from trainer.model.projectors import build_projector

NAME = "tokens"
PRESETS: dict[str, dict] = {"cpu": {}, "full": {}, "quick": {}, "gpu": {}}
OPTIONS: tuple[type, ...] = ()  # no flags of its own: the images are the workspace's (--images)
VISION_SIZE = 224  # the trainer's default input: 16×16 patches of 14 px


def pool_budget(shards: Path) -> int:
    """The ``pool_tokens`` that gives ``pool`` the mean token count of ``svp`` on these shards:
    svp's mean tokens per image (its superpixels, from the index), rounded."""
    counts = pq.read_table(shards / "index.parquet").column("num_superpixels").to_pylist()
    return max(1, round(float(np.mean([n for n in counts if n is not None]))))


def projector_configs(shards: Path) -> dict[str, ProjectorConfig]:
    return {kind: ProjectorConfig(kind=kind, pool_tokens=pool_budget(shards)) for kind in PROJECTORS}


@torch.inference_mode()
def tokens_per_image(shards: Path, configs: dict[str, ProjectorConfig]) -> dict[str, list[int]]:
    """{projector: tokens of each image}, every image of every split once."""
    vision, dim, patch = load_vision(TINY, VISION_SIZE)
    grid = (VISION_SIZE // patch, VISION_SIZE // patch)
    projectors = {name: build_projector(config, dim, 8) for name, config in configs.items()}
    manifest = read_manifest(shards)
    urls = [url for split in manifest["samples_by_split"] for url in split_shard_urls(shards, manifest, split)]
    # Token counts read no SAM input: leave sam.npy (from the dataset's tiny SAM) unread.
    config = DataConfig(vision_size=VISION_SIZE, vision_mean=tuple(vision.mean), vision_std=tuple(vision.std),
                        use_sam_embeddings=False)
    per_image: dict[str, dict[str, int]] = {name: {} for name in configs}
    for batch in make_loader(urls, config, train=False, batch_size=16):
        features = torch.zeros(len(batch["keys"]), grid[0] * grid[1], dim)
        for name, projector in projectors.items():
            _, valid = projector(features, grid, batch["superpixels"], batch["num_superpixels"])
            per_image[name].update(zip(batch["keys"], valid.sum(1).tolist()))
    return {name: list(counts.values()) for name, counts in per_image.items()}


def statistics_of(counts: list[int]) -> dict[str, float]:
    values = np.asarray(counts)
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max()), "images": len(values)}


def run(args: argparse.Namespace, workspace: Workspace) -> dict:
    shards = workspace.shards()
    configs = projector_configs(shards)
    counts = tokens_per_image(shards, configs)
    stats = {name: statistics_of(values) for name, values in counts.items()}
    histogram = args.results / "tokens_histogram.png"
    tokens_histogram(histogram, counts, f"visual tokens per image, {stats['svp']['images']} synthetic images")
    ratio = stats["svp"]["mean"] / stats["mlp"]["mean"]
    return {"projectors": stats, "pool_tokens_requested": configs["pool"].pool_tokens,
            "histogram": str(histogram), "headline": {"tokens_ratio_svp_to_mlp": ratio}}


def format_table(results: dict) -> str:
    lines = ["visual tokens per image (same images for every projector; pool at svp's mean budget, "
             f"{results['pool_tokens_requested']} requested)",
             f"{'projector':<10}{'mean':>8}{'median':>8}{'p95':>8}{'max':>6}{'ratio to mlp':>14}"]
    mlp = results["projectors"]["mlp"]["mean"]
    for name, s in results["projectors"].items():
        lines.append(f"{name:<10}{s['mean']:>8.1f}{s['median']:>8.1f}{s['p95']:>8.1f}{s['max']:>6}"
                     f"{s['mean'] / mlp:>14.3f}")
    lines.append(f"histogram: {results['histogram']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_alone(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
