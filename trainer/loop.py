"""The training loop, readable in one sitting: Accelerate does devices, DDP, mixed precision,
gradient accumulation and checkpoint state; WebDataset streams the shards.

It runs unchanged under ``python -m jobs.train``, ``accelerate launch``, ``torchrun`` and inside
Ray Train's workers (each process reads its own disjoint shards: the loader splits by node and by
worker). A launcher that tracks progress itself (Ray Train) passes a ``report`` callback; the loop
knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from trainer.checkpoint import (
    CHECKPOINTS,
    ignored_saves,
    resume_point,
    save_checkpoint,
    save_trained_weights_only,
    write_run_config,
)
from trainer.config import TrainConfig
from trainer.data import DataError, ShardLoader, describe_shards, make_loader
from trainer.export import EXPORT, checkpoint_weights, write_export
from trainer.model import SegmentationMLLM
from trainer.optimizers import optimizer_class
from trainer.plots import training_curves
from trainer.stored_features import data_config as stored_data_config
from trainer.validation import Validation, eval_splits

log = logging.getLogger(__name__)


# Called on every process at each log or save step, with the step's metrics (always "step") and the
# checkpoint directory just saved, if any: how a launcher such as Ray Train follows the run.
Report = Callable[[dict[str, float], Path | None], None]


class _Progress:
    """The optimizer-step counter, saved and restored with the rest of the accelerator state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@dataclass
class Training:
    """Everything a run steps: built fresh, or restored from the last checkpoint with ``--resume``."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: _Progress
    trainable: list[torch.nn.Parameter]
    shards: dict


def setup_training(config: TrainConfig) -> Training:
    """Model, optimizer and schedule, prepared by Accelerate; the saved state loaded when resuming."""
    make_optimizer = optimizer_class(config.optimizer)  # a missing optional dependency: refused before any work
    # cpu=True where there is no GPU: that is what makes Accelerate pick gloo DDP under torchrun.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              log_with="tensorboard", project_dir=str(config.run_dir),
                              cpu=not torch.cuda.is_available())
    resume_from = resume_point(config)
    set_seed(config.seed, device_specific=True)
    model = SegmentationMLLM(config.model)
    shards = describe_shards(config.shards)
    if accelerator.is_main_process:
        write_run_config(config.run_dir, {"command": "train", **_jsonable(config), "data": {"train": shards},
                                          "world_size": accelerator.num_processes})
        accelerator.init_trackers("tensorboard")
        accelerator.print(model.describe())

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    # Accelerate steps a prepared scheduler once per process per optimizer step: scale to match.
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps * accelerator.num_processes,
                                                config.max_steps * accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    save_trained_weights_only(accelerator)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        ignored = ignored_saves(config.run_dir)
        accelerator.print(f"resumed from {resume_from} at step {progress.step}"
                          + (f"; {ignored}" if ignored else ""))
    return Training(accelerator, model, optimizer, scheduler, progress, trainable, shards)


def train(config: TrainConfig, report: Report | None = None) -> dict:
    """Train, checkpoint every ``save_every`` steps, export the trained parts; return final metrics."""
    run = setup_training(config)
    accelerator, model, optimizer, scheduler, progress = (run.accelerator, run.model, run.optimizer, run.scheduler,
                                                          run.progress)
    # The loader is not given to accelerator.prepare: WebDataset splits shards by node itself.
    data_config = stored_data_config(accelerator.unwrap_model(model), run.shards, seed=config.seed + progress.step,
                                     length_group=config.length_group)
    stored = [name for name, read in (("sam.npy", data_config.use_sam_embeddings),
                                      ("vision.npy", data_config.vision_features_shape is not None)) if read]
    accelerator.print(f"read from the shards instead of encoded at each step: {', '.join(stored) or 'nothing'}")
    # Not resampled: each process reads its own shards (disjoint across processes), pass after pass.
    loader = make_loader(config.shards, data_config, train=True, batch_size=config.batch_size,
                         num_workers=config.num_workers, resampled=False, sources=config.train_splits)
    validation = (Validation.of_run(config.run_dir, eval_splits(run.shards, config.eval_splits),
                                    config.eval_every, config.eval_max_samples, config.best_metric, config.batch_size)
                  if config.eval_every > 0 else None)
    keys_file = _keys_file(config, accelerator)
    skipped, window, started = 0, [], time.perf_counter()
    waited = 0.0  # seconds spent waiting for the loader since the last log
    model.train()
    bar = tqdm(total=config.max_steps, initial=progress.step, desc="train", disable=not accelerator.is_main_process)
    with contextlib.closing(_passes(loader, accelerator.process_index)) as batches:
        while progress.step < config.max_steps:
            asked = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - asked
            skipped += batch.get("skipped", 0)
            if keys_file is not None:
                keys_file.write("".join(f"{key}\n" for key in batch["keys"]))
            with accelerator.accumulate(model):
                output = model(batch)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and config.clip_grad > 0:
                    accelerator.clip_grad_norm_(run.trainable, config.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(_record(output, batch["gt_masks"]))
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            bar.update()
            metrics, checkpoint = {}, None
            if progress.step % config.log_every == 0 or progress.step == config.max_steps:
                metrics = _metrics(window, scheduler, skipped, started, waited)
                accelerator.log(metrics, step=progress.step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", ciou=f"{metrics['train_batch_ciou']:.2f}")
                window, started, waited = [], time.perf_counter(), 0.0
            if progress.step % config.save_every == 0 or progress.step == config.max_steps:
                checkpoint = config.run_dir / CHECKPOINTS / f"step_{progress.step:06d}"
                save_checkpoint(accelerator, checkpoint)
            if validation is not None and validation.due(progress.step, config.max_steps):
                scores = validation.scores(accelerator.unwrap_model(model), data_config)
                accelerator.log(scores, step=progress.step)
                metrics = {**metrics, **scores}
                validation.keep_if_best(accelerator, config.run_dir, progress.step, scores)
            if report is not None and (metrics or checkpoint is not None):
                report({"step": progress.step, **metrics}, checkpoint)
    bar.close()
    if keys_file is not None:
        keys_file.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained, step = accelerator.unwrap_model(model), progress.step
        if config.export == "best":
            weights, step = checkpoint_weights(config.run_dir, config.export)
            trained.load_trainable_state_dict(load_file(str(weights)))
        write_export(trained, config.run_dir, config.run_dir / EXPORT, config.export, step)
    accelerator.end_training()  # flushes and closes the event files the curves are read from
    if accelerator.is_main_process:
        training_curves(config.run_dir)
    return {"step": progress.step, "skipped_samples": skipped, "main_process": accelerator.is_main_process}


def _passes(loader: ShardLoader, rank: int) -> Iterator[dict]:
    """Pass after pass over this process's shards (reshuffled each pass), for as long as asked;
    closing it (or its raising) ends the loader's worker processes."""
    try:
        while True:
            batches = 0
            for batch in loader:
                batches += 1
                yield batch
            if batches == 0:
                raise DataError(f"process {rank} got no training batch: it needs at least one shard of "
                                f"batch_size samples (give at least processes x DataLoader workers shards)")
    finally:
        loader.close()


def _keys_file(config: TrainConfig, accelerator: Accelerator):
    if not config.record_keys:
        return None
    path = config.run_dir / f"keys_rank{accelerator.process_index}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")


_LOGGED = ("loss", "ce_loss", "bce_loss", "dice_loss", "region_loss", "intersection", "union", "tokens", "samples")


def _record(output, gt_masks: torch.Tensor) -> torch.Tensor:
    """What logging needs from one micro-batch, as one detached tensor left on the device: no
    host sync in the step (keeping the outputs themselves would also keep their graphs). Its
    entries are the values of ``_LOGGED``, in that order."""
    predicted = (output.mask_logits.detach() > 0).flatten(1)
    target = gt_masks.to(predicted.device).flatten(1) > 0.5
    tokens = output.num_visual_tokens
    values = {
        "loss": output.loss.detach(), "ce_loss": output.ce_loss, "bce_loss": output.bce_loss,
        "dice_loss": output.dice_loss, "region_loss": output.region_loss, "intersection": (predicted & target).sum(),
        "union": (predicted | target).sum(), "tokens": tokens.sum(),
        "samples": torch.tensor(len(tokens), device=tokens.device),
    }
    return torch.stack([values[name].float() for name in _LOGGED])


def _metrics(window: list[torch.Tensor], scheduler, skipped: int, started: float, waited: float) -> dict:
    """Means over the micro-batches since the last log; cIoU on the low-res training masks;
    ``data_wait_fraction``: the share of the time the loop waited for the loader (the loader
    starves the step when it is well above zero: give ``--num-workers``)."""
    totals = dict(zip(_LOGGED, torch.stack(window).sum(0).tolist()))
    mean = lambda name: totals[name] / len(window)  # noqa: E731
    elapsed = max(time.perf_counter() - started, 1e-9)
    return {
        "loss": mean("loss"), "ce_loss": mean("ce_loss"), "bce_loss": mean("bce_loss"), "dice_loss": mean("dice_loss"),
        "region_loss": mean("region_loss"),
        "train_batch_ciou": totals["intersection"] / max(totals["union"], 1.0),
        "visual_tokens": totals["tokens"] / totals["samples"], "lr": scheduler.get_last_lr()[0],
        "skipped_samples": skipped, "samples_per_s": totals["samples"] / elapsed,
        "data_wait_fraction": min(waited / elapsed, 1.0),
    }


def _jsonable(obj) -> dict:
    return json.loads(json.dumps(asdict(obj), default=str))
