"""``svp train`` / ``python -m jobs.train``: fine-tune the projector, LoRA and mask decoder from shards.

Runs unchanged as a single process, under ``accelerate launch`` (any number of processes or
nodes), under ``torchrun``, and with ``--ray-workers N`` in N Ray Train workers (TorchTrainer) on a
Ray cluster; every process streams its own disjoint shards. The run directory gets
``run_config.json`` (the full resolved config), TensorBoard logs, ``checkpoints/step_N``
(``--resume`` continues from the last one) and ``export/`` (the trained parts as safetensors).

Under Ray the run directory is also the Ray Train run's storage (``RunConfig(storage_path, name)``):
the workers write each checkpoint there and report it to Ray where it lies, so Ray knows every
checkpoint (``Result.checkpoint``, restarts after a worker failure) and the layout is the same as
under every other launcher. On a multi-node cluster it must be on storage every node mounts.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from jobs import entry, ray_cluster
from pipeline.shards import ManifestError, read_manifest, split_shard_urls
from trainer.checkpoint import CheckpointError
from trainer.data import DataError
from trainer.loop import TrainConfig, resume_point, train
from trainer.model import LLM_TRAINING, PROJECTORS, ModelConfig, ModelLoadError, ProjectorConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model flags, shared by every command that builds a model from scratch."""
    model = parser.add_argument_group("model")
    model.add_argument("--llm", default="tiny",
                       help="causal LM: an HF model id or local directory, or 'tiny' (random tiny LM for tests/demo)")
    model.add_argument("--vision", default="tiny",
                       help="vision encoder: an HF id or local directory (e.g. facebook/dinov2-base), or 'tiny'")
    model.add_argument("--vision-size", type=int, default=None,
                       help="square input size of the vision encoder; default: the encoder's own, from its image "
                            "processor config (224 for DINOv2 and tiny, 336 for CLIP ViT-L/14-336, SigLIP's resize)")
    model.add_argument("--sam-checkpoint", default=None,
                       help="official SAM .pth for the mask head; omitted: a random tiny SAM (tests/demo only)")
    model.add_argument("--sam-model", default="tiny", help="architecture of --sam-checkpoint: vit_h, vit_l, vit_b or tiny")
    model.add_argument("--projector", choices=PROJECTORS, default="svp",
                       help="svp: one token per superpixel; pool: fixed-grid pooling; mlp: one token per patch")
    model.add_argument("--sspe", action=argparse.BooleanOptionalAction, default=True,
                       help="svp: superpixel positional embedding (shape and place of each superpixel)")
    model.add_argument("--ssa", action=argparse.BooleanOptionalAction, default=True,
                       help="svp: superpixel aggregator (detail inside, context outside each superpixel)")
    model.add_argument("--ssa-layers", type=int, default=1, help="svp: aggregator blocks; default 1")
    model.add_argument("--pool-tokens", type=int, default=16,
                       help="pool: token budget per image, realised as the closest near-square grid; default 16")
    model.add_argument("--lora-r", type=int, default=8, help="LoRA rank; default 8")
    model.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha; default 16")
    model.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout; default 0.05")
    model.add_argument("--lora-targets", default="q_proj,v_proj",
                       help="comma-separated LLM modules that get LoRA, or all-linear (every linear layer of the "
                            "decoder but the LM head, as peft names it); default q_proj,v_proj")
    model.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute the LLM's activations in the backward pass (HF gradient checkpointing, "
                            "non-reentrant): less activation memory for a second forward pass of the LLM in each "
                            "step; for long sequences or large batches on a GPU")
    model.add_argument("--llm-training", choices=LLM_TRAINING, default="lora",
                       help="lora: LoRA adapters on --lora-targets, the LLM frozen (default; for pretrained LLMs); "
                            "full: every LLM weight trains, in float32, no LoRA (for a random-initialised LLM such "
                            "as tiny, which has nothing for adapters to adapt)")
    model.add_argument("--region-prompt", action=argparse.BooleanOptionalAction, default=True,
                       help="[SEG] also scores every visual token, and the tokens' image regions (superpixels, or "
                            "grid cells for mlp/pool) painted with those scores become SAM's mask prompt; "
                            "--no-region-prompt: the [SEG] sparse prompt alone")
    model.add_argument("--region-weight", type=float, default=1.0,
                       help="weight of the region prompt's BCE against the target mask; default 1.0")
    model.add_argument("--ce-weight", type=float, default=1.0, help="weight of the text cross-entropy; default 1.0")
    model.add_argument("--bce-weight", type=float, default=2.0, help="weight of the mask BCE; default 2.0")
    model.add_argument("--dice-weight", type=float, default=0.5, help="weight of the mask Dice loss; default 0.5")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        llm=args.llm, vision=args.vision, vision_size=args.vision_size, sam_checkpoint=args.sam_checkpoint,
        sam_model=args.sam_model,
        projector=ProjectorConfig(kind=args.projector, pool_tokens=args.pool_tokens, sspe=args.sspe, ssa=args.ssa,
                                  ssa_layers=args.ssa_layers),
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(t for t in args.lora_targets.split(",") if t), llm_training=args.llm_training,
        region_prompt=args.region_prompt, region_weight=args.region_weight,
        gradient_checkpointing=args.gradient_checkpointing,
        ce_weight=args.ce_weight, bce_weight=args.bce_weight, dice_weight=args.dice_weight, seed=args.seed,
    )


# The Ray group's flags that mean nothing without --ray-workers; None unless given, so that a run
# without Ray can refuse them rather than ignore them. --cpus-per-worker defaults to this under Ray.
RAY_WORKER_FLAGS = ("address", "gpus_per_worker", "cpus_per_worker")
CPUS_PER_WORKER = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--shards", required=True,
                      help="a directory (or s3://... prefix) written by `svp precompute`, or explicit shard URLs: "
                           "a brace pattern 'train-{000000..000009}.tar', a '::'-separated list, or pipe: commands")
    data.add_argument("--train-split", default="train", help="split read from the manifest when --shards is a directory")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per training process")
    data.add_argument("--length-group", type=int, default=TrainConfig.length_group,
                      help="batch items of similar length (visual tokens + words): each window of N batches' items "
                           "is sorted by length, cut into batches and those shuffled, so little of a batch is "
                           f"padding; 1: no grouping; default {TrainConfig.length_group}")
    add_model_arguments(parser)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--run-dir", required=True, type=Path, help="where logs, checkpoints and the export go")
    optim.add_argument("--batch-size", type=int, default=4, help="samples per process per micro-batch; default 4")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step; default 1")
    optim.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate; default 3e-4")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay; default 0")
    optim.add_argument("--max-steps", type=int, default=200, help="optimizer steps; default 200")
    optim.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps before the cosine decay")
    optim.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (0: off); default 1.0")
    optim.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                       help="Accelerate mixed precision; bf16 on recent GPUs")
    optim.add_argument("--save-every", type=int, default=100, help="save the full training state every N steps")
    optim.add_argument("--log-every", type=int, default=10, help="log to TensorBoard every N steps")
    optim.add_argument("--seed", type=int, default=0, help="seed of model init and data order; default 0")
    optim.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    optim.add_argument("--record-keys", action="store_true",
                       help="write the sample keys each process trained on to RUN_DIR/keys_rank{N}.txt (audits data splits)")
    ray = parser.add_argument_group("Ray Train", "with --ray-workers, the loop runs in Ray Train workers on a Ray "
                                    "cluster; --run-dir, --shards and model paths must then be readable on every node")
    ray.add_argument("--ray-workers", type=int, default=0,
                     help="training processes as Ray Train workers (TorchTrainer); 0 (default): no Ray, train in this "
                          "process (or in each process of accelerate launch / torchrun)")
    ray.add_argument("--gpus-per-worker", type=float, default=None,
                     help="GPUs per Ray worker; default 1 if the Ray cluster has GPUs (or can scale up to some), "
                          "else 0 (CPU workers, gloo)")
    ray.add_argument("--cpus-per-worker", type=float, default=None,
                     help=f"CPUs per Ray worker; default {CPUS_PER_WORKER:g} (give more with --num-workers DataLoader "
                          "workers)")
    ray.add_argument("--max-failures", type=int, default=0,
                     help="times Ray Train restarts the workers after a failure, from the last checkpoint; default 0")
    ray.add_argument("--address", default=None,
                     help="Ray cluster address ('auto' attaches to a running cluster, as under `ray job submit`); "
                          "omitted: start a local Ray")


def train_urls(shards: str, split: str) -> list[str] | str:
    """A shard root resolves through its manifest; anything else is passed on as URLs."""
    if shards.endswith(".tar") or "{" in shards or "::" in shards or shards.startswith("pipe:"):
        return shards
    return split_shard_urls(shards, read_manifest(shards), split)


def run(args: argparse.Namespace) -> int:
    given = [f"--{name.replace('_', '-')}" for name in RAY_WORKER_FLAGS if getattr(args, name) is not None]
    if given and not args.ray_workers:
        print(f"svp train: error: Ray Train worker options without --ray-workers: {', '.join(given)}; they need "
              f"--ray-workers N (without it the run uses no Ray and would ignore them)", file=sys.stderr)
        return 2
    try:
        config = TrainConfig(
            train_shards=train_urls(args.shards, args.train_split), run_dir=args.run_dir, model=model_config(args),
            batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
            max_steps=args.max_steps, warmup_steps=args.warmup_steps, clip_grad=args.clip_grad,
            mixed_precision=args.mixed_precision, save_every=args.save_every, log_every=args.log_every,
            num_workers=args.num_workers, length_group=args.length_group, seed=args.seed, resume=args.resume,
            record_keys=args.record_keys,
        )
        result = _train_on_ray(config, args) if args.ray_workers else train(config)
    except (ManifestError, DataError, CheckpointError, ModelLoadError, ray_cluster.ClusterResourceError) as exc:
        print(f"svp train: error: {exc}", file=sys.stderr)
        return 2
    if not result["main_process"]:
        return 0
    print(f"train: {result['step']} steps, {result['skipped_samples']} corrupt samples skipped; "
          f"export: {args.run_dir / 'export'}")
    return 0


def _train_on_ray(config: TrainConfig, args: argparse.Namespace) -> dict:
    """Run the loop in ``--ray-workers`` Ray Train workers; rank 0's result.

    TorchTrainer sets up torch.distributed (gloo on CPU, NCCL on GPU) and the torchrun variables,
    which Accelerate picks up as it does under torchrun. What Ray would otherwise only find out
    while it waits (a run directory that cannot start, GPUs the cluster lacks) is refused first.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if args.ray_workers < 0:
        raise ray_cluster.ClusterResourceError(f"--ray-workers must be >= 0, got {args.ray_workers}")
    config = replace(config, run_dir=config.run_dir.absolute())  # Ray's storage path; the workers' run dir
    resume_point(config)  # raises for a run directory the workers would refuse
    ray_cluster.connect(args.address)
    gpus = ray_cluster.gpus_per_worker(args.gpus_per_worker, args.ray_workers, "--ray-workers")
    cpus = CPUS_PER_WORKER if args.cpus_per_worker is None else args.cpus_per_worker
    ray_cluster.require("CPU", cpus, args.ray_workers, f"--ray-workers {args.ray_workers} x --cpus-per-worker {cpus:g}")
    # Ray Train would start each worker in a directory of its own; like every other Ray worker (and
    # like `svp train`), ours resolve relative paths from the directory the job runs in.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"train": config},
        scaling_config=ScalingConfig(num_workers=args.ray_workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cpus, "GPU": gpus}),
        run_config=RunConfig(name=config.run_dir.name, storage_path=str(config.run_dir.parent),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    return trainer.fit().return_value


def _ray_worker(loop_config: dict) -> dict:
    """One Ray Train worker: the loop every launcher runs, reporting each log and save step to Ray.

    After a worker failure Ray starts the workers again and ``get_checkpoint`` names the last
    checkpoint that every worker reported: the run continues from there.
    """
    import ray.train

    config = loop_config["train"]
    restored = ray.train.get_checkpoint()
    if restored is not None:
        config = replace(config, resume=True, resume_from=Path(restored.path))
    return train(config, report=_report_to_ray)


def _report_to_ray(metrics: dict[str, float], checkpoint: Path | None) -> None:
    """Hand one log or save step to Ray Train (every worker calls this at the same steps).

    The checkpoint already lies in the Ray run's storage, written there by the workers and complete
    (the loop reports it only once renamed from its unfinished name), so it is registered where it
    is (NO_UPLOAD) rather than copied.
    """
    import ray.train

    if checkpoint is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
