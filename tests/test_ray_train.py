"""`python -m jobs.train --ray-workers N`: the Accelerate loop in Ray Train workers, on CPU (gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_helpers import (
    assert_checkpoints,
    assert_disjoint_keys,
    assert_restores_saved_state,
    keys_per_rank,
    train_flags,
)

from jobs import ray_cluster
from jobs.train import main as svp_train

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cluster


def _ray_checkpoints(run_dir: Path) -> list[tuple[str, int]]:
    """(directory, step) of each checkpoint Ray Train knows in the run, as a Ray user reads them."""
    from ray.train import Result

    result = Result.from_path(run_dir)
    assert Path(result.checkpoint.path).parent == run_dir / "checkpoints"
    return [(Path(checkpoint.path).name, metrics["step"]) for checkpoint, metrics in result.best_checkpoints]


def test_two_ray_workers_train_on_disjoint_shards_checkpoint_to_ray_and_resume(shards, tiny_sam_checkpoint, tmp_path,
                                                                              ray_local):
    run_dir = tmp_path / "run"
    flags = train_flags(shards, run_dir, tiny_sam_checkpoint, "--ray-workers", "2", "--save-every", "2",
                        "--record-keys")
    assert svp_train([*flags, "--max-steps", "2"]) == 0
    assert_disjoint_keys(run_dir, ranks=2)
    assert json.loads((run_dir / "run_config.json").read_text())["world_size"] == 2
    # Ray Train registered the checkpoint where the workers wrote it: the run directory is its run.
    assert _ray_checkpoints(run_dir) == [("step_000002", 2)]
    assert_restores_saved_state(run_dir, shards, tiny_sam_checkpoint, step=2)

    assert svp_train([*flags, "--max-steps", "4", "--resume"]) == 0
    assert_checkpoints(run_dir, [2, 4], ranks=2)
    assert _ray_checkpoints(run_dir) == [("step_000002", 2), ("step_000004", 4)]
    # Steps 3 and 4 only: a resume that started over would have trained 2 more batches per worker.
    assert [len(keys) for keys in keys_per_rank(run_dir, ranks=2)] == [4 * 2, 4 * 2]
    assert (run_dir / "export" / "svp.safetensors").is_file()


def test_gpus_the_cluster_lacks_are_refused_at_once(shards, tiny_sam_checkpoint, tmp_path, ray_local, capsys):
    flags = train_flags(shards, tmp_path / "run", tiny_sam_checkpoint, "--ray-workers", "2", "--gpus-per-worker", "1")
    assert svp_train(flags) == 2
    error = capsys.readouterr().err
    assert "--ray-workers 2 x --gpus-per-worker 1 needs 2 GPU, but the Ray cluster has at most 0" in error


def test_gpus_an_autoscaling_cluster_can_add_are_granted(ray_local, tmp_path, monkeypatch):
    # The head of a `ray up cluster.yaml` cluster before any GPU worker has started: no GPU yet.
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(REPO / "cluster.yaml", tmp_path / "ray_bootstrap_config.yaml")
    assert ray_cluster.gpus_per_worker(None, 8, "--ray-workers") == 1
    assert ray_cluster.gpus_per_worker(1, 8, "--ray-workers") == 1
    with pytest.raises(ray_cluster.ClusterResourceError, match="needs 9 GPU, but the Ray cluster has at most 8"):
        ray_cluster.gpus_per_worker(1, 9, "--ray-workers")
