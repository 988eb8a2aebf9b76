"""The synth → precompute → train → eval chain, shared by ``svp demo`` and the benchmarks (``bench/``).

Each step is the real thing, not a shortcut: ``svp synth`` and ``svp precompute`` (a local Ray
job) by their command lines, then ``trainer.loop.train`` and ``jobs.eval.run_eval``. The demo runs
the chain once; the accuracy benchmark trains many projectors on one precomputed dataset. Both
use tiny random-initialised models and the classical ``felzenszwalb`` superpixels, with one tiny
SAM serving the precompute (its image embeddings go into the shards, so training never runs the
encoder) and the mask head; that SAM can first be pretrained on clicks in the train images
(``sam_pretrain_steps``, ``trainer.sam_pretraining``), standing in for the released weights a real
run starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs import precompute, synth, tiny_sam
from jobs.train import resolve_shards
from pipeline.plotting import pyplot, save_figure
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.model import ModelConfig, ProjectorConfig

# The demo and the benchmarks leave their tiny SAM random by default: pretraining it on clicks
# (``trainer.sam_pretraining``) did not change the demo's val cIoU measurably, and costs ~5 min.
SAM_PRETRAIN_STEPS = 0


class StepFailed(RuntimeError):
    """A step of the chain exited non-zero (its own output says why)."""


def _check(step: str, status: int) -> None:
    if status != 0:
        raise StepFailed(f"the {step} step failed (exit {status})")


@dataclass(frozen=True)
class SyntheticData:
    refer: Path  # the synthetic REFER root
    sam_checkpoint: Path  # the tiny SAM whose image embeddings the shards carry
    shards: Path

    @classmethod
    def under(cls, out: Path) -> SyntheticData:
        """Where :func:`synthetic_data` puts each part under ``out``."""
        return cls(out / "refer", out / "sam_tiny.pth", out / "shards")


def synthetic_data(out: Path, *, images: int, seed: int, sam_pretrain_steps: int, workers: int = 2,
                   shard_size: int = 8, probe: str | None = None) -> SyntheticData:
    """``OUT/refer`` (a synthetic REFER root, or ``svp synth --probe``'s probe data) → ``OUT/sam_tiny.pth``
    (a tiny SAM, pretrained on the train images for ``sam_pretrain_steps`` steps, random when 0) →
    ``OUT/shards`` (felzenszwalb superpixels and that SAM's image embeddings), through the precompute
    job on a local Ray.

    The workers run on CPUs even where there is a GPU: the work is classical superpixels and a tiny
    encoder, and ``workers`` one-GPU actors would not fit on a one-GPU machine.
    """
    data = SyntheticData.under(out)
    refer, sam, shards = data.refer, data.sam_checkpoint, data.shards
    _check("synth", synth.main(["--out", str(refer), "--images", str(images), "--seed", str(seed),
                                *(["--probe", probe] if probe else [])]))
    pretraining = ["--pretrain-on", str(refer), "--steps", str(sam_pretrain_steps)] if sam_pretrain_steps else []
    _check("tiny-sam", tiny_sam.main(["--out", str(sam), "--seed", str(seed), *pretraining]))
    _check("precompute", precompute.main([
        "--refer-root", str(refer), "--dataset", "refcoco", "--split-by", "unc", "--out", str(shards),
        "--backend", "felzenszwalb", "--store-sam-embeddings", "--sam-checkpoint", str(sam),
        "--sam-model", "tiny", "--workers", str(workers), "--gpus-per-worker", "0", "--shard-size", str(shard_size)]))
    return data


def tiny_model(sam_checkpoint: Path, *, seed: int, projector: ProjectorConfig | None = None) -> ModelConfig:
    """The demo's model: the tiny vision encoder and LLM, the tiny SAM of ``sam_checkpoint``.

    The random tiny LLM trains whole (``llm_training="full"``): LoRA adapts a pretrained LLM, and
    on random frozen weights it learns the sentences' words far more slowly (in exploratory runs
    on the demo's data, train-batch cIoU 0.38 vs 0.28 after 900 steps on 400 images, BENCHMARKS.md).
    """
    return ModelConfig(sam_checkpoint=str(sam_checkpoint), sam_model="tiny", llm_training="full", seed=seed,
                       projector=projector or ProjectorConfig())


def train_config(shards: Path, run_dir: Path, model: ModelConfig, *, steps: int, batch_size: int, lr: float,
                 seed: int, mixed_precision: str = "no", num_workers: int = 0) -> TrainConfig:
    """``model`` trained on the train split of ``shards`` for ``steps`` steps (warm-up: the first 5 %),
    saving one checkpoint and the export at the end (``recipes/demo.yaml`` is the demo's)."""
    return TrainConfig(shards=str(shards), run_dir=run_dir, model=model, batch_size=batch_size, lr=lr,
                       max_steps=steps, warmup_steps=max(1, steps // 20), save_every=steps, seed=seed,
                       mixed_precision=mixed_precision, num_workers=num_workers)


def train_on_shards(config: TrainConfig) -> Path:
    """Run ``config`` (see :func:`train_config`); returns its run directory."""
    train(resolve_shards(config))
    return config.run_dir


def tokens_histogram(path: Path, tokens: dict[str, list[int]], title: str) -> None:
    """Visual tokens per image, one histogram per projector, on shared integer bins (a projector
    whose count is the same for every image shows as a single bar)."""
    figure, axis = pyplot().subplots(figsize=(6, 3.5))
    top = max(max(counts) for counts in tokens.values())
    bins = range(0, top + 2, max(1, (top + 1) // 100))
    for name, counts in tokens.items():
        axis.hist(counts, bins=bins, alpha=0.7, label=f"{name} (mean {sum(counts) / len(counts):.1f})")
    axis.set_xlabel("visual tokens per image")
    axis.set_ylabel("images")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
