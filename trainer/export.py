"""An export: a trained run in the form Hugging Face tools read, and all that ``svp predict`` and
``svp eval`` need, with no run directory around it. ``svp train`` writes one into ``RUN/export``;
``svp export`` writes one from any checkpoint of a run.

- ``llm/``: the LLM. With LoRA (the default), a PEFT adapter saved by peft itself
  (``adapter_config.json``, ``adapter_model.safetensors``): the LoRA weights and the rows of the added
  ``[SEG]`` and ``<image>`` tokens as trainable tokens, so that ``PeftModel.from_pretrained`` on the
  base LLM, its embeddings resized to the tokenizer saved beside it, computes svp's logits. With
  ``--llm-training full``, the whole LLM (``save_pretrained``). The tokenizer, with the added tokens.
- ``svp.safetensors``: svp's trained parts outside the LLM (projector, ``[SEG]`` MLP, region prompt,
  SAM's mask decoder).
- ``config.json``: the model config (what rebuilds the frozen parts and names them: base LLM, vision
  encoder, SAM), each local source's sha256, the superpixel settings of the training shards (what
  ``svp predict`` makes for a new image) and which checkpoint was exported.
- ``README.md``: the model card (``trainer.model_card``).

Loading is strict: a tensor missing, unexpected or misshapen, or a named source whose bytes changed,
is an error that says which, never a partial load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.hashing import path_sha256
from pipeline.state_dicts import state_dict_problems
from pipeline.vision_model import TINY
from trainer.checkpoint import (
    CHECKPOINT_WEIGHTS,
    CHECKPOINTS,
    CheckpointError,
    last_checkpoint,
    model_config_from_dict,
    save_trained,
)
from trainer.model import SegmentationMLLM, TrainableStateError
from trainer.model_card import write_model_card
from trainer.validation import BEST, BEST_RECORD

EXPORT = "export"  # RUN/export: what svp train writes at its end
LLM_DIR = "llm"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name
SVP_WEIGHTS = "svp.safetensors"
CONFIG = "config.json"
FORMAT = "svp-export"
CHECKPOINT_CHOICES = ("last", "best")
# The ModelConfig fields that name a frozen part's source, recorded with the sha256 of a local one.
SOURCES = ("llm", "vision", "sam_checkpoint")


def checkpoint_weights(run_dir: Path, which: str) -> tuple[Path, int]:
    """(trained tensors file, step) of the run's last complete checkpoint or of ``checkpoints/best``."""
    if not (run_dir / "run_config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory written by `svp train` (no run_config.json)")
    if which == BEST:
        record = run_dir / CHECKPOINTS / BEST_RECORD
        if not record.is_file():
            raise CheckpointError(f"{run_dir} has no best checkpoint ({record} not found): it is kept only by a run "
                                  f"with --eval-every; export the last one (--checkpoint last)")
        return run_dir / CHECKPOINTS / BEST / CHECKPOINT_WEIGHTS, json.loads(record.read_text())["step"]
    last = last_checkpoint(run_dir)
    if last is None:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint under {run_dir / CHECKPOINTS}")
    return last / CHECKPOINT_WEIGHTS, int(last.name.removeprefix("step_"))


def source_record(name: str | None) -> dict[str, Any]:
    """A frozen part's source as an export names it: the id or path given, and the sha256 of a local
    file or directory (None for a hub id, ``tiny`` or no file), which loading checks."""
    local = name is not None and name != TINY and Path(name).exists()
    return {"name": name, "sha256": path_sha256(name) if local else None}


def write_export(model: SegmentationMLLM, run_dir: Path, out: Path, checkpoint: str, step: int) -> Path:
    """Write the export of ``model`` (trained in ``run_dir``, whose record it copies) into ``out``."""
    run_config = json.loads((run_dir / "run_config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    llm_dir = out / LLM_DIR
    if isinstance(model.llm, PeftModel):
        # The rows of the added tokens travel as trainable tokens; peft would otherwise save the whole
        # resized vocabulary ("auto", for a local base whose vocabulary grew), gigabytes for one row.
        model.llm.save_pretrained(llm_dir, save_embedding_layers=False)
    else:
        model.llm.save_pretrained(llm_dir)
    model.tokenizer.save_pretrained(llm_dir)
    save_trained(model, out / SVP_WEIGHTS, include_llm=False)
    model_config = run_config["model"]
    config = {
        "format": FORMAT,
        "model": model_config,
        "sources": {key: source_record(model_config[key]) for key in SOURCES},
        "superpixels": run_config.get("data", {}).get("train", {}).get("config", {}),
        "trained": {"run_dir": str(run_dir), "checkpoint": checkpoint, "step": step,
                    "git_commit": run_config.get("git_commit")},
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    eval_path = run_dir / "eval.json"
    write_model_card(out, config, run_config, json.loads(eval_path.read_text()) if eval_path.is_file() else None,
                     model.num_patches())
    return out


def export_dir(path: Path) -> Path:
    """``path`` if it is an export, else its ``export/`` (a run directory); else why neither."""
    for candidate in (path, path / EXPORT):
        if (candidate / CONFIG).is_file() and (candidate / SVP_WEIGHTS).is_file():
            return candidate
    raise CheckpointError(f"{path} is neither an export (written by `svp export` or `svp train`: {CONFIG}, "
                          f"{SVP_WEIGHTS}, {LLM_DIR}/) nor a run directory holding one in {EXPORT}/")


def read_export_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of the export ``path`` names (an export, or a run directory)."""
    config = json.loads((export_dir(path) / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{export_dir(path) / CONFIG} is not an svp export's config (format {FORMAT})")
    return config


def check_sources(config: dict[str, Any]) -> None:
    """Refuse an export whose frozen parts would come from other bytes than it was trained on."""
    for key, source in config["sources"].items():
        if source["sha256"] is None:
            continue
        name = source["name"]
        if not Path(name).exists():
            raise CheckpointError(f"the export's {key} {name} does not exist here; the trained parts need it "
                                  f"(sha256 {source['sha256']})")
        if path_sha256(name) != source["sha256"]:
            raise CheckpointError(f"the export's {key} {name} is not the one it was trained with: sha256 "
                                  f"{path_sha256(name)}, recorded {source['sha256']}")


def load_exported_model(path: Path, device: str | torch.device = "cpu") -> SegmentationMLLM:
    """An export (or a run directory's) → the model with its trained parts loaded, strictly."""
    directory = export_dir(path)
    config = read_export_config(directory)
    check_sources(config)
    model = SegmentationMLLM(model_config_from_dict(config["model"]))
    try:
        _load_llm(model, directory / LLM_DIR)
        model.load_trainable_state_dict(load_file(str(directory / SVP_WEIGHTS)), include_llm=False)
    except (TrainableStateError, SafetensorError, OSError) as error:
        raise CheckpointError(f"{directory}: {error}; refused") from None
    return model.to(device).eval()


def _load_llm(model: SegmentationMLLM, llm_dir: Path) -> None:
    """The LLM's trained weights: the adapter through peft's own mapping of its names, or the whole LLM."""
    if isinstance(model.llm, PeftModel):
        given = load_file(str(llm_dir / ADAPTER_WEIGHTS))
        expected = get_peft_model_state_dict(model.llm, save_embedding_layers=False)
        _refuse_unless_fits(given, expected, llm_dir / ADAPTER_WEIGHTS)
        set_peft_model_state_dict(model.llm, given)
        return
    given = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True).state_dict()
    _refuse_unless_fits(given, model.llm.state_dict(), llm_dir)
    model.llm.load_state_dict(given)


def _refuse_unless_fits(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: Path) -> None:
    problems = state_dict_problems(given, expected)
    if problems:
        raise TrainableStateError(f"{where} does not fit this model: " + "; ".join(problems))
