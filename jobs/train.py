"""``svp train`` / ``python -m jobs.train``: fine-tune the projector, LoRA and mask decoder from shards.

Runs unchanged as a single process, under ``accelerate launch`` (any number of processes or
nodes), under ``torchrun``, and with ``--ray-workers N`` in N Ray Train workers (TorchTrainer) on a
Ray cluster; every process streams its own disjoint shards. The run directory gets
``run_config.json`` (the full resolved config), TensorBoard logs, ``checkpoints/step_N``
(``--resume`` continues from the last one) and ``export/`` (what ``svp export`` writes: a PEFT
adapter, svp's trained parts, a model card).

Under Ray the run directory is also the Ray Train run's storage (``RunConfig(storage_path, name)``):
the workers write each checkpoint there and report it to Ray where it lies, so Ray knows every
checkpoint (``Result.checkpoint``, restarts after a worker failure) and the layout is the same as
under every other launcher. On a multi-node cluster it must be on storage every node mounts.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from jobs import entry, options, ray_cluster
from trainer.checkpoint import resume_point
from trainer.config import TrainConfig
from trainer.data import shard_urls
from trainer.loop import train
from trainer.optimizers import optimizer_class

# The Ray options that mean nothing without --ray-workers; None unless given, so that a run
# without Ray can refuse them rather than ignore them. --cpus-per-worker defaults to this under Ray.
RAY_WORKER_FLAGS = ("address", "gpus_per_worker", "cpus_per_worker")
CPUS_PER_WORKER = 1.0


@dataclass(frozen=True)
class RayTrainOptions:
    """Ray Train: with --ray-workers, the loop runs in Ray Train workers on a Ray cluster; --run-dir,
    --shards and model paths must then be readable on every node."""

    ray_workers: int = field(default=0, metadata={"help": (
        "training processes as Ray Train workers (TorchTrainer); 0: no Ray, train in this process (or in each "
        "process of accelerate launch / torchrun)")})
    cpus_per_worker: float | None = field(default=None, metadata={"help": (
        f"CPUs per Ray worker; omitted: {CPUS_PER_WORKER:g} (give more with --num-workers DataLoader workers)")})
    max_failures: int = field(default=0, metadata={"help": (
        "times Ray Train restarts the workers after a failure, from the last checkpoint")})


OPTIONS = (TrainConfig, RayTrainOptions, ray_cluster.RayOptions)
RECIPES = True


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config as the options describe it, the shards not yet resolved (see :func:`resolve_shards`)."""
    return options.build(TrainConfig, args)


def resolve_shards(config: TrainConfig) -> TrainConfig:
    """``config`` with a shard root resolved to the URLs of its train split, or of the shards that hold
    any --train-splits source, as the run records them; URLs (a recorded run's list among them) stay
    as they are (the loader finds each source's shards among them by their manifest)."""
    if isinstance(config.shards, str):
        return replace(config, shards=shard_urls(config.shards, config.train_split, config.train_splits))
    return config


def run(args: argparse.Namespace) -> int:
    given = [f"--{name.replace('_', '-')}" for name in RAY_WORKER_FLAGS if getattr(args, name) is not None]
    if given and not args.ray_workers:
        raise options.OptionError(f"Ray Train worker options without --ray-workers: {', '.join(given)}; they need "
                                  f"--ray-workers N (without it the run uses no Ray and would ignore them)")
    config = resolve_shards(train_config(args))
    workers = options.build(RayTrainOptions, args)
    result = (_train_on_ray(config, workers, options.build(ray_cluster.RayOptions, args)) if workers.ray_workers
              else train(config))
    if not result["main_process"]:
        return 0
    print(f"train: {result['step']} steps, {result['skipped_samples']} corrupt samples skipped; "
          f"export: {config.run_dir / 'export'}")
    return 0


def _train_on_ray(config: TrainConfig, workers: RayTrainOptions, cluster: ray_cluster.RayOptions) -> dict:
    """Run the loop in ``--ray-workers`` Ray Train workers; rank 0's result.

    TorchTrainer sets up torch.distributed (gloo on CPU, NCCL on GPU) and the torchrun variables,
    which Accelerate picks up as it does under torchrun. What Ray would otherwise only find out
    while it waits (a run directory that cannot start, GPUs the cluster lacks) is refused first.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers.ray_workers < 0:
        raise ray_cluster.ClusterResourceError(f"--ray-workers must be >= 0, got {workers.ray_workers}")
    config = replace(config, run_dir=config.run_dir.absolute())  # Ray's storage path; the workers' run dir
    resume_point(config)  # raises for a run directory the workers would refuse
    optimizer_class(config.optimizer)  # and for an optimizer they could not build
    ray_cluster.connect(cluster.address)
    gpus = ray_cluster.gpus_per_worker(cluster.gpus_per_worker, workers.ray_workers, "--ray-workers")
    cpus = CPUS_PER_WORKER if workers.cpus_per_worker is None else workers.cpus_per_worker
    ray_cluster.require("CPU", cpus, workers.ray_workers,
                        f"--ray-workers {workers.ray_workers} x --cpus-per-worker {cpus:g}")
    # Ray Train would start each worker in a directory of its own; like every other Ray worker (and
    # like `svp train`), ours resolve relative paths from the directory the job runs in.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"train": config},
        scaling_config=ScalingConfig(num_workers=workers.ray_workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cpus, "GPU": gpus}),
        run_config=RunConfig(name=config.run_dir.name, storage_path=str(config.run_dir.parent),
                             failure_config=FailureConfig(max_failures=workers.max_failures)),
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
