"""What the training tests of every launcher (in-process, torchrun, accelerate launch, Ray Train)
check in the same way: the flags of a tiny run, disjoint data per process, complete checkpoints, a
faithful resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.loop import setup_training
from trainer.model import ModelConfig


def train_flags(shards: Path, run_dir: Path, sam: Path, *extra: str) -> list[str]:
    """`svp train` flags of a tiny CPU run (batch 2, a log line every step)."""
    return ["--shards", str(shards), "--run-dir", str(run_dir), "--sam-checkpoint", str(sam), "--sam-model", "tiny",
            "--batch-size", "2", "--log-every", "1", *extra]


def export_tensors(export: Path) -> dict[str, torch.Tensor]:
    """Every tensor an export holds, read from its files: svp's by name, the LLM's as ``llm/NAME``."""
    tensors = load_file(export / "svp.safetensors")
    for file in sorted((export / "llm").glob("*.safetensors")):
        tensors.update({f"llm/{name}": tensor for name, tensor in load_file(file).items()})
    return tensors


def keys_per_rank(run_dir: Path, ranks: int) -> list[list[str]]:
    """The sample keys each process trained on, in order (written by --record-keys)."""
    return [(run_dir / f"keys_rank{rank}.txt").read_text().split() for rank in range(ranks)]


def assert_disjoint_keys(run_dir: Path, ranks: int) -> None:
    """Every process trained, and no sample reached two processes."""
    seen = [set(keys) for keys in keys_per_rank(run_dir, ranks)]
    assert all(seen) and sum(map(len, seen)) == len(set().union(*seen))


def tiny_train_config(shards: Path, run_dir: Path, sam: Path, **overrides) -> TrainConfig:
    """The in-process ``TrainConfig`` of a tiny CPU run on one shard (batch 2), with ``overrides``."""
    return TrainConfig(shards=str(shards / "train-000000.tar"), run_dir=run_dir, batch_size=2,
                       **{"model": ModelConfig(sam_checkpoint=str(sam), sam_model="tiny"), **overrides})


def one_sentence_shards(shards: Path, out: Path) -> Path:
    """``shards``' first train shard (two images) with one sentence per image, its manifest beside it.

    A batch of two is then the same two items at every step, whatever the seed of the shuffles and
    of the sentence draw, so two runs of it see the same data step for step."""
    out.mkdir(parents=True)
    shutil.copy(shards / "manifest.json", out / "manifest.json")
    with tarfile.open(shards / "train-000000.tar") as source, tarfile.open(out / "train-000000.tar", "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(".refs.json"):
                first = json.loads(data)[0]
                data = json.dumps([{**first, "sentences": first["sentences"][:1]}]).encode()
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    return out


def assert_checkpoints(run_dir: Path, steps: list[int], ranks: int) -> None:
    """``run_dir`` holds exactly the checkpoints of ``steps`` (nothing unfinished beside them), each with
    the RNG state of every process: the rename to ``step_N`` came after all of them had written."""
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step_{step:06d}" for step in steps]
    for step in steps:
        assert {p.name for p in (checkpoints / f"step_{step:06d}").glob("random_states_*.pkl")} == {
            f"random_states_{rank}.pkl" for rank in range(ranks)}


def assert_restores_saved_state(run_dir: Path, shards: Path, sam: Path, step: int) -> None:
    """``--resume`` in ``run_dir`` restores step ``step`` and exactly the optimizer state saved there."""
    restored = setup_training(tiny_train_config(shards, run_dir, sam, max_steps=step + 2, resume=True))
    assert restored.progress.step == step
    saved = torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "optimizer.bin", weights_only=True)
    current = restored.optimizer.state_dict()
    assert saved["param_groups"] == current["param_groups"]
    assert saved["state"].keys() == current["state"].keys() and len(saved["state"]) > 0
    for index, state in saved["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(current["state"][index][name], value, rtol=0, atol=0)
    restored.accelerator.end_training()
