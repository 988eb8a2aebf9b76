"""``pipeline.attention.sdpa_backend``: the math kernel only for a short attention on a CPU with a
backward to follow; PyTorch's own choice (flash) everywhere else. (That both give the same results
is in the SAM decoder's and the model's tests, which compare training-mode gradients with reference paths.)"""

from __future__ import annotations

import torch

from pipeline.attention import MATH_MAX_TOKENS, sdpa_backend

CPU = torch.device("cpu")


def flash_enabled() -> bool:
    return torch.backends.cuda.flash_sdp_enabled()  # the global switch, CPU kernels included


def test_math_only_where_a_backward_follows_a_short_attention_on_a_cpu() -> None:
    assert flash_enabled()
    for queries, keys in ((52, 52), (4096, 6), (6, 4096), (MATH_MAX_TOKENS, 4096)):
        with sdpa_backend(queries, keys, CPU):
            assert not flash_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert flash_enabled()  # restored on the way out
    with torch.no_grad(), sdpa_backend(52, 52, CPU):
        assert flash_enabled()  # inference: flash's forward is the faster
    with sdpa_backend(MATH_MAX_TOKENS + 1, MATH_MAX_TOKENS + 1, CPU):
        assert flash_enabled()  # long sequences: flash's backward catches up
    with sdpa_backend(52, 52, torch.device("cuda")):
        assert flash_enabled()

