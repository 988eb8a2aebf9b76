"""Shared fixtures: synthetic REFER roots, a tiny SAM checkpoint, one in-process Ray for the suite and
the shards every training test reads; and a guard that fails any test leaving a child process alive."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# Helpers that Python's multiprocessing starts once per process and keeps for its whole life.
_PROCESS_WIDE_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
CHILD_EXIT_GRACE_S = 10.0


def _live_children(me: psutil.Process, known: set[int]) -> list[psutil.Process]:
    alive = []
    for child in me.children():
        try:
            if child.pid in known or child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(helper in " ".join(child.cmdline()) for helper in _PROCESS_WIDE_HELPERS):
                continue
        except psutil.NoSuchProcess:
            continue
        alive.append(child)
    return alive


@pytest.fixture(autouse=True)
def no_child_process_outlives_its_test():
    """Fail a test that leaves a new child process of pytest running once its fixtures are torn down.

    A forked child (a DataLoader worker, a server) holds copies of the parent's sockets and files:
    one left behind made a later test's server unreachable and hung the suite. Children of broader
    fixtures (the session's Ray, a module's server) started before the test and are not counted.
    Autouse fixtures are set up first in their scope, so this one is torn down after the test's own.
    """
    me = psutil.Process()
    known = {child.pid for child in me.children()}
    yield
    deadline = time.monotonic() + CHILD_EXIT_GRACE_S  # children told to stop may take a moment to exit
    while (leaked := _live_children(me, known)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if leaked:
        described = "; ".join(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}" for p in leaked)
        for process in leaked:  # so that the leak fails this test only, not the ones after it
            process.kill()
        pytest.fail(f"the test left {len(leaked)} child process(es) running: {described}", pytrace=False)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("refer")
    synthesize(root, images=12, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    from pipeline.sam_model import save_tiny_sam

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


@pytest.fixture(scope="session")
def trained_run(shards, tiny_sam_checkpoint, tmp_path_factory) -> Path:
    """A tiny run of three steps (LoRA on the tiny LLM), its one checkpoint at the last: the run that
    eval, predict and export tests read (and do not change, but for eval's reports beside it)."""
    from train_helpers import train_flags

    from jobs.train import main as svp_train

    run_dir = tmp_path_factory.mktemp("run")
    assert svp_train(train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "3", "--save-every", "3")) == 0
    return run_dir
