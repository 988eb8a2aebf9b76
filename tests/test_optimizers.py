"""``svp train --optimizer``: what each name builds, and the refusals a user can meet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import train_flags

from trainer.optimizers import OptimizerError, optimizer_class


def test_adamw8bit_keeps_one_byte_moments_for_large_tensors_and_float32_for_small_ones():
    large, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))
    optimizer = optimizer_class("adamw8bit")([large, small], lr=1e-3)
    (large.square().sum() + small.square().sum()).backward()
    optimizer.step()
    assert optimizer.state[large]["state1"].dtype == torch.uint8  # 4096 values: quantised block-wise
    assert optimizer.state[small]["state1"].dtype == torch.float32  # under bitsandbytes' 4096-value floor


def test_adamw8bit_without_bitsandbytes_is_refused_before_the_run_starts(shards, tiny_sam_checkpoint, tmp_path,
                                                                         capsys, monkeypatch):
    from jobs.train import main as svp_train

    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # what Python does when it is not installed
    run_dir = tmp_path / "run"
    assert svp_train(train_flags(shards, run_dir, tiny_sam_checkpoint, "--optimizer", "adamw8bit")) == 2
    assert "pip install 'svp[optim8bit]'" in capsys.readouterr().err
    assert not run_dir.exists()  # no run config, log or checkpoint of a run that never started


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(OptimizerError, match="unknown optimizer 'sgd': choose one of adamw, adamw8bit"):
        optimizer_class("sgd")


# Run in an interpreter of its own (this one may have imported bitsandbytes for another test), with
# the network off: name resolution and connections are refused, and recorded.
_OFFLINE_IMPORT = """
import socket, sys
tried = []
def refuse(*args, **kwargs):
    tried.append(args[:2])
    raise OSError("the network is off in this test")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
import trainer, jobs.train
from trainer.model import ModelConfig, SegmentationMLLM
SegmentationMLLM(ModelConfig())  # peft builds the LoRA layers: where it imports bitsandbytes if it can
loaded = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "bitsandbytes" and module)
print(f"bitsandbytes modules: {loaded}; network: {tried}")
assert not loaded and not tried
"""


def test_the_trainer_imports_and_builds_its_model_offline_without_importing_bitsandbytes():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _OFFLINE_IMPORT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
