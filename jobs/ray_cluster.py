"""Attaching to a Ray cluster and sizing worker requests against it, for every Ray job.

A request that the cluster can never grant (more GPUs than it has or can scale up to) is refused
here, naming the flags: Ray itself would keep the job waiting for those resources, forever where
no autoscaler can add them. Ray is imported inside the functions so that ``svp --help`` and the
commands that do not use Ray do not pay for importing it.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import SvpError

# Written by `ray up` on the head node: the cluster config, node types included.
LAUNCHER_CONFIG = Path("~/ray_bootstrap_config.yaml")
# Ray counts resources in units of 0.0001 (ray._raylet.RESOURCE_UNIT_SCALING).
RAY_RESOURCE_UNITS = 10_000
ACTOR_MAX_RESTARTS = -1  # a dead worker is always replaced ...
TASK_MAX_RETRIES = 2  # ... but an item that kills its worker three times is recorded as failed

T = TypeVar("T")
R = TypeVar("R")


class ClusterResourceError(SvpError, ValueError):
    """The job asks for resources the Ray cluster does not have and cannot get."""


@dataclass(frozen=True)
class RayOptions:
    """Ray: the cluster a job's workers run on, and the GPUs each of them asks for."""

    address: str | None = field(default=None, metadata={"help": (
        "Ray cluster address ('auto' attaches to a running cluster, as under `ray job submit`); omitted: start a "
        "local Ray")})
    gpus_per_worker: float | None = field(default=None, metadata={"help": (
        "GPUs per worker; omitted: 1 where the cluster has a GPU for every worker, 0 (CPU workers) where it has "
        "none, and where it has fewer, an equal share for the workers of precompute and predict (e.g. 0.5 for 2 "
        "workers on 1 GPU), which hold one model each")})


def connect(address: str | None) -> None:
    """Attach to ``address`` ('auto': the cluster a ``ray job submit`` job runs on) or, with None,
    start a local Ray; a process that already holds a Ray connection keeps it."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")


def capacity(resource: str) -> float:
    """How much of ``resource`` the cluster has now or can scale up to.

    An autoscaling cluster may have no GPU node yet when the job starts: what its node types allow
    counts too, where Ray publishes them (the private source Ray Train's own resource check reads)
    or where the cluster launcher left its config (see :func:`launcher_capacity`).
    """
    import ray
    from ray._private.state import state

    published = (state.get_max_resources_from_cluster_config() or {}).get(resource, 0)
    return max(ray.cluster_resources().get(resource, 0.0), float(published), launcher_capacity(resource))


def launcher_capacity(resource: str) -> float:
    """The most of ``resource`` the node types of a ``ray up`` cluster can hold, read from the config
    the cluster launcher leaves on the head node (where ``ray job submit`` runs the job; Ray Tune
    reads the same file to tell an autoscaling cluster); 0 where there is none."""
    path = LAUNCHER_CONFIG.expanduser()
    if not path.is_file():
        return 0.0
    config = yaml.safe_load(path.read_text())
    most_workers = config.get("max_workers", float("inf"))
    total = 0.0
    for name, node_type in config.get("available_node_types", {}).items():
        nodes = 1 if name == config.get("head_node_type") else min(node_type.get("max_workers", 0), most_workers)
        total += nodes * node_type.get("resources", {}).get(resource, 0)
    return total


def require(resource: str, per_worker: float, workers: int, request: str) -> None:
    """Refuse ``workers`` x ``per_worker`` of ``resource`` if the cluster cannot hold them;
    ``request`` names the flags that asked, for the message."""
    available = capacity(resource)
    if per_worker * workers > available:
        raise ClusterResourceError(f"{request} needs {per_worker * workers:g} {resource}, but the Ray cluster has "
                                   f"at most {available:g}; lower them or add nodes with {resource}")


def gpus_per_worker(requested: float | None, workers: int, workers_flag: str, share: bool = False) -> float:
    """``--gpus-per-worker``: by default 1 where the cluster has a GPU for every worker, else 0 (CPU
    workers) where it has none.

    On a cluster with fewer GPUs than workers the default depends on ``share``: workers that may
    share a GPU (one model each, as the precompute job's) get an equal fraction, as many per GPU as
    it takes to seat them all (see :func:`shared_gpu_fraction`), and the choice is printed; workers
    that may not (NCCL refuses two training ranks on one GPU) keep the one-GPU default, which is then
    refused like an explicit value: N one-GPU workers on a cluster with fewer GPUs would wait for
    resources forever, so they are refused, naming the flags to change.
    """
    default = requested is None
    if requested is None:
        gpus = math.floor(capacity("GPU"))
        requested = 1.0 if gpus >= 1 else 0.0
        if share and 1 <= gpus < workers:
            requested = shared_gpu_fraction(gpus, workers)
            print(f"{workers_flag} {workers} on a cluster with {gpus} GPU{'s' if gpus > 1 else ''}: the workers share "
                  f"them, {requested:g} GPU each ({math.ceil(workers / gpus)} per GPU); --gpus-per-worker chooses",
                  file=sys.stderr)
    if requested < 0:
        raise ClusterResourceError(f"--gpus-per-worker must be >= 0, got {requested:g}")
    flag = f"--gpus-per-worker {requested:g}{' (the default on a cluster with GPUs)' if default else ''}"
    require("GPU", requested, workers, f"{workers_flag} {workers} x {flag}")
    return requested


def shared_gpu_fraction(gpus: int, workers: int) -> float:
    """The GPU fraction that seats ``workers`` on ``gpus`` whole GPUs: 1/k with k = ceil(workers/gpus)
    workers per GPU, rounded down to Ray's resource precision (0.0001) so that k of them fit one GPU.

    Not ``gpus / workers``: Ray places a fractional request on one GPU, so 3 workers of 2/3 GPU
    each would find room for only 2 of them on 2 GPUs, and the third would wait forever.
    """
    per_gpu = math.ceil(workers / gpus)
    return math.floor(RAY_RESOURCE_UNITS / per_gpu) / RAY_RESOURCE_UNITS


def worker_device(job: str) -> str:
    """CUDA where Ray gave this worker a GPU that torch can use, else the CPU.

    Ray's GPUs are declared resources: a node started with ``--num-gpus`` (or ``ray.init(num_gpus=)``)
    may advertise GPUs that torch cannot see (no driver, a test's declared GPU). Such a worker
    says so and runs on the CPU instead of failing all its work on CUDA.
    """
    import ray
    import torch

    assigned = ray.get_gpu_ids()
    if not assigned:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs: cuda:0 is this worker's
    print(f"{job} worker: Ray assigned GPU {assigned} but torch sees no CUDA device here; running on the CPU",
          file=sys.stderr)
    return "cpu"


def on_actors(worker: type, method: str, items: Sequence[T], workers: int, gpus: float, env: dict[str, str],
              failed: Callable[[T, str], R]) -> Iterator[R]:
    """Each of ``items`` to whichever of ``workers`` actors of class ``worker`` is free (each holds one
    model, built in its ``__init__``, and runs ``method`` on one item at a time); the results as they
    come. An actor that dies is restarted and its item retried; an item that kills it
    ``TASK_MAX_RETRIES + 1`` times yields ``failed(item, reason)`` and the rest goes on. ``env``: the
    variables the actors need from the driver's environment (a running cluster's workers do not
    inherit it). The actors are killed at the end, or when the caller stops early."""
    import ray

    if not items:
        return
    actor_class = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=ACTOR_MAX_RESTARTS,
                             max_task_retries=TASK_MAX_RETRIES)(worker)
    options = {"runtime_env": {"env_vars": env}} if env else {}
    actors = [actor_class.options(**options).remote() for _ in range(min(workers, len(items)))]
    pending, in_flight = deque(items), {}

    def submit(actor: Any) -> None:
        if pending:
            item = pending.popleft()
            in_flight[getattr(actor, method).remote(item)] = (actor, item)

    try:
        for actor in actors:
            submit(actor)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, item = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                result = failed(item, f"its worker failed {TASK_MAX_RETRIES + 1} times on it: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}")
            submit(actor)
            yield result
    finally:
        for actor in actors:
            ray.kill(actor)
