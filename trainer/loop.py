"""The training loop, readable in one sitting: Accelerate does devices, DDP, mixed precision,
gradient accumulation and checkpoint state; WebDataset streams the shards.

It runs unchanged under ``python -m jobs.train``, ``accelerate launch``, ``torchrun`` and inside
Ray Train's workers (each process reads its own disjoint shards: the loader splits by node and by
worker). A launcher that tracks progress itself (Ray Train) passes a ``report`` callback; the loop
knows nothing of Ray.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from pipeline.superpixels.base import file_sha256
from trainer.checkpoint import CheckpointError, check_same_model, export_trained, read_run_config, write_run_config
from trainer.data import DataConfig, DataError, describe_shards, make_loader
from trainer.model import ModelConfig, SegmentationMLLM
from trainer.plots import training_curves

CHECKPOINTS = "checkpoints"
log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")
# A save in progress: renamed to step_N once every process has written its part (see _save_checkpoint).
_UNFINISHED = ".tmp"
# A step_N being replaced, renamed out of the way first so that no half-deleted step_N is ever seen.
_REPLACED = ".replaced"
_UNFINISHED_DIR = re.compile(rf"^step_\d+{re.escape(_UNFINISHED)}$")


@dataclass
class TrainConfig:
    """Everything ``svp train`` accepts; recorded whole in the run directory."""

    train_shards: str
    run_dir: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_steps: int = 200
    warmup_steps: int = 20
    clip_grad: float = 1.0
    mixed_precision: str = "no"
    save_every: int = 100
    log_every: int = 10
    num_workers: int = 0
    length_group: int = DataConfig.length_group
    seed: int = 0
    resume: bool = False
    resume_from: Path | None = None  # with resume: this checkpoint rather than the last one in run_dir
    record_keys: bool = False


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


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest complete checkpoint, or None.

    Only a finished save is named ``step_N`` (``_save_checkpoint`` renames it so at the end), so the
    name alone tells complete from cut short; a ``step_N.tmp`` is never returned.
    """
    steps = [(int(m.group(1)), p) for p in (run_dir / CHECKPOINTS).glob("step_*") if (m := _STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def unfinished_checkpoints(run_dir: Path) -> list[Path]:
    """Saves that never finished (a process killed mid-save), so that resume can name what it ignores."""
    return sorted(p for p in (run_dir / CHECKPOINTS).glob("step_*") if _UNFINISHED_DIR.match(p.name))


def _ignored(run_dir: Path) -> str:
    """The unfinished saves, as the resume message and error name them ('' when there are none)."""
    unfinished = unfinished_checkpoints(run_dir)
    return f"ignored unfinished checkpoint saves: {', '.join(p.name for p in unfinished)}" if unfinished else ""


def _save_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """Save the full training state as ``checkpoint`` such that it only ever appears complete.

    Every process writes into ``step_N.tmp`` (the main process model, optimizer and schedule; each
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
    # cpu=True where there is no GPU: that is what makes Accelerate pick gloo DDP under torchrun.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              log_with="tensorboard", project_dir=str(config.run_dir), cpu=not torch.cuda.is_available())
    resume_from = resume_point(config)
    set_seed(config.seed, device_specific=True)
    model = SegmentationMLLM(config.model)
    shards = describe_shards(config.train_shards)
    if accelerator.is_main_process:
        write_run_config(config.run_dir, {"command": "train", **_jsonable(config), "data": {"train": shards},
                                          "world_size": accelerator.num_processes})
        accelerator.init_trackers("tensorboard")
        accelerator.print(model.describe())

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    # Accelerate steps a prepared scheduler once per process per optimizer step: scale to match.
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps * accelerator.num_processes,
                                                config.max_steps * accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        ignored = _ignored(config.run_dir)
        accelerator.print(f"resumed from {resume_from} at step {progress.step}"
                          + (f"; {ignored}" if ignored else ""))
    return Training(accelerator, model, optimizer, scheduler, progress, trainable, shards)


def train(config: TrainConfig, report: Report | None = None) -> dict:
    """Train, checkpoint every ``save_every`` steps, export the trained parts; return final metrics."""
    run = setup_training(config)
    accelerator, model, optimizer, scheduler, progress = (run.accelerator, run.model, run.optimizer, run.scheduler,
                                                          run.progress)
    # The loader is not given to accelerator.prepare: WebDataset splits shards by node itself.
    data_config = DataConfig(**accelerator.unwrap_model(model).data_config_fields(), seed=config.seed + progress.step,
                             length_group=config.length_group,
                             use_sam_embeddings=embeddings_match(run.shards, config.model))
    # Not resampled: each process reads its own shards (disjoint across processes), pass after pass.
    loader = make_loader(config.train_shards, data_config, train=True, batch_size=config.batch_size,
                         num_workers=config.num_workers, resampled=False)
    keys_file = _keys_file(config, accelerator)
    skipped, window, started = 0, [], time.perf_counter()
    waited = 0.0  # seconds spent waiting for the loader since the last log
    model.train()
    bar = tqdm(total=config.max_steps, initial=progress.step, desc="train", disable=not accelerator.is_main_process)
    batches = _passes(loader, accelerator.process_index)
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
            _save_checkpoint(accelerator, checkpoint)
        if report is not None and (metrics or checkpoint is not None):
            report({"step": progress.step, **metrics}, checkpoint)
    bar.close()
    if keys_file is not None:
        keys_file.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_trained(accelerator.unwrap_model(model), config.run_dir / "export", config.model)
    accelerator.end_training()  # flushes and closes the event files the curves are read from
    if accelerator.is_main_process:
        training_curves(config.run_dir)
    return {"step": progress.step, "skipped_samples": skipped, "main_process": accelerator.is_main_process}


def embeddings_match(shards: dict, model: ModelConfig) -> bool:
    """Whether the shards' ``sam.npy`` came from the very SAM this model decodes with.

    An embedding of another SAM has the right shape and the wrong meaning: the mask decoder would
    train on it without complaint. The manifest records the SAM checkpoint's sha256, so compare.
    """
    stored = shards.get("config", {}).get("sam", {}).get("checkpoint_sha256")
    if not stored or not shards.get("config", {}).get("store_sam_embeddings"):
        return False
    if model.sam_checkpoint is None or file_sha256(model.sam_checkpoint) != stored:
        log.warning("the shards' sam.npy come from another SAM checkpoint than --sam-checkpoint: "
                    "ignoring them and running the SAM encoder at every step")
        return False
    return True


def _passes(loader, rank: int):
    """Pass after pass over this process's shards (reshuffled each pass), for as long as asked."""
    while True:
        batches = 0
        for batch in loader:
            batches += 1
            yield batch
        if batches == 0:
            raise DataError(f"process {rank} got no training batch: it needs at least one shard of "
                            f"batch_size samples (give at least processes x DataLoader workers shards)")


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
        ignored = _ignored(config.run_dir)
        raise CheckpointError(f"--resume: no complete checkpoint under {config.run_dir / CHECKPOINTS}"
                              + (f" ({ignored})" if ignored else ""))
    saved = read_run_config(config.run_dir)
    check_same_model(saved.get("model", {}), _jsonable(config.model), f"--resume checkpoint {checkpoint}")
    return checkpoint


def _keys_file(config: TrainConfig, accelerator: Accelerator):
    if not config.record_keys:
        return None
    path = config.run_dir / f"keys_rank{accelerator.process_index}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")


_LOGGED = ("loss", "ce_loss", "bce_loss", "dice_loss", "region_loss", "intersection", "union", "tokens", "samples")


def _record(output, gt_masks: torch.Tensor) -> torch.Tensor:
    """What logging needs from one micro-batch, as one detached tensor left on the device: no
    host sync in the step (keeping the outputs themselves would also keep their graphs)."""
    predicted = (output.mask_logits.detach() > 0).flatten(1)
    target = gt_masks.to(predicted.device).flatten(1) > 0.5
    tokens = output.num_visual_tokens
    return torch.stack([output.loss.detach().float(), output.ce_loss.float(), output.bce_loss.float(),
                        output.dice_loss.float(), output.region_loss.float(), (predicted & target).sum().float(),
                        (predicted | target).sum().float(), tokens.sum().float(),
                        torch.tensor(float(len(tokens)), device=tokens.device)])


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
