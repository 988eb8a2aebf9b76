"""Which kernel ``scaled_dot_product_attention`` runs on a CPU: flash, but for short attentions in a
training step, where the math kernel's backward is the faster.

On a CPU, PyTorch picks its flash kernel whenever it can. Its forward is the fastest there is, but
its backward, at the sizes svp trains at, spends far more than the arithmetic needs. On the 2-core
CPU of BENCHMARKS.md (``python -m bench.kernels``, bf16, causal masks for the LLM), forward plus
backward, milliseconds per call:

=====================================================  =====  ====
attention (batch 8)                                    flash  math
=====================================================  =====  ====
LLM, 14 heads of 64, 52 tokens                          13.3    6.0
LLM, 128 tokens                                         27.8   19.6
LLM, 192 tokens                                         42.7   42.0
LLM, 256 tokens                                         61.7   62.8
SAM decoder, 4096 image tokens onto 6 prompt tokens     84.2   40.9
SAM decoder, 6 prompt tokens onto 4096 image tokens     38.9   20.3
=====================================================  =====  ====

Forward only (inference: the automatic mask generator's 64 prompts, fp32), flash stays 2.2-3.9×
faster than math in the SAM decoder's shapes. So the math kernel is chosen only where a backward
will follow (autograd on), on a CPU, and one side of the attention has at most ``MATH_MAX_TOKENS``
tokens; elsewhere (GPUs, inference, long sequences) PyTorch's own choice stands.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_MAX_TOKENS = 128  # math is ahead up to here; at 192 the two are even (the table above)


def sdpa_backend(queries: int, keys: int, device: torch.device) -> contextlib.AbstractContextManager:
    """The context to run an attention of ``queries`` onto ``keys`` tokens in (see the module docstring)."""
    if device.type == "cpu" and torch.is_grad_enabled() and min(queries, keys) <= MATH_MAX_TOKENS:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()
