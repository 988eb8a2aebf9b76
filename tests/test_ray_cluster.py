"""jobs.ray_cluster against a real Ray that declares one GPU (Ray schedules by declared resources,
so no GPU is needed): the default --gpus-per-worker is checked like an explicit one."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import ray
from jobs import ray_cluster
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
print("one worker:", ray_cluster.gpus_per_worker(None, 1, "--workers"))
try:
    ray_cluster.gpus_per_worker(None, 2, "--workers")
except ray_cluster.ClusterResourceError as error:
    print("two workers refused:", error)
"""


def test_default_gpus_per_worker_is_refused_when_the_workers_do_not_fit() -> None:
    # A process of its own: the suite's Ray (no GPUs) may already be running in this one.
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    assert "one worker: 1.0" in result.stdout
    assert ("two workers refused: --workers 2 x --gpus-per-worker 1 (the default on a cluster with GPUs) "
            "needs 2 GPU, but the Ray cluster has at most 1") in result.stdout
