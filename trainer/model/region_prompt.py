"""The region prompt: ``[SEG]`` says *which visual tokens* it means, and SAM gets that as a mask prompt.

Why it exists: one sparse prompt vector must tell SAM's decoder *where* the object is, in the
terms of SAM's positional encoding. Trained from the mask loss alone, the demo's tiny model
learnt "segment the shapes" instead (its overlays masked every object of the image, whatever the
sentence). Yet the LLM already holds one state per visual token, and every token stands for a
region of the image: a superpixel for ``svp``, a grid cell for ``mlp`` and ``pool``. So the
``[SEG]`` state scores each visual token's last-layer state (a scaled bilinear form, one logit per
token: "is this token part of what I refer to?"), every pixel takes its token's logit, and the
map, resampled to SAM's low-res frame, enters the decoder through SAM's own mask-prompt path
(``PromptEncoder(masks=...)``, the input SAM uses to refine a previous mask). One logit per token,
not a softmax over tokens: an object may span several superpixels.

The map is also supervised directly (``ModelConfig.region_weight``: BCE against the target mask,
like the mask's own BCE). Learnt only through the frozen mask-prompt encoder and the decoder, the
selection did not train at all on the demo's data (train-batch cIoU stuck at 0.25, below the head
without it): the decoder must first learn to read the prompt before the prompt gets a signal.

The sparse ``[SEG]`` prompt stays: the region prompt says where, the decoder still draws the
boundary from SAM's image embedding. ``ModelConfig.region_prompt`` turns it off (the paper's
head, the sparse prompt alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PADDING_LOGIT = -10.0  # SAM's zero padding around the image is background for certain (p < 1e-4)


def to_sam_frame(image_map: Tensor, input_sizes: Tensor, sam_size: int, out_size: int, fill: float = 0.0) -> Tensor:
    """``(B, H, W)`` values on the vision frame (the whole image squashed to H×W) → ``(B, 1, out, out)``
    on SAM's frame at ``out_size / sam_size`` scale: the image resized into the top-left
    ``input_sizes[b]`` = (h, w) of ``sam_size``, ``fill`` at the pixels whose centre lies outside it
    (SAM's padding). Bilinear inside, vectorised over the batch with one ``grid_sample``;
    differentiable in ``image_map``."""
    centres = (torch.arange(out_size, device=image_map.device, dtype=torch.float32) + 0.5) * (sam_size / out_size)
    sizes = input_sizes.to(image_map.device, torch.float32)
    y = centres[None, :] / sizes[:, :1] * 2 - 1  # (B, out): -1 .. 1 inside the image
    x = centres[None, :] / sizes[:, 1:] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # (B, out, out, (x, y))
    sampled = F.grid_sample(image_map[:, None].float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
    inside = (grid <= 1).all(-1)[:, None]  # centres past the image's bottom or right edge are padding
    return sampled.masked_fill(~inside, fill)


class RegionPrompt(nn.Module):
    """(``[SEG]`` state, visual-token states, token regions) → region logits (B, 1, m, m) on SAM's frame."""

    def __init__(self, llm_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(llm_dim, llm_dim)
        self.key = nn.Linear(llm_dim, llm_dim)

    def token_logits(self, seg_hidden: Tensor, visual_hidden: Tensor) -> Tensor:
        """(B, D), (B, T, D) → (B, T): how much each visual token belongs to the referred object."""
        query, key = self.query(seg_hidden), self.key(visual_hidden)
        return (key @ query[:, :, None])[..., 0] / math.sqrt(query.shape[-1])

    def forward(self, seg_hidden: Tensor, visual_hidden: Tensor, regions: Tensor, input_sizes: Tensor,
                sam_size: int, mask_size: int) -> Tensor:
        """``regions`` (B, H, W): the token index of each vision-frame pixel (``Projector.regions``);
        only valid tokens appear in it, so padded token states are never read."""
        image_map = self.token_logits(seg_hidden, visual_hidden).gather(1, regions.flatten(1)).view(regions.shape)
        return to_sam_frame(image_map, input_sizes, sam_size, mask_size, fill=PADDING_LOGIT)
