"""DataLoader worker processes end with the training or evaluation that started them.

They are forks of the caller: left running, they keep its sockets and files open (a forked copy of
a test server's listening socket hung the suite) and leak processes in every long-lived caller
(Ray Train workers, the bench, the demo).
"""

from __future__ import annotations

import psutil
import pytest
from train_helpers import tiny_train_config

from trainer.data import DataConfig, make_loader
from trainer.loop import train


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children() if child.status() != psutil.STATUS_ZOMBIE}


def test_training_with_loader_workers_leaves_none_behind(shards, tiny_sam_checkpoint, tmp_path):
    before = _children()
    train(tiny_train_config(shards, tmp_path / "run", tiny_sam_checkpoint, max_steps=2, num_workers=2))
    assert _children() == before


def test_a_training_that_raises_ends_its_loader_workers(shards, tiny_sam_checkpoint, tmp_path):
    class Stop(Exception):
        pass

    def report(metrics: dict, checkpoint) -> None:
        raise Stop(f"stopped at step {metrics['step']}")

    before = _children()
    with pytest.raises(Stop, match="step 1"):
        train(tiny_train_config(shards, tmp_path / "run", tiny_sam_checkpoint, max_steps=3, num_workers=2,
                                log_every=1), report=report)
    assert _children() == before


def test_a_closed_loader_has_no_workers_and_can_be_closed_again(shards):
    loader = make_loader(str(shards / "train-000000.tar"), DataConfig(), train=True, batch_size=1, num_workers=2,
                         resampled=True)
    before = _children()
    next(iter(loader))
    assert len(_children() - before) == 2, "persistent workers run while the loader is open"
    loader.close()
    loader.close()
    assert _children() == before
