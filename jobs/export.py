"""``svp export`` / ``python -m jobs.export``: a checkpoint of a run, exported the Hugging Face way.

``svp export --run-dir RUN --out DIR [--checkpoint best|last]`` writes into DIR the LLM's LoRA as a
PEFT adapter with its tokenizer (``DIR/llm/``), svp's other trained parts (``svp.safetensors``), the
config that names the frozen parts' sources (``config.json``) and a model card (``README.md``): what
``svp train`` writes into ``RUN/export`` at its end, here from any kept checkpoint. ``svp predict``
and ``svp eval`` take DIR as their ``--run-dir``; see ``docs/export.md`` and ``trainer.export``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from jobs import entry, options
from trainer.checkpoint import CheckpointError, model_config_from_dict, read_run_config
from trainer.export import CHECKPOINT_CHOICES, checkpoint_weights, write_export
from trainer.model import SegmentationMLLM, TrainableStateError


@dataclass(frozen=True)
class ExportOptions:
    """Which run and checkpoint; where the export goes."""

    run_dir: Path = field(metadata={"help": "run directory of `svp train`"})
    out: Path = field(metadata={"help": (
        "the export directory to write (llm/, svp.safetensors, config.json, README.md)")})
    checkpoint: str = field(default="last", metadata={"choices": CHECKPOINT_CHOICES, "help": (
        "last: the newest complete checkpoints/step_N; best: checkpoints/best, the best validation score (a run "
        "with --eval-every)")})


OPTIONS = (ExportOptions,)


def run(args: argparse.Namespace) -> int:
    given = options.build(ExportOptions, args)
    weights, step = checkpoint_weights(given.run_dir, given.checkpoint)
    model = SegmentationMLLM(model_config_from_dict(read_run_config(given.run_dir)["model"]))
    try:
        model.load_trainable_state_dict(load_file(str(weights)))
    except (TrainableStateError, SafetensorError, FileNotFoundError) as error:
        raise CheckpointError(f"{weights}: {error}; nothing exported") from None
    out = write_export(model, given.run_dir, given.out, given.checkpoint, step)
    print(f"export: {given.run_dir} step {step} ({given.checkpoint}) -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
