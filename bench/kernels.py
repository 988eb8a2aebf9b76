"""The train step's kernel choices, side by side: ``python -m bench.kernels``.

- attention: PyTorch's flash kernel against its math kernel (``pipeline.attention.sdpa_backend``
  picks between them), forward + backward at the shapes svp trains at (the LLM's self-attention,
  SAM's decoder's two cross-attentions), and forward alone at the automatic mask generator's;
- SAM's output upscaling: segment-anything's modules (two transposed convolutions, ``LayerNorm2d``,
  then the hypernetwork product) against ``pipeline.sam_decoder.upscaled_masks`` (matmuls on
  channel-last tokens), in a training step (batch 8, bf16 autocast, forward + backward) and in
  inference (64 prompts, fp32 and bf16 autocast);
- the automatic mask generator's decoder: the IoU predictions of point prompts on one image,
  ``pipeline.sam_decoder.decode_tokens`` (every prompt's image tokens in full, bf16 weights, as the
  generator ran it before) against ``pipeline.sam_factored.FactoredDecoder`` (float32), at 8 and 64
  prompts per call; the bf16 masks of 8 prompts that pass the IoU filter, from their image tokens
  materialised against from the factored ones (``FactoredPrompts.mask_logits``); and the factored
  decoder's milliseconds per prompt at 8 against 4 and 32 prompts per call (the generator's default
  on a CPU is 8).

Milliseconds per call, the median of ``--repeats`` after a warm-up, and the ratio of each pair;
results go to ``RESULTS/kernels.json``.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import OutputOptions, describe_device, machine_load, write_json
from jobs.options import OptionsParser
from pipeline.sam_decoder import DecodedPrompts, decode_tokens, mask_logits, predicted_iou, upscaled_masks
from pipeline.sam_factored import FactoredDecoder

NAME = "kernels"


@dataclass(frozen=True)
class KernelOptions:
    """How often each kernel runs."""

    repeats: int = field(default=10, metadata={"help": (
        "timed calls of each kernel after a warm-up (the median is kept)")})


OPTIONS = (KernelOptions, OutputOptions)
# (name, batch, heads, queries, keys, head width, causal mask): bf16, forward + backward
TRAIN_ATTENTION = (
    ("LLM, 52 tokens", 8, 14, 52, 52, 64, True),
    ("LLM, 128 tokens", 8, 14, 128, 128, 64, True),
    ("LLM, 192 tokens", 8, 14, 192, 192, 64, True),
    ("LLM, 256 tokens", 8, 14, 256, 256, 64, True),
    ("SAM decoder, 4096 image tokens onto 6 prompt tokens", 8, 8, 4096, 6, 16, False),
    ("SAM decoder, 6 prompt tokens onto 4096 image tokens", 8, 8, 6, 4096, 16, False),
)
# the automatic mask generator: 64 prompts of 7 tokens, fp32, forward only
INFERENCE_ATTENTION = (
    ("SAM decoder, 4096 image tokens onto 7 prompt tokens", 64, 8, 4096, 7, 16, False),
    ("SAM decoder, 7 prompt tokens onto 4096 image tokens", 64, 8, 7, 4096, 16, False),
)


def build_parser() -> OptionsParser:
    """``python -m bench.kernels``'s flags (tests/test_options.py walks them with every other command's)."""
    parser = OptionsParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    parser.add_options(*OPTIONS)
    return parser


def milliseconds(run: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of ``run`` over ``repeats`` calls, after a warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def attention(shape: tuple, backward: bool, repeats: int) -> dict[str, float]:
    """{flash, math}: milliseconds of one attention call of ``shape`` (see :data:`TRAIN_ATTENTION`)."""
    _, batch, heads, queries, keys, width, causal = shape
    dtype = torch.bfloat16 if backward else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, width, generator=generator, dtype=dtype, requires_grad=backward)
               for n in (queries, keys, keys))
    mask = torch.ones(queries, keys, dtype=torch.bool).tril()[None, None] if causal else None
    timed = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
        def call(backend: SDPBackend = backend) -> None:
            with sdpa_kernel(backend), torch.set_grad_enabled(backward):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if backward:
                out.sum().backward()
        timed[name] = milliseconds(call, repeats)
    return timed


def vit_b_decoder() -> MaskDecoder:
    """SAM ViT-B's mask decoder (every SAM's: 256 wide, 8 heads), random weights."""
    torch.manual_seed(0)
    return MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                         num_heads=8)).eval()


def upscaling(prompts: int, train: bool, dtype: torch.dtype | None, repeats: int) -> dict[str, float]:
    """{modules, matmuls}: milliseconds of SAM ViT-B's output upscaling and hypernetwork product for
    ``prompts`` prompts (``train``: forward + backward), under ``dtype`` autocast (None: fp32)."""
    decoder = vit_b_decoder()
    src = torch.randn(prompts, 64, 64, 256, requires_grad=train)
    hyper_in = torch.randn(prompts, decoder.num_mask_tokens, 32, requires_grad=train)

    def modules() -> torch.Tensor:
        upscaled = decoder.output_upscaling(src.permute(0, 3, 1, 2))
        return (hyper_in @ upscaled.flatten(2)).view(prompts, -1, *upscaled.shape[2:])

    def matmuls() -> torch.Tensor:
        return upscaled_masks(decoder.output_upscaling, src, hyper_in)

    timed = {}
    for name, masks in (("modules", modules), ("matmuls", matmuls)):
        def call(masks: Callable[[], torch.Tensor] = masks) -> None:
            autocast = torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None)
            with torch.set_grad_enabled(train), autocast:
                out = masks()
            if train:
                out.float().square().mean().backward()
        timed[name] = milliseconds(call, repeats)
    return timed


def one_image(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random image embedding of a 1024 px image (1, 256, 64, 64), its positional encoding and a
    dense prompt embedding (no mask prompt), all the same shape."""
    return tuple(torch.randn(1, 256, 64, 64, generator=generator) for _ in range(3))


def point_decoders(prompts: int, repeats: int) -> dict[str, float]:
    """{full, factored}: milliseconds of the IoU predictions of ``prompts`` point prompts on one image."""
    decoder, generator = vit_b_decoder(), torch.Generator().manual_seed(0)
    embedding, pe, dense = one_image(generator)
    sparse = torch.randn(prompts, 2, 256, generator=generator)
    full = copy.deepcopy(decoder).to(torch.bfloat16)
    owner = torch.zeros(prompts, dtype=torch.long)
    factored = FactoredDecoder(decoder, embedding[0], pe, dense)

    def decode_in_full() -> None:
        tokens = decode_tokens(full, embedding.bfloat16(), owner, pe.bfloat16(), sparse.bfloat16(), dense.bfloat16())
        predicted_iou(full, tokens)

    with torch.inference_mode():
        return {"full": milliseconds(decode_in_full, repeats),
                "factored": milliseconds(lambda: factored(sparse), repeats)}


def generator_masks(prompts: int, repeats: int) -> dict[str, float]:
    """{materialised, factored}: milliseconds of the bf16 multimask logits of ``prompts`` point
    prompts on one image from the factored decoder's outputs: their image tokens materialised, then
    ``mask_logits`` (what the generator ran before), against ``FactoredPrompts.mask_logits``."""
    decoder, generator = vit_b_decoder(), torch.Generator().manual_seed(0)
    embedding, pe, dense = one_image(generator)
    sparse = torch.randn(prompts, 2, 256, generator=generator)
    full, upscaling = copy.deepcopy(decoder).to(torch.bfloat16), copy.deepcopy(decoder.output_upscaling).bfloat16()
    every = torch.arange(prompts)
    factored_decoder = FactoredDecoder(decoder, embedding[0], pe, dense)

    def materialised() -> torch.Tensor:
        keys = factored.keys[every]  # scale ⊙ (P + zt.T @ c), as (p, n, C)
        tokens = keys.scale[..., None] * (factored_decoder.stages[-1].tokens + keys.zt.transpose(1, 2) @ keys.c)
        decoded = DecodedPrompts(factored.decoded_tokens(every), tokens.unflatten(1, factored_decoder.size))
        return mask_logits(full, decoded.to(torch.bfloat16), slice(1, None))

    with torch.inference_mode():
        factored = factored_decoder(sparse)
        return {"materialised": milliseconds(materialised, repeats),
                "factored": milliseconds(lambda: factored.mask_logits(every, slice(1, None), upscaling), repeats)}


def factored_per_prompt(prompts: Sequence[int], repeats: int) -> dict[str, float]:
    """{"N=…": milliseconds per prompt of the factored decoder at N prompts per call}."""
    decoder, generator = vit_b_decoder(), torch.Generator().manual_seed(0)
    embedding, pe, dense = one_image(generator)
    factored = FactoredDecoder(decoder, embedding[0], pe, dense)
    timed = {}
    with torch.inference_mode():
        for count in prompts:
            sparse = torch.randn(count, 2, 256, generator=generator)
            timed[f"N={count}"] = milliseconds(lambda sparse=sparse: factored(sparse), repeats) / count
    return timed


def run(repeats: int) -> dict:
    rows = []
    for shape in TRAIN_ATTENTION:
        rows.append({"kernel": "attention", "case": f"{shape[0]}, batch {shape[1]}, bf16, forward + backward",
                     **attention(shape, True, repeats)})
    for shape in INFERENCE_ATTENTION:
        rows.append({"kernel": "attention", "case": f"{shape[0]}, {shape[1]} prompts, fp32, forward",
                     **attention(shape, False, repeats)})
    for prompts, train, dtype, label in ((8, True, torch.bfloat16, "batch 8, bf16, forward + backward"),
                                         (64, False, None, "64 prompts, fp32, forward"),
                                         (64, False, torch.bfloat16, "64 prompts, bf16, forward")):
        rows.append({"kernel": "upscaling", "case": label, **upscaling(prompts, train, dtype, repeats)})
    for prompts in (8, 64):
        rows.append({"kernel": "point decoder", "case": f"IoU of {prompts} point prompts on one 1024 px image, "
                     "ms per call", **point_decoders(prompts, repeats)})
    rows.append({"kernel": "generator masks", "case": "bf16 multimask logits of 8 point prompts from the factored "
                 "decoder's outputs", **generator_masks(8, repeats)})
    for pair in ((8, 4), (8, 32)):
        rows.append({"kernel": "point decoder", "case": "factored, ms per prompt at N prompts per call",
                     **factored_per_prompt(pair, repeats)})
    return {"device": describe_device("cpu"), "repeats": repeats, "rows": rows}


def format_table(results: dict) -> str:
    lines = [f"milliseconds per call, median of {results['repeats']}; {results['device']}",
             f"{'case':<100}{'first':>18}{'second':>18}{'second/first':>14}"]
    for row in results["rows"]:
        (first, a), (second, b) = [(k, v) for k, v in row.items() if k not in ("kernel", "case")]
        lines.append(f"{row['kernel'] + ': ' + row['case']:<100}{first:>9}{a:>9.1f}{second:>9}{b:>9.1f}{b / a:>14.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    load = machine_load(args)
    results = {**run(args.repeats), **load}
    write_json(args.results / f"{NAME}.json", results)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
