"""Shared fixtures: a synthetic REFER root, a tiny SAM checkpoint and one in-process Ray for the suite."""

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

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
