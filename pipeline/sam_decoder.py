"""SAM's mask decoder for many prompts in one call: ``MaskDecoder.predict_masks`` made cheaper.

The same modules, weights and arithmetic as segment-anything's decoder (tests compare masks, IoU
predictions and gradients with ``predict_masks``, to float rounding); four changes of mechanics,
because the decoder is what the automatic mask generator, SAM's pretraining and the trainer's
mask head spend their time in, once per prompt:

- prompts of several images in one call: prompt ``i`` reads image ``owner[i]`` (SAM's decoder
  repeats *one* image's embedding for every prompt, so one call serves one image);
- every attention runs through ``torch.nn.functional.scaled_dot_product_attention``, one fused
  kernel, instead of a matmul, a softmax over rows of 7 tokens, a second matmul and the copies of
  splitting and joining heads (much of SAM's decoder time on a CPU); which kernel is
  ``pipeline.attention.sdpa_backend``'s choice (a training step's backward is faster without flash);
- without mask prompts (``dense`` given once for all prompts), the first layer's image side runs
  once per image instead of once per prompt: until the first image-to-token attention writes into
  them, the image tokens of every prompt of an image are the same, and so are their
  token-to-image keys and values and their image-to-token queries;
- the output upscaling (two 2×2, stride-2 transposed convolutions, a ``LayerNorm2d`` and GELUs)
  runs as matmuls on channel-last tokens (``upscaled_masks``): such a convolution is one matmul
  per pixel, whose 2×2 outputs need not be interleaved into an image until the masks, which have a
  channel per mask where the features have 32; the features never leave channel-last, so the layer
  norm is one fused kernel and no layout copies are made.

Sharing the first layer's image side pays where an image has many prompts (the automatic mask
generator's points grid), not in the trainer's step, which has one prompt per image (BENCHMARKS.md
has the figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

from pipeline.attention import sdpa_backend


def decode_prompts(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    owner: torch.Tensor | None,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``predict_masks`` for ``len(sparse)`` prompts, prompt ``i`` on ``image_embeddings[owner[i]]``
    (``owner`` None: on ``image_embeddings[i]``, one prompt per image, as in the trainer's step).

    ``dense``: (prompts, C, h, w), or (1, C, h, w) when it is the same for every prompt (no mask
    prompt: SAM's ``no_mask_embed``), which lets the first layer's image side run once per image.
    Returns all ``1 + num_multimask_outputs`` masks (prompts, M, 4h, 4w) and IoU predictions (prompts, M).
    """
    decoded = decode_tokens(decoder, image_embeddings, owner, image_pe, sparse, dense)
    return mask_logits(decoder, decoded), predicted_iou(decoder, decoded)


@dataclass(frozen=True)
class DecodedPrompts:
    """The two-way transformer's outputs for P prompts: what the IoU head and the masks read."""

    tokens: torch.Tensor  # (P, T, C): the IoU token, the mask tokens, the prompt's own tokens
    image_tokens: torch.Tensor  # (P, h, w, C), channel-last

    def __getitem__(self, index: torch.Tensor) -> DecodedPrompts:
        """The prompts ``index`` selects."""
        return DecodedPrompts(self.tokens[index], self.image_tokens[index])

    def to(self, dtype: torch.dtype) -> DecodedPrompts:
        return DecodedPrompts(self.tokens.to(dtype), self.image_tokens.to(dtype))


def decode_tokens(decoder: MaskDecoder, image_embeddings: torch.Tensor, owner: torch.Tensor | None,
                  image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> DecodedPrompts:
    """The part of :func:`decode_prompts` that every prompt needs; its arguments are the same.

    Split from the masks because the IoU head reads only the tokens: a caller that filters masks
    by their predicted IoU (the automatic mask generator) upscales only the prompts that pass.
    """
    prompts = len(sparse)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.expand(prompts, -1, -1), sparse), dim=1)
    if owner is not None and len(dense) > 1:  # a dense prompt per prompt: image tokens per prompt from the start
        image_embeddings, owner = image_embeddings[owner], None
    images = image_embeddings + dense
    hs, src = two_way_transformer(decoder.transformer, images, owner, image_pe, tokens)
    return DecodedPrompts(hs, src.unflatten(1, images.shape[2:]))


def predicted_iou(decoder: MaskDecoder, decoded: DecodedPrompts) -> torch.Tensor:
    """(P, M): the IoU head's prediction for each of the ``1 + num_multimask_outputs`` masks."""
    return decoder.iou_prediction_head(decoded.tokens[:, 0, :])


def mask_logits(decoder: MaskDecoder, decoded: DecodedPrompts, outputs: slice = slice(None)) -> torch.Tensor:
    """(P, M, 4h, 4w): the low-res mask logits of the outputs ``outputs`` selects (all by default;
    ``slice(1, None)``: the multimask ones), so that no hypernetwork runs for a mask nobody reads."""
    hyper_in = hypernetwork_inputs(decoder, decoded.tokens, outputs)
    return upscaled_masks(decoder.output_upscaling, decoded.image_tokens, hyper_in)


def hypernetwork_inputs(decoder: MaskDecoder, tokens: torch.Tensor, outputs: slice = slice(None)) -> torch.Tensor:
    """(P, M, C/8): what each output's mask token (of ``tokens`` (P, T, C)) gives its hypernetwork MLP,
    the weights of the upscaled features' channels in its mask."""
    indices = range(decoder.num_mask_tokens)[outputs]
    return torch.stack([decoder.output_hypernetworks_mlps[i](tokens[:, 1 + i, :]) for i in indices], 1)


def upscaled_masks(upscaling: nn.Sequential, src: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
    """``hyper_in @ output_upscaling(src)`` for image tokens ``src`` (P, h, w, C) (channel-last) and
    ``hyper_in`` (P, M, C/8): the masks (P, M, 4h, 4w).

    A 2×2, stride-2 transposed convolution maps each input pixel to its own 2×2 output block:
    ``x @ weight`` with the weight as (C_in, 2·2·C_out), its outputs left as a (2, 2) block per
    pixel. Two of them give a (2, 2, 2, 2) block per pixel, (a, b) from the first and (c, d) from
    the second: output pixel (4y + 2a + c, 4x + 2b + d).
    """
    return masks_of_blocks(upscaling, _pixel_blocks(upscaling[0], src), hyper_in)


def masks_of_blocks(upscaling: nn.Sequential, blocks: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
    """:func:`upscaled_masks` from the first convolution's output ``blocks`` (P, h, w, 2, 2, C/4), bias
    included: the rest of the upscaling and the hypernetwork product."""
    _, norm, first_act, second, second_act = upscaling
    y = first_act(F.layer_norm(blocks, blocks.shape[-1:], norm.weight, norm.bias, norm.eps))
    y = second_act(_pixel_blocks(second, y))  # (P, h, w, 2, 2, 2, 2, C/8)
    prompts, height, width = blocks.shape[:3]
    masks = (y.flatten(1, -2) @ hyper_in.transpose(1, 2)).unflatten(1, y.shape[1:-1])  # (P, h, w, a, b, c, d, M)
    masks = masks.permute(0, 7, 1, 3, 5, 2, 4, 6)  # (P, M, h, a, c, w, b, d)
    return masks.reshape(prompts, hyper_in.shape[1], 4 * height, 4 * width)


def pixel_block_weight(convolution: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2×2, stride-2 ``ConvTranspose2d``'s weight as (C_in, 2·2·C_out), its outputs (a, b, C_out):
    channel-last ``x @`` it, unflattened to (..., 2, 2, C_out), plus the bias, is the convolution."""
    return convolution.weight.permute(0, 2, 3, 1).flatten(1)


def _pixel_blocks(convolution: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A 2×2, stride-2 ``ConvTranspose2d`` on channel-last ``x`` (..., C_in): (..., 2, 2, C_out)."""
    return (x @ pixel_block_weight(convolution)).unflatten(-1, (2, 2, -1)) + convolution.bias


def two_way_transformer(transformer: TwoWayTransformer, images: torch.Tensor, owner: torch.Tensor | None,
                        image_pe: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` for prompt tokens (P, T, C) on images (N, C, h, w), prompt ``i``
    on image ``owner[i]`` (None: on image ``i``): (P, T, C) queries and (P, h·w, C) image tokens."""
    keys = images.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    for index, layer in enumerate(transformer.layers):
        queries, keys = _two_way_block(layer, queries, keys, tokens, key_pe, owner if index == 0 else None)
    q = queries + tokens
    queries = queries + _attention(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
    return transformer.norm_final_attn(queries), keys


def _two_way_block(layer: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                   key_pe: torch.Tensor, owner: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayAttentionBlock.forward``. With ``owner``, ``keys`` are per image and prompt ``i``
    reads ``keys[owner[i]]``: the projections of the image tokens run once per image."""
    queries = self_attention(layer, queries, query_pe)
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    keys_with_pe = keys + key_pe
    image_k, image_v, image_q = to_image.k_proj(keys_with_pe), to_image.v_proj(keys), to_token.q_proj(keys_with_pe)
    if owner is not None:
        image_k, image_v, image_q, keys = image_k[owner], image_v[owner], image_q[owner], keys[owner]
    queries = layer.norm2(queries + _attend(to_image, to_image.q_proj(queries + query_pe), image_k, image_v))
    queries = layer.norm3(queries + layer.mlp(queries))

    q = queries + query_pe
    keys = layer.norm4(keys + _attend(to_token, image_q, to_token.k_proj(q), to_token.v_proj(queries)))
    return queries, keys


def self_attention(layer: TwoWayAttentionBlock, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
    """A two-way block's first step, the prompt tokens' self-attention and its norm (without the
    positional encoding in the first layer, as SAM's block)."""
    if layer.skip_first_layer_pe:
        return layer.norm1(_attention(layer.self_attn, queries, queries, queries))
    q = queries + query_pe
    return layer.norm1(queries + _attention(layer.self_attn, q, q, queries))


def _attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` of segment-anything."""
    return _attend(module, module.q_proj(q), module.k_proj(k), module.v_proj(v))


def _attend(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The rest of ``Attention.forward`` once q, k and v are projected: heads, attention, out_proj."""
    heads = module.num_heads
    with sdpa_backend(q.shape[1], k.shape[1], q.device):
        out = F.scaled_dot_product_attention(*(x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v)))
    return module.out_proj(out.transpose(1, 2).flatten(2))
