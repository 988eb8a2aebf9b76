"""``svp train --optimizer``: what each name builds, and the refusals a user can meet."""

from __future__ import annotations

import sys

import pytest
import torch

from trainer.optimizers import OptimizerError, build_optimizer


def test_adamw8bit_keeps_one_byte_moments_for_large_tensors_and_float32_for_small_ones():
    large, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))
    optimizer = build_optimizer("adamw8bit", [large, small], lr=1e-3)
    (large.square().sum() + small.square().sum()).backward()
    optimizer.step()
    assert optimizer.state[large]["state1"].dtype == torch.uint8  # 4096 values: quantised block-wise
    assert optimizer.state[small]["state1"].dtype == torch.float32  # under bitsandbytes' 4096-value floor


def test_adamw8bit_without_bitsandbytes_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # what Python does when it is not installed
    with pytest.raises(OptimizerError, match=r"pip install 'svp\[optim8bit\]'"):
        build_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(OptimizerError, match="unknown optimizer 'sgd': choose one of adamw, adamw8bit"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
