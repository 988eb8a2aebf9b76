"""A checkpoint only ever appears complete: a save cut short is never resumed from, nor left in the way
of the next save of its step. It holds the trained tensors and no frozen one, resumes a run as if it
had not stopped, and refuses what does not fit the model."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import assert_checkpoints, export_tensors, one_sentence_shards, tiny_train_config

from trainer.checkpoint import (
    CHECKPOINT_WEIGHTS,
    CHECKPOINTS,
    CheckpointError,
    last_checkpoint,
    resume_point,
    unfinished_checkpoints,
)
from trainer.config import TrainConfig
from trainer.loop import setup_training, train


def _leave_unfinished(directory: Path, *files: str) -> None:
    """What a save killed mid-write leaves: its directory with some of its files."""
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).write_bytes(b"cut short")


def test_an_unfinished_save_is_no_checkpoint(tmp_path):
    _leave_unfinished(tmp_path / CHECKPOINTS / "step_000004.tmp", "model.safetensors")
    assert last_checkpoint(tmp_path) is None
    assert unfinished_checkpoints(tmp_path) == [tmp_path / CHECKPOINTS / "step_000004.tmp"]
    config = TrainConfig(shards=str(tmp_path / "train-000000.tar"), run_dir=tmp_path)
    assert resume_point(config) is None  # nothing complete to train over: a fresh run may start here
    with pytest.raises(CheckpointError, match=r"no complete checkpoint .*ignored unfinished .*step_000004\.tmp"):
        resume_point(replace(config, resume=True))


def test_each_save_is_complete_when_reported_and_replaces_what_a_cut_short_save_left(shards, tiny_sam_checkpoint,
                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / CHECKPOINTS
    # A 2-process run killed while saving step 1: rank 1's RNG state is all it wrote.
    _leave_unfinished(checkpoints / "step_000001.tmp", "random_states_1.pkl")
    reported = []

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        if checkpoint is not None:  # what a launcher (Ray Train) would find there when told
            reported.append((checkpoint.name, sorted(p.name for p in checkpoints.iterdir())))

    config = tiny_train_config(shards, run_dir, tiny_sam_checkpoint, max_steps=2, save_every=1)
    train(config, report=report)
    assert reported == [("step_000001", ["step_000001"]), ("step_000002", ["step_000001", "step_000002"])]
    assert_checkpoints(run_dir, [1, 2], ranks=1)

    # Ray Train restarting from step 1 (the step-2 save done but never reported) saves step 2 again.
    (checkpoints / "step_000002" / "left-over").write_bytes(b"")
    train(replace(config, resume=True, resume_from=checkpoints / "step_000001"))
    assert_checkpoints(run_dir, [1, 2], ranks=1)
    assert not (checkpoints / "step_000002" / "left-over").exists()


def test_a_save_killed_while_replacing_a_checkpoint_leaves_no_step_n_with_files_missing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator

    from trainer import checkpoint as run_directory

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # as the loop builds it
    checkpoint = tmp_path / CHECKPOINTS / "step_000002"
    _leave_unfinished(checkpoint, "model.safetensors", "optimizer.bin", "random_states_0.pkl")  # an older save

    def killed_midway(path, *args, **kwargs) -> None:  # a process killed after deleting one file
        next(Path(path).iterdir()).unlink()
        raise RuntimeError("killed")

    monkeypatch.setattr(run_directory, "shutil", SimpleNamespace(rmtree=killed_midway))  # the saver's deletions only
    with pytest.raises(RuntimeError, match="killed"):
        run_directory.save_checkpoint(accelerator, checkpoint)
    # Whatever was cut short, step_N is one whole save: this one (every process's RNG state, nothing older).
    assert last_checkpoint(tmp_path) == checkpoint
    assert {p.name for p in checkpoint.iterdir()} == {"random_states_0.pkl"}
    monkeypatch.undo()
    run_directory.save_checkpoint(accelerator, checkpoint)  # the next save of the step clears what the kill left
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step_000002"]


class _Planted:
    """What a crafted checkpoint file could hold: an object whose unpickling calls a function
    (here it only creates a file, so the test can tell whether unpickling ran it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_resume_refuses_a_checkpoint_file_holding_more_than_plain_data(shards, tiny_sam_checkpoint, tmp_path, capsys,
                                                                       planted):
    import pickle

    import torch
    from train_helpers import train_flags

    from jobs.train import main as svp_train

    run_dir, marker = tmp_path / "run", tmp_path / "code-ran"
    assert svp_train(train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "1", "--save-every", "1")) == 0
    target = run_dir / CHECKPOINTS / "step_000001" / planted
    with open(target, "wb") as stream:  # a torch-format file, as the real one is, holding the object
        torch.save({"step": _Planted(marker)}, stream, pickle_module=pickle)
    capsys.readouterr()
    status = svp_train(train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "2", "--resume"))
    error = capsys.readouterr().err
    assert status == 2
    assert not marker.exists(), "nothing in the planted file ran"
    assert str(target) in error and "not written by svp" in error
    assert "weights_only" not in error, "never advise lowering the safety"


@pytest.fixture(scope="module")
def wide_llm(tmp_path_factory) -> Path:
    """A random Llama wide enough that its frozen weights outweigh what trains, as a real LLM's do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.model.tokenizer import tiny_tokenizer

    directory = tmp_path_factory.mktemp("wide-llm")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024,
                                 num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                                 tie_word_embeddings=False)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_checkpoint_holds_the_trained_tensors_and_no_frozen_one(shards, tiny_sam_checkpoint, wide_llm, tmp_path):
    from trainer.model import ModelConfig, SegmentationMLLM

    model_config = ModelConfig(llm=str(wide_llm), sam_checkpoint=str(tiny_sam_checkpoint), sam_model="tiny")
    train(tiny_train_config(shards, tmp_path, tiny_sam_checkpoint, model=model_config, max_steps=1, save_every=1))
    checkpoint = tmp_path / CHECKPOINTS / "step_000001"
    model = SegmentationMLLM(model_config)
    trained = model.trainable_state_dict()
    saved = load_file(checkpoint / CHECKPOINT_WEIGHTS)
    assert saved.keys() == trained.keys()
    assert all(saved[name].shape == tensor.shape for name, tensor in trained.items())
    checkpoint_bytes = sum(path.stat().st_size for path in checkpoint.iterdir())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert checkpoint_bytes < model_bytes / 3, (checkpoint_bytes, model_bytes)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_a_resumed_run_continues_as_the_uninterrupted_run(shards, tiny_sam_checkpoint, tmp_path, optimizer):
    """Killed after step 2's save and resumed, a run computes the very losses and weights of steps 3 and
    4 that it computed without the interruption: the trained weights, optimizer, schedule and RNG states
    of the checkpoint are the whole state that the frozen weights, rebuilt from their sources, lack. The
    8-bit optimizer's quantised moments are its own state, so they resume as exactly."""
    run_dir = tmp_path / "run"
    config = tiny_train_config(one_sentence_shards(shards, tmp_path / "shards"), run_dir, tiny_sam_checkpoint,
                               max_steps=4, save_every=2, log_every=1, optimizer=optimizer)
    losses: dict[int, float] = {}

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        losses[metrics["step"]] = metrics["loss"]

    train(config, report=report)
    straight, straight_weights = dict(losses), export_tensors(run_dir / "export")
    moments = _moment_dtypes(run_dir / CHECKPOINTS / "step_000002")
    assert (torch.uint8 in moments) == (optimizer == "adamw8bit") and torch.float32 in moments, moments
    shutil.rmtree(run_dir / CHECKPOINTS / "step_000004")
    losses.clear()
    train(replace(config, resume=True), report=report)
    assert losses == {3: straight[3], 4: straight[4]}
    resumed_weights = export_tensors(run_dir / "export")
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0)


def _moment_dtypes(checkpoint: Path) -> set[torch.dtype]:
    """The dtypes of the tensors (not scalars) in ``checkpoint``'s optimizer state, however nested
    (bitsandbytes keeps its per-parameter state in a dict of its own)."""
    def dtypes(value) -> set[torch.dtype]:
        if isinstance(value, dict):
            return set().union(*map(dtypes, value.values()))
        return {value.dtype} if isinstance(value, torch.Tensor) and value.dim() > 0 else set()

    return dtypes(torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)["state"])


def test_resume_refuses_the_state_of_another_optimizer(one_step_run, shards, tiny_sam_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(one_step_run, run_dir)
    config = tiny_train_config(shards, run_dir, tiny_sam_checkpoint, max_steps=2, resume=True, optimizer="adamw8bit")
    with pytest.raises(CheckpointError, match="holds the state of --optimizer adamw, not of --optimizer adamw8bit"):
        resume_point(config)


@pytest.fixture(scope="module")
def one_step_run(shards, tiny_sam_checkpoint, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one-step")
    train(tiny_train_config(shards, run_dir, tiny_sam_checkpoint, max_steps=1, save_every=1))
    return run_dir


@pytest.mark.parametrize("change", ["missing", "unexpected", "unreadable"])
def test_resume_refuses_trained_weights_that_do_not_fit_the_model(one_step_run, shards, tiny_sam_checkpoint, tmp_path,
                                                                  change):
    run_dir = tmp_path / "run"
    shutil.copytree(one_step_run, run_dir)
    path = run_dir / CHECKPOINTS / "step_000001" / CHECKPOINT_WEIGHTS
    if change == "unreadable":  # a file cut short
        path.write_bytes(b"cut short")
        expected = "Error while deserializing header"
    else:
        state = load_file(path)
        if change == "missing":
            name = sorted(state)[0]
            del state[name]
            problem = f"1 missing keys: {name}"
        else:
            state["projector.extra.weight"] = torch.zeros(1)
            problem = "1 unexpected keys: projector.extra.weight"
        save_file(state, path)
        expected = f"trained weights do not fit this model: {problem}"
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {expected}")):
        setup_training(tiny_train_config(shards, run_dir, tiny_sam_checkpoint, max_steps=2, resume=True))


@pytest.mark.parametrize("made", [False, True], ids=["missing", "empty"])
def test_resume_from_a_directory_that_is_no_checkpoint_is_refused(one_step_run, tmp_path, made):
    run_dir = tmp_path / "run"
    shutil.copytree(one_step_run, run_dir)
    named = tmp_path / "step_000001"
    if made:
        named.mkdir()
    config = TrainConfig(shards=str(tmp_path / "train-000000.tar"), run_dir=run_dir, resume=True, resume_from=named)
    what = "holds no model.safetensors" if made else "does not exist"
    with pytest.raises(CheckpointError, match=re.escape(f"--resume checkpoint {named} {what}: not a checkpoint")):
        resume_point(config)
