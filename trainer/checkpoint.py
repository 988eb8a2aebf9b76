"""What a run leaves behind, so that it can be resumed, reloaded and reproduced.

- ``run_config.json``: the full resolved config of a run (model ids, projector and its flags, data
  URLs with their manifest hashes, seeds, git commit, library versions) — the answer to "which
  data, which splits, which recipe?".
- ``export/``: only the trained parts (projector, LoRA adapters, new token rows, [SEG] MLP, mask
  decoder) as safetensors plus the model config; loading it is strict: a key that is missing or
  unexpected is an error that lists it, never a silent partial load.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

RUN_CONFIG = "run_config.json"
EXPORT_WEIGHTS = "trained.safetensors"
EXPORT_CONFIG = "model_config.json"
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "webdataset", "segment-anything", "ray")


class CheckpointError(ValueError):
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


def export_trained(model: torch.nn.Module, out_dir: Path, model_config: Any) -> Path:
    """Save the trained parts only, plus the config needed to rebuild the rest from its sources."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.trainable_state_dict().items()}
    save_file(state, str(out_dir / EXPORT_WEIGHTS))
    (out_dir / EXPORT_CONFIG).write_text(json.dumps(asdict(model_config), indent=2, sort_keys=True) + "\n")
    return out_dir


def read_export(export_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config dict, trained tensors) of an export; safetensors never executes code."""
    weights, config = export_dir / EXPORT_WEIGHTS, export_dir / EXPORT_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise CheckpointError(f"{path} not found: expected an export written by `svp train` ({EXPORT_WEIGHTS} + {EXPORT_CONFIG})")
    return json.loads(config.read_text()), load_file(str(weights))


# Model keys newer than some run directories, with the value those runs had.
_ADDED_LATER = {"llm_training": "lora", "region_prompt": False, "gradient_checkpointing": False}


def check_same_model(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Refuse to resume or load a checkpoint made for another model (another projector, flags or LLM).

    A checkpoint written before ``llm_training`` existed trained LoRA: its config lacks the key
    (likewise a missing ``region_prompt`` means none, see ``_ADDED_LATER``)."""
    keys = ("llm", "vision", "vision_size", "sam_model", "projector", "lora_r", "lora_targets", "llm_training",
            "region_prompt")
    saved = {**_ADDED_LATER, **saved}
    differences = [f"{k}: checkpoint {saved.get(k)!r} vs requested {current.get(k)!r}"
                   for k in keys if _normalise(saved.get(k)) != _normalise(current.get(k))]
    if differences:
        raise CheckpointError(f"{what} was made for another model: " + "; ".join(differences))


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_config_from_dict(data: dict[str, Any]):
    """Rebuild a ``ModelConfig`` written with ``asdict`` (nested projector config, tuples)."""
    from trainer.model import ModelConfig, ProjectorConfig

    return ModelConfig(**{**_ADDED_LATER, **data, "projector": ProjectorConfig(**data["projector"]),
                          "lora_targets": tuple(data["lora_targets"])})


def load_trained_model(path: Path, device: str | torch.device = "cpu"):
    """A run directory (or its ``export/``) → the model with its trained parts loaded, strictly."""
    from trainer.model import SegmentationMLLM

    export_dir = path / "export" if (path / "export").is_dir() else path
    config, state = read_export(export_dir)
    model = SegmentationMLLM(model_config_from_dict(config))
    model.load_trainable_state_dict(state)
    return model.to(device).eval()
