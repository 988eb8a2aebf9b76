"""The optimizer a run steps its trained parameters with: ``adamw`` or ``adamw8bit``.

AdamW keeps two float32 moments per trained parameter, so a checkpoint (trained weights plus
optimizer state) costs 12 bytes per trained parameter: 197 MB for the 16.4 M that a real-size
``svp`` run trains (Qwen2.5-0.5B, DINOv2-base, SAM ViT-B; 99.5 MB with 8-bit moments, measured
by ``bench.realsize``). bitsandbytes' block-wise 8-bit AdamW (what Hugging Face's Trainer offers
as ``adamw_bnb_8bit``) keeps each moment in one byte plus a float32 scale per block of 256, for
every tensor of 4096 values or more (smaller ones keep float32 moments), so the same checkpoint
costs about 6 bytes per parameter and the optimizer's memory a quarter. The update still runs in
float32; only the stored moments are quantised, and they are the optimizer's own state, so a
resumed run continues exactly as the uninterrupted one.

bitsandbytes is an optional dependency (``pip install 'svp[optim8bit]'``): svp imports it only
when a run asks for it (peft imports it by itself wherever it is installed).
"""

from __future__ import annotations

import torch

from pipeline.errors import SvpError

OPTIMIZERS = ("adamw", "adamw8bit")


class OptimizerError(SvpError):
    """An optimizer that cannot be built here (an unknown name, a missing optional dependency)."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class ``--optimizer name`` builds (both take AdamW's ``lr``, ``betas``, ``weight_decay``), or
    why it cannot be built here: a run asks before it starts any work."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError as exc:
            raise OptimizerError("--optimizer adamw8bit needs bitsandbytes: pip install 'svp[optim8bit]' "
                                 f"({exc})") from None
        return AdamW8bit
    raise OptimizerError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
