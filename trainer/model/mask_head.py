"""SAM as the grounding head (DESIGN §1): frozen encoder and prompt encoder, trained mask decoder.

The ``[SEG]`` embedding is the only prompt: it takes the place of SAM's sparse (point/box)
embeddings, and the prompt encoder contributes what it would for "no mask given" (its learned
dense embedding) plus the positional encoding of the embedding grid (64×64 for SAM). The image encoder is the same
frozen SAM the pipeline ran, so a batch may carry its precomputed embedding and skip it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling import Sam
from torch import nn

from pipeline.superpixels.sam import decode_prompts


class MaskHead(nn.Module):
    """(SAM image embeddings, prompt embeddings (B, 1, 256)) → low-res mask logits (B, 1, S/4, S/4)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam
        sam.image_encoder.requires_grad_(False)
        sam.prompt_encoder.requires_grad_(False)
        # The IoU head only scores multimask outputs; with one mask it never reaches the loss, and
        # a trainable parameter without gradient breaks DDP's reducer.
        sam.mask_decoder.iou_prediction_head.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def prompt_dim(self) -> int:
        """Width of a sparse prompt embedding (256 for SAM), which is also the image embedding's."""
        return self.sam.prompt_encoder.embed_dim

    def train(self, mode: bool = True) -> MaskHead:
        """Only the decoder follows ``mode``: the frozen encoders keep their eval behaviour."""
        super().train(False)
        self.sam.mask_decoder.train(mode)
        return self

    @torch.no_grad()
    def image_embeddings(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) SAM-normalised, padded pixels → (B, 256, S/16, S/16)."""
        return self.sam.image_encoder(sam_pixels)

    def forward(self, image_embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """One mask per image (``multimask_output=False``: the prompt is not ambiguous like a click).

        SAM's decoder repeats *one* image's embedding for every prompt, so it would decode a batch
        one image at a time (as LISA/GLaMM do); ``decode_prompts`` is the same computation for the
        prompts of many images in one call, prompt ``i`` reading image ``i``.
        """
        decoder = self.sam.mask_decoder
        dtype = decoder.iou_token.weight.dtype  # shards store float16 embeddings
        _, no_mask = self.sam.prompt_encoder(points=None, boxes=None, masks=None)
        owner = torch.arange(len(prompts), device=prompts.device)
        masks, _ = decode_prompts(decoder, image_embeddings.to(dtype), owner, self.sam.prompt_encoder.get_dense_pe(),
                                  prompts.to(dtype), no_mask)
        return masks[:, :1]  # SAM's single-mask output is its first mask token

    def postprocess(
        self, low_res: torch.Tensor, input_sizes: Sequence[Sequence[int]], original_sizes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Full-resolution logits (1, H, W) per image: unpad, then resize (sizes differ, hence a list)."""
        return [
            self.sam.postprocess_masks(logits[None].float(), tuple(map(int, inp)), tuple(map(int, orig)))[0]
            for logits, inp, orig in zip(low_res, input_sizes, original_sizes)
        ]
