"""What a run directory holds, so that a run can be resumed, reloaded and reproduced; the one
module that writes and reads it.

- ``run_config.json``: the full resolved config of a run (model ids, projector and its flags, data
  URLs with their manifest hashes, seeds, git commit, library versions) — the answer to "which
  data, which splits, which recipe?".
- ``export/``: the trained parts in the form Hugging Face tools read (``trainer.export``).
- ``checkpoints/step_N``: the training state (Accelerate's ``save_state``): the trained tensors
  only (``save_trained_weights_only``; the frozen weights come from the sources the run config
  names), optimizer, schedule, RNG states and progress. It only ever appears complete
  (``save_checkpoint``); ``resume_point`` chooses the one ``--resume`` starts from, after checking it
  was made for the same model and holds nothing but plain data.
"""

from __future__ import annotations

import json
import pickle
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import SvpError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.config import TrainConfig

RUN_CONFIG = "run_config.json"
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "webdataset", "segment-anything", "ray")
CHECKPOINTS = "checkpoints"
# A checkpoint's trained tensors, under the name Accelerate gives a model's weights.
CHECKPOINT_WEIGHTS = "model.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# A save in progress: renamed to step_N once every process has written its part (see save_checkpoint).
_UNFINISHED = ".tmp"
# A step_N being replaced, renamed out of the way first so that no half-deleted step_N is ever seen.
_REPLACED = ".replaced"
_UNFINISHED_DIR = re.compile(rf"^step_\d+{re.escape(_UNFINISHED)}$")


class CheckpointError(SvpError, ValueError):
    """A checkpoint that does not belong to the model it is loaded into."""


def git_commit() -> str:
    """The commit of the code that ran (with ``-dirty`` if the tree had changes), or ``unknown``."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_run_config(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Record ``config`` plus the code and library versions that ran it."""
    resolved = {**config, "git_commit": git_commit(), "libraries": library_versions()}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG).write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n")
    return resolved


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a run directory written by `svp train`")
    return json.loads(path.read_text())


def save_trained(model: nn.Module, path: Path, include_llm: bool = True) -> None:
    """``model.trainable_state_dict(include_llm)`` as safetensors, by the unwrapped model's parameter names."""
    save_file({name: tensor.detach().cpu().contiguous()
               for name, tensor in model.trainable_state_dict(include_llm).items()}, str(path))


def _unrecorded() -> dict[str, Any]:
    """What a saved model config that lacks a key stands for, by ``ModelConfig``'s ``unrecorded`` metadata."""
    from trainer.model import ModelConfig

    return {f.name: f.metadata["unrecorded"] for f in fields(ModelConfig) if "unrecorded" in f.metadata}


def check_same_model(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Refuse to resume or load a checkpoint made for another model (another projector, flags or LLM).

    The fields compared are those ``ModelConfig`` marks ``identifies_model``; a key ``saved`` lacks
    counts as its field's ``unrecorded`` value."""
    from trainer.model import ModelConfig

    keys = [f.name for f in fields(ModelConfig) if f.metadata.get("identifies_model")]
    saved = {**_unrecorded(), **saved}
    differences = [f"{k}: checkpoint {saved.get(k)!r} vs requested {current.get(k)!r}"
                   for k in keys if _normalise(saved.get(k)) != _normalise(current.get(k))]
    if differences:
        raise CheckpointError(f"{what} was made for another model: " + "; ".join(differences))


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_config_from_dict(data: dict[str, Any]):
    """Rebuild a ``ModelConfig`` written with ``asdict`` (nested projector config, tuples); a key it
    lacks counts as its field's ``unrecorded`` value, else its default."""
    from trainer.model import ModelConfig, ProjectorConfig

    return ModelConfig(**{**_unrecorded(), **data, "projector": ProjectorConfig(**data["projector"]),
                          "lora_targets": tuple(data["lora_targets"])})


# ------------------------------------------------------------------------------ checkpoints


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest complete checkpoint, or None.

    Only a finished save is named ``step_N`` (``save_checkpoint`` renames it so at the end), so the
    name alone tells complete from cut short; a ``step_N.tmp`` is never returned.
    """
    steps = [(int(m.group(1)), p) for p in (run_dir / CHECKPOINTS).glob("step_*") if (m := _STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def unfinished_checkpoints(run_dir: Path) -> list[Path]:
    """Saves that never finished (a process killed mid-save), so that resume can name what it ignores."""
    return sorted(p for p in (run_dir / CHECKPOINTS).glob("step_*") if _UNFINISHED_DIR.match(p.name))


def ignored_saves(run_dir: Path) -> str:
    """The unfinished saves, as the resume message and error name them ('' when there are none)."""
    unfinished = unfinished_checkpoints(run_dir)
    return f"ignored unfinished checkpoint saves: {', '.join(p.name for p in unfinished)}" if unfinished else ""


def save_trained_weights_only(accelerator: Accelerator) -> None:
    """Make ``accelerator``'s ``save_state`` write, and its ``load_state`` load (strictly), only the trained
    tensors of its one prepared model.

    Left to itself Accelerate saves and loads the whole model: at a real LLM's size, gigabytes of
    frozen weights per checkpoint that every run rebuilds from its sources anyway. Its state hooks take the
    model out of its hands: on save, the main process writes ``trainable_state_dict()`` of the
    unwrapped model (names without DDP's ``module.`` prefix, as in an export) to ``CHECKPOINT_WEIGHTS``
    and Accelerate gets no model weights to write; on load, every process loads that file with
    ``load_trainable_state_dict`` before Accelerate loads the rest, and Accelerate gets no model to
    load. A file that cannot be read, or has a missing, unexpected or misshapen tensor, is a
    CheckpointError, with nothing loaded.
    """

    def save(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        (model,) = models
        if accelerator.is_main_process:
            save_trained(accelerator.unwrap_model(model), Path(output_dir) / CHECKPOINT_WEIGHTS)
        weights.clear()

    def load(models: list[nn.Module], input_dir: str) -> None:
        from trainer.model import TrainableStateError

        (model,) = models
        path = Path(input_dir) / CHECKPOINT_WEIGHTS
        try:
            accelerator.unwrap_model(model).load_trainable_state_dict(load_file(str(path)))
        except (TrainableStateError, SafetensorError) as error:
            raise CheckpointError(f"{path}: {error}; refused with nothing loaded") from None
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """Save the training state as ``checkpoint`` such that it only ever appears complete.

    Every process writes into ``step_N.tmp`` (the main process the trained weights, optimizer and schedule; each
    process its own RNG state), and once all have written, the main process renames it to
    ``step_N``: the rename is atomic, so a process killed mid-save leaves a ``.tmp`` that resume
    ignores, never a ``step_N`` it would load. A ``.tmp`` left by such a save is removed first, lest
    its files mix with this save's; a ``step_N`` already there is replaced (Ray Train restarts the
    workers from the last checkpoint they reported, which is older than one saved just before a
    failure). It is renamed to ``step_N.replaced`` before it is deleted: deleting is one unlink per
    file, and a process killed half-way through must not leave a ``step_N`` with files missing. The
    last barrier keeps every process from reporting the checkpoint before it bears its name.
    """
    unfinished = checkpoint.with_name(checkpoint.name + _UNFINISHED)
    replaced = checkpoint.with_name(checkpoint.name + _REPLACED)
    if accelerator.is_main_process:
        for stale in (unfinished, replaced):
            if stale.exists():
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(unfinished))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if checkpoint.exists():
            checkpoint.rename(replaced)
        unfinished.rename(checkpoint)
        if replaced.exists():
            shutil.rmtree(replaced)
    accelerator.wait_for_everyone()


def resume_point(config: TrainConfig) -> Path | None:
    """The checkpoint this run starts from (None: from scratch), or why it cannot start.

    Public so that a launcher can refuse a bad run directory before it starts any worker. A run
    directory that already holds complete checkpoints is never trained over from scratch without
    --resume; unfinished saves count for nothing either way.
    """
    if not config.resume:
        if last_checkpoint(config.run_dir) is not None:
            raise CheckpointError(f"{config.run_dir} already holds checkpoints: pass --resume to continue that run, "
                                  f"or choose a new --run-dir")
        return None
    checkpoint = config.resume_from or last_checkpoint(config.run_dir)
    if checkpoint is None:
        ignored = ignored_saves(config.run_dir)
        raise CheckpointError(f"--resume: no complete checkpoint under {config.run_dir / CHECKPOINTS}"
                              + (f" ({ignored})" if ignored else ""))
    if not (checkpoint / CHECKPOINT_WEIGHTS).is_file():
        what = ("holds no " + CHECKPOINT_WEIGHTS if checkpoint.is_dir() else "is not a directory" if checkpoint.exists()
                else "does not exist")
        raise CheckpointError(f"--resume checkpoint {checkpoint} {what}: not a checkpoint written by `svp train` "
                              f"(a {CHECKPOINTS}/step_N directory of a run)")
    saved = read_run_config(config.run_dir)
    check_same_model(saved.get("model", {}), _normalise(asdict(config.model)), f"--resume checkpoint {checkpoint}")
    stepped = saved.get("optimizer", "adamw")  # run configs from before --optimizer existed: AdamW
    if stepped != config.optimizer:
        raise CheckpointError(f"--resume checkpoint {checkpoint} holds the state of --optimizer {stepped}, not of "
                              f"--optimizer {config.optimizer}: one optimizer cannot continue from another's state; "
                              f"resume with --optimizer {stepped}")
    check_plain_data(checkpoint)
    return checkpoint


# Files of a checkpoint directory that Accelerate unpickles (optimizer, scheduler, RNG and
# registered objects' states); the model's weights are safetensors, which hold no code.
_PICKLED = (".bin", ".pkl", ".pt")


def check_plain_data(checkpoint: Path) -> None:
    """Refuse ``checkpoint`` unless every pickled file in it holds plain data (tensors, numbers,
    containers, the numpy arrays of RNG states) and nothing that unpickling would call.

    Accelerate's ``load_state`` unpickles registered objects (``custom_checkpoint_N.pkl``) without
    restriction and skips RNG states it cannot read without a word, so a file planted in a run
    directory could run code on ``--resume`` or silently change the run. Each file is read here
    first through Accelerate's own restricted loader; any refusal names the file.
    """
    from accelerate.utils import load  # torch.load with weights_only and the numpy types RNG states need

    for path in sorted(checkpoint.iterdir()):
        if path.suffix not in _PICKLED:
            continue
        try:
            load(path, map_location="cpu")
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise CheckpointError(f"{path} was not written by svp: it holds more than tensors and plain data"
                                  + (f" (it names {named.group(1)})" if named else "")
                                  + ", and loading it could run code; refused with nothing loaded. Resume from a "
                                  "checkpoint svp wrote, or start a new --run-dir") from None
        except Exception as exc:  # truncated or not a torch file: also nothing svp wrote
            raise CheckpointError(f"{path} cannot be read as a checkpoint file ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); refused with nothing loaded") from None
