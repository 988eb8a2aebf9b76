"""The synth → precompute → train → eval chain, shared by ``svp demo`` and the benchmarks (``bench/``).

Each step is the real thing, not a shortcut: ``svp synth`` and ``svp precompute`` (a local Ray
job) by their command lines, then ``trainer.loop.train`` and ``jobs.eval.run_eval``. The demo runs
the chain once; the accuracy benchmark trains many projectors on one precomputed dataset. Both
use tiny random-initialised models and the classical ``felzenszwalb`` superpixels, with one random
tiny SAM serving the precompute (its image embeddings go into the shards, so training never runs
the encoder) and the mask head.
"""

from __future__ import annotations

from pathlib import Path

from jobs import precompute, synth
from jobs.train import train_urls
from trainer.loop import TrainConfig, train
from trainer.model import ModelConfig


class StepFailed(RuntimeError):
    """A step of the chain exited non-zero (its own output says why)."""


def _check(step: str, status: int) -> None:
    if status != 0:
        raise StepFailed(f"the {step} step failed (exit {status})")


def synthetic_shards(out: Path, *, images: int, seed: int, sam_checkpoint: Path, workers: int = 2,
                     shard_size: int = 8) -> Path:
    """``OUT/refer`` (a synthetic REFER root) → ``OUT/shards`` (felzenszwalb superpixels and the
    SAM's image embeddings), through the precompute job on a local Ray; returns the shards directory.

    The workers run on CPUs even where there is a GPU: the work is classical superpixels and a tiny
    encoder, and ``workers`` one-GPU actors would not fit on a one-GPU machine.
    """
    _check("synth", synth.main(["--out", str(out / "refer"), "--images", str(images), "--seed", str(seed)]))
    _check("precompute", precompute.main([
        "--refer-root", str(out / "refer"), "--dataset", "refcoco", "--split-by", "unc", "--out", str(out / "shards"),
        "--backend", "felzenszwalb", "--store-sam-embeddings", "--sam-checkpoint", str(sam_checkpoint),
        "--sam-model", "tiny", "--workers", str(workers), "--gpus-per-worker", "0", "--shard-size", str(shard_size)]))
    return out / "shards"


def train_on_shards(shards: Path, run_dir: Path, model: ModelConfig, *, steps: int, batch_size: int, lr: float,
                    seed: int, mixed_precision: str = "no") -> Path:
    """Train ``model`` on the train split of ``shards`` for ``steps`` steps (warm-up: the first 5 %),
    saving one checkpoint and the export at the end; returns ``run_dir``."""
    train(TrainConfig(train_shards=train_urls(str(shards), "train"), run_dir=run_dir, model=model,
                      batch_size=batch_size, lr=lr, max_steps=steps, warmup_steps=max(1, steps // 20),
                      save_every=steps, seed=seed, mixed_precision=mixed_precision))
    return run_dir


def tokens_histogram(path: Path, tokens: dict[str, list[int]], title: str) -> None:
    """Visual tokens per image, one histogram per projector, on shared integer bins (a projector
    whose count is the same for every image shows as a single bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    top = max(max(counts) for counts in tokens.values())
    bins = range(0, top + 2, max(1, (top + 1) // 100))
    for name, counts in tokens.items():
        axis.hist(counts, bins=bins, alpha=0.7, label=f"{name} (mean {sum(counts) / len(counts):.1f})")
    axis.set_xlabel("visual tokens per image")
    axis.set_ylabel("images")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
