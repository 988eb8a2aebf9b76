"""What ``svp train`` accepts: the one config a run is built from and recorded as (its
``run_config.json`` is a recipe for the same run).

A module of its own, holding nothing but the dataclass, so that the loop, the checkpoint code that
checks a run's config on resume and the jobs that build one all import it from here and not from
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.vision_model import DEFAULT_MODEL_SEED
from trainer.data import DataConfig
from trainer.model import ModelConfig
from trainer.optimizers import OPTIMIZERS


@dataclass
class TrainConfig:
    """Everything ``svp train`` accepts; recorded whole in the run directory (its ``run_config.json``
    is a recipe for the same run: ``svp train --config``)."""

    shards: str | list[str] = field(metadata={"help": (
        "a directory (or s3://... prefix) written by `svp precompute`, or explicit shard URLs: a brace pattern "
        "'train-{000000..000009}.tar', a '::'-separated list, or pipe: commands; a run records the URLs a "
        "directory resolved to")})
    run_dir: Path = field(metadata={"help": "where logs, checkpoints and the export go"})
    train_split: str = field(default="train", metadata={"help": (
        "split read from the manifest when --shards is a directory")})
    train_splits: tuple[str, ...] | None = field(default=None, metadata={"help": (
        "train on a mixture of the (dataset, split)s of the output --shards names, comma-separated "
        "dataset/split[:weight] (refcoco/train,refcoco+/train,refcocog/train:2; weight 1 if omitted; a bare split "
        "in an output of one dataset): each sample is drawn from a source with probability proportional to its "
        "weight, and only that source's refs are targets, so an image shared with an evaluation split never "
        "trains on that split's refs; replaces --train-split")})
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = field(default=4, metadata={"help": "samples per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas, comma-separated"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS, "help": (
        "adamw: torch's AdamW, float32 moments (a checkpoint holds 12 bytes per trained parameter); adamw8bit: "
        "bitsandbytes' block-wise 8-bit AdamW (about 6 bytes per trained parameter, pip install 'svp[optim8bit]'); "
        "a run resumes only with the optimizer it started with")})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps before the cosine decay"})
    clip_grad: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0: off)"})
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "bf16", "fp16"), "help": (
        "Accelerate mixed precision; bf16 on recent GPUs")})
    save_every: int = field(default=100, metadata={"help": (
        "save the training state (trained weights, optimizer, schedule, RNG) every N steps")})
    log_every: int = field(default=10, metadata={"help": "log to TensorBoard every N steps"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per training process"})
    length_group: int = field(default=DataConfig.length_group, metadata={"help": (
        "batch items of similar length (visual tokens + words): each window of N batches' items is sorted by "
        "length, cut into batches and those shuffled, so little of a batch is padding; 1: no grouping")})
    seed: int = field(default=DEFAULT_MODEL_SEED, metadata={"help": "seed of model init and data order"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in --run-dir"})
    resume_from: Path | None = field(default=None, metadata={"metavar": "CHECKPOINT", "help": (
        "with --resume: this checkpoint directory rather than the last one in --run-dir (what Ray Train's "
        "restarts set)")})
    record_keys: bool = field(default=False, metadata={"help": (
        "write the sample keys each process trained on to RUN_DIR/keys_rank{N}.txt (audits data splits)")})
    eval_every: int = field(default=0, metadata={"help": (
        "validate every N steps and at the last: cIoU/gIoU of each --eval-splits split to TensorBoard and "
        "training_curves.png, the best so far kept as checkpoints/best (0: no validation)")})
    eval_splits: tuple[str, ...] = field(default=("val",), metadata={"help": (
        "comma-separated splits of --shards' manifest that --eval-every evaluates")})
    eval_max_samples: int | None = field(default=None, metadata={"help": (
        "samples per split per process at each validation; omitted: every sample")})
    best_metric: str = field(default="ciou", metadata={"choices": ("ciou", "giou"), "help": (
        "what makes checkpoints/best the best: this metric's mean over --eval-splits")})
    export: str = field(default="last", metadata={"choices": ("last", "best"), "help": (
        "which trained weights export/ holds (as `svp export --checkpoint` writes them): the last step's, or "
        "checkpoints/best's (needs --eval-every)")})

    def __post_init__(self) -> None:
        if self.resume_from is not None and not self.resume:
            raise ValueError("--resume-from needs --resume: without it a run starts from scratch and the checkpoint "
                             "it names would go unused")
        if self.export == "best" and self.eval_every <= 0:
            raise ValueError("--export best needs --eval-every N: without validation there is no best checkpoint")
