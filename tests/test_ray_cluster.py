"""jobs.ray_cluster against a real Ray that declares GPUs (Ray schedules by declared resources, so no
GPU is needed): the default --gpus-per-worker shares fewer GPUs than workers where the workers may
share one, and is checked like an explicit value where they may not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.ray_cluster import shared_gpu_fraction

SCRIPT = """
import ray
from jobs import ray_cluster
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR")
for workers in (1, 2, 3, 5):
    print(f"shared {workers}:", ray_cluster.gpus_per_worker(None, workers, "--workers", share=True))
print("unshared 2:", ray_cluster.gpus_per_worker(None, 2, "--ray-workers"))
for requested, workers, share in ((None, 3, False), (1, 3, True)):
    try:
        ray_cluster.gpus_per_worker(requested, workers, "--workers", share=share)
    except ray_cluster.ClusterResourceError as error:
        print("refused:", error)
"""


@pytest.fixture(scope="module")
def two_gpu_ray() -> subprocess.CompletedProcess:
    # A process of its own: the suite's Ray (no GPUs) may already be running in this one.
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)


def test_default_shares_fewer_gpus_than_workers_and_says_so(two_gpu_ray) -> None:
    lines = two_gpu_ray.stdout.splitlines()
    assert [line for line in lines if line.startswith("shared")] == [
        "shared 1: 1.0", "shared 2: 1.0", "shared 3: 0.5", "shared 5: 0.3333"]
    assert ("--workers 3 on a cluster with 2 GPUs: the workers share them, 0.5 GPU each (2 per GPU)"
            in two_gpu_ray.stderr)
    assert ("--workers 5 on a cluster with 2 GPUs: the workers share them, 0.3333 GPU each (3 per GPU)"
            in two_gpu_ray.stderr)
    assert "--workers 2 on" not in two_gpu_ray.stderr, "a worker per GPU: nothing to share, nothing said"


def test_default_is_refused_where_workers_may_not_share_and_explicit_values_stay_refused(two_gpu_ray) -> None:
    assert "unshared 2: 1.0" in two_gpu_ray.stdout
    assert ("refused: --workers 3 x --gpus-per-worker 1 (the default on a cluster with GPUs) needs 3 GPU, but the "
            "Ray cluster has at most 2") in two_gpu_ray.stdout
    assert ("refused: --workers 3 x --gpus-per-worker 1 needs 3 GPU, but the Ray cluster has at most 2"
            in two_gpu_ray.stdout)


@pytest.mark.parametrize("gpus, workers", [(1, 2), (1, 3), (2, 3), (1, 6), (3, 7), (4, 9), (1, 7)])
def test_shared_fraction_seats_every_worker_on_whole_gpus(gpus, workers) -> None:
    share = shared_gpu_fraction(gpus, workers)
    units = round(share * 10_000)  # Ray counts resources in units of 0.0001
    assert abs(units - share * 10_000) < 1e-6, "within Ray's precision"
    assert (10_000 // units) * gpus >= workers, "as many fit on each GPU as it takes to seat every worker"
    assert share >= 0.5 * gpus / workers, "no more than twice the sharing that seating everyone needs"
