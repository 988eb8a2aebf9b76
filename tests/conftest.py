"""Shared fixtures: synthetic REFER roots, a tiny SAM checkpoint, one in-process Ray for the suite and
the shards every training test reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("refer")
    synthesize(root, images=12, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    from pipeline.superpixels.sam import save_tiny_sam

    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    save_tiny_sam(path, seed=0)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every in-process job test (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def refer_root(tmp_path_factory) -> Path:
    """The training tests' REFER root: enough train images for two processes' disjoint shards."""
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("refer-train")
    synthesize(root, images=16, seed=1)
    return root


@pytest.fixture(scope="session")
def shards(refer_root, tmp_path_factory, tiny_sam_checkpoint, ray_local) -> Path:
    """Shards of two images each, with sam.npy, shared by every training test (any launcher)."""
    from jobs.precompute import main as precompute

    out = tmp_path_factory.mktemp("shards")
    assert precompute(["--refer-root", str(refer_root), "--dataset", "refcoco", "--split-by", "unc", "--out", str(out),
                       "--backend", "felzenszwalb", "--shard-size", "2", "--store-sam-embeddings",
                       "--sam-checkpoint", str(tiny_sam_checkpoint), "--sam-model", "tiny"]) == 0
    return out
