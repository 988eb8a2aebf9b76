"""Strict state-dict comparison, in words a user can act on: the SAM checkpoint check and the
trainer's loading of trained weights both refuse a dict that does not fit, and say why."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_KEYS_SHOWN = 5  # per kind of problem: a checkpoint of another model differs in hundreds of keys


def state_dict_problems(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``given`` from loading strictly where ``expected`` is the model's own state dict:
    missing keys, unexpected keys and shape mismatches, each as ``"N what: key, key, ..."``; empty
    when it fits.

    Names and shapes only, so either side may be on the ``meta`` device or memory-mapped: the
    comparison reads no weights. Keys are listed in the model's order (the file's for unexpected
    ones), so the first named is where the two part.
    """
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    mismatched = [
        f"{name} {tuple(given[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in given and tuple(given[name].shape) != tuple(tensor.shape)
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches (given vs model)": mismatched}
    return [
        f"{len(keys)} {what}: {', '.join(keys[:_KEYS_SHOWN])}{', ...' if len(keys) > _KEYS_SHOWN else ''}"
        for what, keys in found.items()
        if keys
    ]
