"""The GLaMM-family objective (DESIGN §1): ce·CE(answer text) + bce·BCE(mask) + dice·Dice(mask).

The mask terms are averaged per sample first, then over the batch, so a large object does not
outweigh a small one; the targets live in SAM's low-res mask frame (S/4), where the decoder
predicts, so no upsampling enters the training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DICE_EPS = 1.0  # smoothing: an empty target and an empty prediction score a Dice loss of 0, not NaN


def answer_ce(hidden: torch.Tensor, labels: torch.Tensor,
              lm_head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Next-token CE over the labelled (answer) positions; position t predicts label t+1.

    ``hidden`` (B, L, D) is the LLM's last hidden state, ``labels`` (B, L) IGNORE_INDEX but on the
    answer. Only the rows that predict a label go through ``lm_head``: the logits of a whole
    sequence would cost B·L·vocab floats (in float32 for the softmax) for a handful of answer
    tokens. The mean over those rows equals the full-sequence CE with ``ignore_index``.
    """
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    return F.cross_entropy(lm_head(hidden[:, :-1][labelled]).float(), targets[labelled])


def mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE with logits, mean per sample, then over the batch."""
    return mask_bce_per_sample(logits, targets).mean()


def mask_dice(logits: torch.Tensor, targets: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """1 − soft Dice on sigmoid probabilities, per sample, then over the batch."""
    return mask_dice_per_sample(logits, targets, eps).mean()


def mask_bce_per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, ...) logits and targets → (N,) mean per-pixel BCE of each."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_pixel.flatten(1).mean(1)


def mask_dice_per_sample(logits: torch.Tensor, targets: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """(N, ...) logits and targets → (N,) 1 − soft Dice of each."""
    probs, targets = logits.float().sigmoid().flatten(1), targets.float().flatten(1)
    return 1 - (2 * (probs * targets).sum(1) + eps) / (probs.sum(1) + targets.sum(1) + eps)
