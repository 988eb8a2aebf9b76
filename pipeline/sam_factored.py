"""SAM's mask decoder for the many point prompts of one image, each prompt's image tokens kept factored.

The automatic mask generator asks the decoder about 1,024 points per image and keeps the masks
whose predicted IoU passes a threshold: a few percent of them, on the real-size stand-in. SAM's
decoder (and :func:`pipeline.sam_decoder.decode_tokens`) carries a copy of the image tokens per
prompt (4,096 × 256 at 1024 px) through every layer: memory-bound work, most of the generator's
time. This one carries each prompt's copy in a factored form instead, computes every prompt's
predicted IoU from it (:class:`FactoredDecoder`), and computes masks only for the prompts whose
masks are wanted (:meth:`FactoredPrompts.mask_logits`), still without materialising their tokens.

Without a mask prompt, every prompt of an image starts from the same image tokens ``P``. An
image-to-token attention adds to each image token a mix of the prompt's few (``T``) token values,
per head: a product ``A @ B`` whose ``A`` (n, heads·T) holds the attention weights and ``B``
(heads·T, C) the values through ``out_proj``, a rank of heads·T. A layer norm scales each token
and subtracts its mean, which keeps the form ``scale ⊙ (P' + Z @ C')`` with a shared ``P'`` (the
centred ``P`` times the norm's weight), a per-token scale and a rank that grows by one per norm.
So a prompt's image tokens are ``scale ⊙ (P + Z @ C)`` throughout, with ``Z`` (n, k) and ``C``
(k, C) for k up to 2·(heads·T + 2) (116 for SAM): what the layers need of them (projections for
the few query tokens, attention logits for the image tokens, a layer norm's mean and variance)
comes from products with the shared ``P``, computed once per image, and the small ``Z`` and ``C``.

Exact in exact arithmetic; it runs in float32, the reference's arithmetic, and rounds differently
from SAM's decoder by about 1e-7 (tests compare the two to float64 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import nn

from pipeline.sam_decoder import hypernetwork_inputs, masks_of_blocks, pixel_block_weight, self_attention


@dataclass(frozen=True)
class _Linear:
    """A linear map of one stage's shared image tokens ``P``, per head: ``linear(P + pe)``."""

    shared: torch.Tensor  # (heads, n, d): P's part
    constant: torch.Tensor | None  # (heads, n, d): pe's and the bias's; None: the bias alone
    weight: torch.Tensor  # (D, C): what the small factor ``c`` goes through
    bias: torch.Tensor  # (D,)

    @staticmethod
    def of(linear: nn.Linear, tokens: torch.Tensor, pe: torch.Tensor | None, heads: int) -> _Linear:
        def per_head(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (heads, -1)).transpose(0, 1).contiguous()

        constant = None if pe is None else per_head(pe @ linear.weight.T + linear.bias)
        return _Linear(per_head(tokens @ linear.weight.T), constant, linear.weight, linear.bias)


@dataclass(frozen=True)
class _Stage:
    """The image side of one stage of the transformer (a layer, or the final attention): what every
    prompt of the image shares there: the tokens ``P``, centred, and their projections."""

    tokens: torch.Tensor  # (n, C)
    centred: torch.Tensor  # (n, C): the tokens less each one's mean, what a layer norm reads
    squares: torch.Tensor  # (n,): each centred token's sum of squares
    to_image_k: _Linear  # the token-to-image attention's keys (with pe) and values
    to_image_v: _Linear
    to_token_q: _Linear | None  # the image-to-token attention's queries (with pe); None for the final attention
    # Per block of rows of ``c`` so far (``_Blocks``), its map ``W`` (heads, d, C) times the centred tokens:
    # (heads, d, n), what the stage's layer norm reads. Empty for the final attention, which has no layer norm.
    crossed: tuple[torch.Tensor, ...]

    @staticmethod
    def of(tokens: torch.Tensor, pe: torch.Tensor, to_image: Attention, to_token: Attention | None,
           blocks: _Blocks | None) -> _Stage:
        heads = to_image.num_heads
        centred = tokens - tokens.mean(-1, keepdim=True)
        return _Stage(tokens, centred, (centred**2).sum(-1), _Linear.of(to_image.k_proj, tokens, pe, heads),
                      _Linear.of(to_image.v_proj, tokens, None, heads),
                      None if to_token is None else _Linear.of(to_token.q_proj, tokens, pe, to_token.num_heads),
                      () if blocks is None else tuple(weight @ centred.T for weight in blocks.weights))


@dataclass(frozen=True)
class _Blocks:
    """The rows of ``c``, block by block, as each prompt's small factor ``v`` (heads, T, d) times a map
    ``W`` (heads, d, C) that every prompt shares: the attention's values (d = 16 for SAM) through
    ``out_proj``, and each bias (one row: v = 1). A layer norm maps every row by the same linear map
    (less the row's mean, times the weight), so each block keeps its form with ``W`` mapped.

    What the form is for: a layer norm needs ``c @ P.T`` (k, n) per prompt, k·C·n multiply-adds;
    per block it is ``v @ (W @ P.T)``, whose ``W @ P.T`` is the image's (:attr:`_Stage.crossed`),
    and per prompt only heads·T·d·n are left, 16 times fewer for the attentions' rows.
    """

    weights: tuple[torch.Tensor, ...] = ()  # W of each block, the prompts' shared part

    def then(self, *weights: torch.Tensor) -> _Blocks:
        return _Blocks((*self.weights, *weights))

    def normed(self, norm: nn.LayerNorm) -> _Blocks:
        """The blocks after ``norm``, which appends its bias as a block of its own."""
        return _Blocks(tuple((w - w.mean(-1, keepdim=True)) * norm.weight for w in self.weights)
                       + (norm.bias.view(1, 1, -1),))

    @staticmethod
    def attention(module: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        """An image-to-token attention's two blocks: its values through ``out_proj`` and its bias."""
        return module.out_proj.weight.T.unflatten(0, (module.num_heads, -1)), module.out_proj.bias.view(1, 1, -1)


class _Factored:
    """Image tokens of ``p`` prompts of one image: ``scale ⊙ (P + zt.T @ c)``, ``P`` the stage's shared tokens.

    ``zt`` only grows (each image-to-token attention and layer norm appends rows to it, nothing
    rewrites it), so it lives in one buffer as tall as it will get; it is stored transposed, (k, n)
    per prompt, the rows in which it is appended (an attention's weights, heads·T rows).
    """

    def __init__(self, scale: torch.Tensor, zt: torch.Tensor, rank: int, c: torch.Tensor,
                 factors: tuple[torch.Tensor, ...]) -> None:
        self.scale = scale  # (p, n)
        self._zt = zt  # (p, k_max, n)
        self.rank = rank
        self.c = c  # (p, k, C)
        self.factors = factors  # per block of c's rows, the prompts' v (p, heads, T, d): c's block is v @ W

    @staticmethod
    def shared(prompts: int, tokens: int, width: int, rank: int, like: torch.Tensor) -> _Factored:
        """Every prompt's tokens the shared ones, room for a rank of ``rank``."""
        return _Factored(like.new_ones(prompts, tokens), like.new_empty(prompts, rank, tokens), 0,
                         like.new_zeros(prompts, 0, width), ())

    def __getitem__(self, index: torch.Tensor) -> _Factored:
        """The prompts ``index`` selects."""
        return _Factored(self.scale[index], self._zt[index], self.rank, self.c[index],
                         tuple(factor[index] for factor in self.factors))

    @property
    def zt(self) -> torch.Tensor:
        """(p, k, n)."""
        return self._zt[:, : self.rank]

    def append(self, columns: torch.Tensor, factor: torch.Tensor, weight: torch.Tensor) -> None:
        """Add ``scale ⊙ (columns.T @ rows)`` to the tokens: rows ``factor @ weight`` ((p, heads, T, d) @
        (heads, d, C)) and ``columns`` (p, heads, T, n), or what broadcasts to it, stored divided by ``scale``."""
        prompts, heads, count = factor.shape[:3]
        added = self._zt[:, self.rank : self.rank + heads * count].unflatten(1, (heads, count))
        torch.div(columns, self.scale[:, None, None], out=added)
        self.rank += heads * count
        self.c = torch.cat((self.c, (factor @ weight).flatten(1, 2)), 1)
        self.factors = (*self.factors, factor)

    def dot(self, linear: _Linear, queries: torch.Tensor) -> torch.Tensor:
        """Per head, ``linear`` of every token dotted with each of ``queries`` (p, T, D): (heads, p, T, n).

        Head-major, the layout in which the products with the shared tokens come out of one batched
        product; every other term is accumulated into it in place."""
        heads, (prompts, count) = len(linear.shared), queries.shape[:2]
        per_head = queries.unflatten(-1, (heads, -1))  # (p, T, h, d)
        flat = per_head.permute(2, 0, 1, 3).flatten(1, 2)  # (h, p·T, d)
        logits = torch.bmm(flat, linear.shared.transpose(1, 2))  # (h, p·T, n)
        by_head = logits.unflatten(1, (prompts, count))
        if self.rank:  # nothing added to the shared tokens yet: the first layer's token-to-image attention
            c = (self.c @ linear.weight.T).unflatten(-1, (heads, -1))  # (p, k, h, d)
            small = torch.einsum("pkhd,pthd->phtk", c, per_head).flatten(1, 2)  # (p, h·T, k)
            by_head += (small @ self.zt).unflatten(1, (heads, count)).transpose(0, 1)
        by_head.mul_(self.scale[:, None])
        assert linear.constant is not None, "dot products are taken with keys and queries, which have pe"
        return logits.baddbmm_(flat, linear.constant.transpose(1, 2)).unflatten(1, (prompts, count))

    def mix(self, linear: _Linear, weights: torch.Tensor) -> torch.Tensor:
        """Per head, ``linear`` (without ``pe``) of the tokens weighted by ``weights`` (heads, p, T, n),
        each row summing to one (and overwritten), and summed: (p, T, D)."""
        heads, prompts, count = weights.shape[:3]
        weights.mul_(self.scale[:, None])
        mixed = torch.bmm(weights.flatten(1, 2), linear.shared).unflatten(1, (prompts, count))  # (h, p, T, d)
        c = (self.c @ linear.weight.T).unflatten(-1, (heads, -1)).transpose(1, 2)  # (p, h, k, d)
        by_prompt = weights.transpose(0, 1).flatten(1, 2)  # (p, h·T, n): a copy, read by one batched product
        mixed += ((by_prompt @ self.zt.transpose(1, 2)).unflatten(1, (heads, count)) @ c).transpose(0, 1)
        return mixed.permute(1, 2, 0, 3).flatten(2) + linear.bias

    def layer_norm(self, norm: nn.LayerNorm, stage: _Stage) -> None:
        """``norm`` of every token (the next stage's shared tokens are ``stage.centred * norm.weight``):
        each token's mean and variance come from products with the small factors.

        Centred first (the shared rows by their mean, the rows of ``c`` by theirs), so that the
        variance is a sum of squares rather than a difference of two large ones.
        """
        c = self.c - self.c.mean(-1, keepdim=True)
        prompts, rank, width = c.shape
        zt = self.zt
        # Each token's squared norm: the shared row's, plus zt's column times (2 c @ P.T + c @ c.T @ zt).
        twice_cross = zt.new_empty(zt.shape)  # (p, k, n): 2 c @ P.T, block by block
        start = 0
        for factor, crossed in zip(self.factors, stage.crossed, strict=True):
            heads, count, depth = factor.shape[1:]
            products = torch.bmm(2 * factor.transpose(0, 1).reshape(heads, prompts * count, depth), crossed)
            twice_cross[:, start : start + heads * count].unflatten(1, (heads, count)).copy_(
                products.unflatten(1, (prompts, count)).transpose(0, 1))
            start += heads * count
        squares = twice_cross.baddbmm_(c @ c.transpose(1, 2), zt).mul_(zt).sum(1) + stage.squares
        self.scale = self.scale * torch.rsqrt(self.scale**2 * squares / width + norm.eps)
        self.c = c * norm.weight
        ones = self.scale.new_ones(1, 1, 1, 1)
        self.append(ones, ones.expand(prompts, -1, -1, -1), norm.bias.view(1, 1, -1))


@dataclass(frozen=True)
class FactoredPrompts:
    """The two-way transformer's layers run for ``p`` prompts of one image: their tokens in full,
    their image tokens factored; the IoU head's predictions; the rest on demand."""

    decoder: FactoredDecoder
    queries: torch.Tensor  # (p, T, C): after the last layer
    tokens: torch.Tensor  # (p, T, C): the output and prompt tokens, the queries' positional encoding
    keys: _Factored
    iou: torch.Tensor  # (p, 1 + num_multimask_outputs): as ``predicted_iou(decoder, decode_tokens(...))``

    def decoded_tokens(self, index: torch.Tensor) -> torch.Tensor:
        """``decode_tokens(...).tokens`` of the prompts ``index`` selects: the final attention's outputs."""
        return self._decoded_tokens(index, self.keys[index])

    def _decoded_tokens(self, index: torch.Tensor, keys: _Factored) -> torch.Tensor:
        """:meth:`decoded_tokens` with ``keys``, ``self.keys[index]``, already taken."""
        transformer = self.decoder.decoder.transformer
        queries, tokens = self.queries[index], self.tokens[index]
        queries = queries + _token_to_image(transformer.final_attn_token_to_image, self.decoder.stages[-1],
                                            queries + tokens, keys)
        return transformer.norm_final_attn(queries)

    def mask_logits(self, index: torch.Tensor, outputs: slice, upscaling: nn.Sequential) -> torch.Tensor:
        """``mask_logits(decoder, decode_tokens(...)[index], outputs)`` with ``upscaling`` (the decoder's
        ``output_upscaling`` in the dtype the masks are computed in), the image tokens never materialised.

        The upscaling's first convolution is one linear map per token (``pixel_block_weight``), so it
        maps the factored form term by term: ``scale ⊙ (P W + zt.T @ (c W)) + bias``, with ``P W`` the
        image's (:attr:`FactoredDecoder.upscaled`). A prompt pays one product of rank k (116 for SAM);
        materialising its tokens first cost that product and then one of rank C (256), the convolution.
        """
        dtype, first = upscaling[0].weight.dtype, self.decoder.decoder.output_upscaling[0]
        keys = self.keys[index]
        hyper_in = hypernetwork_inputs(self.decoder.decoder, self._decoded_tokens(index, keys), outputs)
        small = (keys.c @ pixel_block_weight(first)).to(dtype)  # (p, k, 4·C/4)
        blocks = torch.baddbmm(self.decoder.upscaled.to(dtype), keys.zt.transpose(1, 2).to(dtype), small)
        blocks.mul_(keys.scale[..., None].to(dtype)).add_(first.bias.repeat(4).to(dtype))
        blocks = blocks.unflatten(1, self.decoder.size).unflatten(-1, (2, 2, -1))  # (p, h, w, 2, 2, C/4)
        return masks_of_blocks(upscaling, blocks, hyper_in.to(dtype))


class FactoredDecoder:
    """SAM's mask decoder for point prompts on one image (:meth:`__call__`), the image's side of the
    transformer computed once (a :class:`_Stage` per layer and one for the final attention)."""

    def __init__(self, decoder: MaskDecoder, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                 dense: torch.Tensor) -> None:
        """``image_embedding`` (C, h, w); ``dense`` (1, C, h, w), the same for every prompt (no mask prompt)."""
        self.decoder = decoder
        self.size = tuple(image_embedding.shape[1:])
        transformer = decoder.transformer
        key_pe = image_pe[0].flatten(1).T  # (n, C)
        tokens = (image_embedding + dense[0]).flatten(1).T
        self.stages: list[_Stage] = []
        blocks = _Blocks()
        for layer in transformer.layers:
            blocks = blocks.then(*_Blocks.attention(layer.cross_attn_image_to_token))
            self.stages.append(_Stage.of(tokens, key_pe, layer.cross_attn_token_to_image,
                                         layer.cross_attn_image_to_token, blocks))
            tokens = self.stages[-1].centred * layer.norm4.weight
            blocks = blocks.normed(layer.norm4)
        self.stages.append(_Stage.of(tokens, key_pe, transformer.final_attn_token_to_image, None, None))
        # The output upscaling's first convolution of the shared tokens (n, 4·C/4), its bias left out.
        self.upscaled = tokens @ pixel_block_weight(decoder.output_upscaling[0])

    def __call__(self, sparse: torch.Tensor) -> FactoredPrompts:
        """The layers for ``p`` prompts (``sparse`` (p, T', C)), and the IoU head's predictions."""
        decoder, transformer = self.decoder, self.decoder.transformer
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.expand(len(sparse), -1, -1), sparse), dim=1)
        per_layer = max(layer.cross_attn_image_to_token.num_heads for layer in transformer.layers) * tokens.shape[1] + 2
        keys = _Factored.shared(len(sparse), *self.stages[0].centred.shape, per_layer * len(transformer.layers), sparse)
        queries = tokens
        for layer, stage in zip(transformer.layers, self.stages):
            queries = _block(layer, stage, queries, keys, tokens)
        # Only the IoU token's row of the final attention: the IoU head reads nothing else.
        iou_token = queries[:, :1] + _token_to_image(transformer.final_attn_token_to_image, self.stages[-1],
                                                     queries[:, :1] + tokens[:, :1], keys)
        iou = decoder.iou_prediction_head(transformer.norm_final_attn(iou_token[:, 0]))
        return FactoredPrompts(self, queries, tokens, keys, iou)


def _token_to_image(module: Attention, stage: _Stage, queries: torch.Tensor, keys: _Factored) -> torch.Tensor:
    """``module(q=queries, k=keys + pe, v=keys)``: the few query tokens attend to the factored image tokens."""
    q = module.q_proj(queries)
    q = q / (q.shape[-1] // module.num_heads) ** 0.5
    return module.out_proj(keys.mix(stage.to_image_v, keys.dot(stage.to_image_k, q).softmax(-1)))


def _image_to_token(module: Attention, stage: _Stage, keys: _Factored, queries: torch.Tensor,
                    query_pe: torch.Tensor) -> None:
    """``keys += module(q=keys + pe, k=queries + query_pe, v=queries)``, factored: the attention's
    weights (n, heads·T) times the values through ``out_proj`` (heads·T, C), and the bias."""
    heads = module.num_heads
    k = module.k_proj(queries + query_pe)
    k = k / (k.shape[-1] // heads) ** 0.5
    # The softmax over T along a middle dimension: much faster than over a last dimension of T (7).
    weights = keys.dot(stage.to_token_q, k).softmax(-2)  # (h, p, T, n)
    values = module.v_proj(queries).unflatten(-1, (heads, -1)).transpose(1, 2)  # (p, h, T, d)
    out_weight, bias = _Blocks.attention(module)
    keys.append(weights.transpose(0, 1), values, out_weight)
    ones = values.new_ones(1, 1, 1, 1)
    keys.append(ones, ones.expand(len(values), -1, -1, -1), bias)


def _block(layer: TwoWayAttentionBlock, stage: _Stage, queries: torch.Tensor, keys: _Factored,
           query_pe: torch.Tensor) -> torch.Tensor:
    """``TwoWayAttentionBlock.forward`` (as ``pipeline.sam_decoder``'s) on factored image tokens
    ``keys``, which it updates; returns the queries."""
    queries = self_attention(layer, queries, query_pe)
    queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, stage, queries + query_pe, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    _image_to_token(layer.cross_attn_image_to_token, stage, keys, queries, query_pe)
    keys.layer_norm(layer.norm4, stage)
    return queries
