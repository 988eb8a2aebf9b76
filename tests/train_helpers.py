"""What the training tests of every launcher (in-process, torchrun, accelerate launch, Ray Train)
check in the same way: the flags of a tiny run, disjoint data per process, a faithful resume."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.loop import TrainConfig, setup_training
from trainer.model import ModelConfig


def train_flags(shards: Path, run_dir: Path, sam: Path, *extra: str) -> list[str]:
    """`svp train` flags of a tiny CPU run (batch 2, a log line every step)."""
    return ["--shards", str(shards), "--run-dir", str(run_dir), "--sam-checkpoint", str(sam), "--sam-model", "tiny",
            "--batch-size", "2", "--log-every", "1", *extra]


def keys_per_rank(run_dir: Path, ranks: int) -> list[list[str]]:
    """The sample keys each process trained on, in order (written by --record-keys)."""
    return [(run_dir / f"keys_rank{rank}.txt").read_text().split() for rank in range(ranks)]


def assert_disjoint_keys(run_dir: Path, ranks: int) -> None:
    """Every process trained, and no sample reached two processes."""
    seen = [set(keys) for keys in keys_per_rank(run_dir, ranks)]
    assert all(seen) and sum(map(len, seen)) == len(set().union(*seen))


def assert_restores_saved_state(run_dir: Path, shards: Path, sam: Path, step: int) -> None:
    """``--resume`` in ``run_dir`` restores step ``step`` and exactly the optimizer state saved there."""
    config = TrainConfig(train_shards=str(shards / "train-000000.tar"), run_dir=run_dir, batch_size=2,
                         max_steps=step + 2, model=ModelConfig(sam_checkpoint=str(sam), sam_model="tiny"), resume=True)
    restored = setup_training(config)
    assert restored.progress.step == step
    saved = torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "optimizer.bin", weights_only=True)
    current = restored.optimizer.state_dict()
    assert saved["param_groups"] == current["param_groups"]
    assert saved["state"].keys() == current["state"].keys() and len(saved["state"]) > 0
    for index, state in saved["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(current["state"][index][name], value, rtol=0, atol=0)
    restored.accelerator.end_training()
