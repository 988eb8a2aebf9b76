"""Validation while training: a run that goes wrong should say so at step 500, not at the end.

Every ``--eval-every`` steps the loop evaluates the model on ``--eval-splits`` (at most
``--eval-max-samples`` samples each, per process) with :func:`trainer.evaluate.evaluate`, the code
``svp eval`` runs, and logs cIoU and gIoU per split as ``eval_ciou/SPLIT`` and ``eval_giou/SPLIT``:
TensorBoard and ``training_curves.png`` show them beside the loss. The best score so far (the mean
of ``--best-metric`` over the splits) keeps its state in ``checkpoints/best``, written by the same
atomic save as the step checkpoints, and ``checkpoints/best.json`` says which step it holds and
why, so that a resumed run keeps comparing against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from pipeline.shards import read_manifest
from trainer.checkpoint import CHECKPOINTS, save_checkpoint
from trainer.data import DataConfig, DataError
from trainer.evaluate import EvalSplit, evaluate, evaluation_splits

BEST = "best"  # checkpoints/best: the training state of the best validation so far
BEST_RECORD = "best.json"


def eval_splits(shards: dict, names: tuple[str, ...]) -> dict[str, EvalSplit]:
    """What each of ``names`` reads, by the manifest of the precompute output the training shards
    come from (``shards``: :func:`trainer.data.describe_shards` of them)."""
    manifest_url = shards.get("manifest")
    if manifest_url is None:
        raise DataError("--eval-splits needs the training shards to come from one `svp precompute` output: its "
                        "manifest names each split's shards")
    root = manifest_url.rsplit("/", 1)[0]
    return evaluation_splits(root, read_manifest(root), names)


@dataclass
class Validation:
    """The validation of one run: when it is due, what it scores, and the best score so far."""

    splits: dict[str, EvalSplit]
    every: int
    max_samples: int | None
    metric: str  # "ciou" or "giou"
    batch_size: int
    best: float | None = None

    @classmethod
    def of_run(cls, run_dir: Path, splits: dict[str, EvalSplit], every: int, max_samples: int | None,
               metric: str, batch_size: int) -> Validation:
        """The run's validation, with the best score a previous part of the run recorded, if any."""
        record = run_dir / CHECKPOINTS / BEST_RECORD
        best = json.loads(record.read_text())["score"] if record.is_file() else None
        return cls(splits, every, max_samples, metric, batch_size, best)

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last)

    def scores(self, model: torch.nn.Module, data_config: DataConfig) -> dict[str, float]:
        """cIoU and gIoU per split as logged (``eval_ciou/SPLIT``, ...), and ``eval_score``, the
        mean of the chosen metric over the splits; the model is back in training mode after."""
        results = evaluate(model, self.splits, data_config, batch_size=self.batch_size,
                           max_samples=self.max_samples)
        model.train()
        logged = {f"eval_{key}/{split}": result[key] for split, result in results.items() for key in ("ciou", "giou")}
        logged["eval_score"] = sum(result[self.metric] for result in results.values()) / len(results)
        return logged

    def keep_if_best(self, accelerator: Accelerator, run_dir: Path, step: int, scores: dict[str, float]) -> bool:
        """Save the training state as ``checkpoints/best`` if ``scores`` beat the best so far."""
        if self.best is not None and scores["eval_score"] <= self.best:
            return False
        self.best = scores["eval_score"]
        save_checkpoint(accelerator, run_dir / CHECKPOINTS / BEST)
        if accelerator.is_main_process:
            record = {"step": step, "metric": self.metric, "splits": list(self.splits), "score": self.best,
                      "scores": scores}
            (run_dir / CHECKPOINTS / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return True
