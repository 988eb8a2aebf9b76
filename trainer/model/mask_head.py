"""SAM as the grounding head (DESIGN §1): frozen encoder and prompt encoder, trained mask decoder.

The ``[SEG]`` embedding takes the place of SAM's sparse (point/box) embeddings. The dense prompt
is either what the prompt encoder gives for "no mask given" (its learned dense embedding) or, with
the region prompt (``trainer.model.region_prompt``), the prompt encoder's embedding of a mask
prompt; the positional encoding is that of the embedding grid (64×64 for SAM). The image encoder
is the same frozen SAM the pipeline ran, so a batch may carry its precomputed embedding and skip it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling import Sam
from torch import nn

from pipeline.sam_decoder import decode_prompts


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
    def mask_prompt_size(self) -> int:
        """Side of a mask prompt (256 for SAM: 4× the embedding grid), also the low-res mask side."""
        return self.sam.prompt_encoder.mask_input_size[0]

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

    def forward(self, image_embeddings: torch.Tensor, prompts: torch.Tensor,
                mask_prompt: torch.Tensor | None = None) -> torch.Tensor:
        """One mask per image (``multimask_output=False``: the prompt is not ambiguous like a click).

        ``mask_prompt``: (B, 1, m, m) logits (``mask_prompt_size``), embedded by SAM's frozen prompt
        encoder; gradients flow through it to whatever produced the logits.

        SAM's decoder repeats *one* image's embedding for every prompt, so it would decode a batch
        one image at a time (as LISA/GLaMM do); ``decode_prompts`` is the same computation for the
        prompts of many images in one call, prompt ``i`` reading image ``i``.
        """
        decoder = self.sam.mask_decoder
        dtype = decoder.iou_token.weight.dtype  # shards store float16 embeddings
        encoder = self.sam.prompt_encoder
        _, dense = encoder(points=None, boxes=None, masks=None if mask_prompt is None else mask_prompt.to(dtype))
        masks, _ = decode_prompts(decoder, image_embeddings.to(dtype), None, encoder.get_dense_pe(),
                                  prompts.to(dtype), dense)
        return masks[:, :1]  # SAM's single-mask output is its first mask token

    def postprocess(
        self, low_res: torch.Tensor, input_sizes: Sequence[Sequence[int]], original_sizes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Full-resolution logits (1, H, W) per image: unpad, then resize (sizes differ, hence a list)."""
        return [
            self.sam.postprocess_masks(logits[None].float(), tuple(map(int, inp)), tuple(map(int, orig)))[0]
            for logits, inp, orig in zip(low_res, input_sizes, original_sizes)
        ]
