"""Promptable pretraining of a SAM on referring data: the stand-in for SAM's own training.

Every real run starts from SAM's released weights, whose mask decoder already turns a prompt into
the mask of *one* object. A random-initialised ``tiny`` SAM has not learned that, and its
automatic masks are noise. Here it learns what SAM's own training teaches, in miniature (what
``svp tiny-sam --pretrain-on`` runs): a click inside an object → that object's mask, with three
multimask outputs of which the best one is trained (SAM's ambiguity-aware loss), the single-mask
output trained too (it is the one the mask head decodes ``[SEG]`` with: ``multimask_output=False``;
our objects are never parts of one another, so one click is no more ambiguous for it than SAM's
multi-click prompts), and the IoU head regressed onto the IoU each output really has, so the
automatic mask generator's predicted-IoU filter means something. Only ``train`` images are used
and no text: the referring task itself is left to the MLLM.

The whole SAM trains here, the encoder too, so that its automatic masks (``--backend sam
--sam-model tiny``) are masks of objects; afterwards it is frozen like any SAM, and the shards'
embeddings come from it. What it does *not* do on the demo's data is speed up the ``[SEG]``
fine-tuning measurably: in exploratory runs (3,000 steps on 400 images) val cIoU was 0.41 with
a SAM pretrained for 600 steps and 0.40 with a random one (BENCHMARKS.md), so the demo leaves it
off by default.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from pipeline.errors import SvpError
from pipeline.images import decode_image
from pipeline.refer import load_refer, ref_mask
from pipeline.sam_decoder import decode_prompts
from trainer.data import SAM_MASK_STRIDE, DataConfig, sam_inputs, sam_mask_target
from trainer.model.losses import mask_bce_per_sample, mask_dice_per_sample


class PretrainingError(SvpError, ValueError):
    """The referring data offers nothing to pretrain on."""


@dataclass(frozen=True)
class PromptableImage:
    """One image in SAM's frame and its objects' masks in the decoder's low-res frame."""

    pixels: torch.Tensor  # float32 (3, S, S), SAM-normalised and padded
    masks: torch.Tensor  # float32 (N, S/4, S/4), binary, one per distinct object


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 600
    images_per_step: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    bce_weight: float = 2.0  # the mask loss of the trainer (DESIGN §1), so both stages agree
    dice_weight: float = 0.5
    iou_weight: float = 1.0  # SAM's MSE between predicted and actual IoU
    seed: int = 0
    log_every: int = 50


def load_promptable_images(root: str | Path, sam_size: int, dataset: str = "refcoco", split_by: str = "unc",
                           split: str = "train") -> list[PromptableImage]:
    """The distinct referred objects of ``split``'s images (a REFER root), ready for SAM.

    Referred objects, not every annotation: they are what the trainer later asks SAM to
    segment, and an image with no ref is not in a REFER split at all.
    """
    refer = load_refer(root, dataset, split_by)
    config = DataConfig(sam_size=sam_size)
    images = []
    for sample in refer.samples:
        if sample.split != split:
            continue
        rgb = decode_image(refer.image_path(sample.image).read_bytes()).rgb
        pixels, input_size = sam_inputs(rgb, config)
        objects = {ref.ann_id: ref.segmentation for ref in sample.refs}
        masks = [sam_mask_target(ref_mask(segmentation, *rgb.shape[:2]), input_size, config)
                 for segmentation in objects.values()]
        masks = [mask for mask in masks if mask.any()]  # an object too small for the low-res frame
        if masks:
            images.append(PromptableImage(pixels, torch.stack(masks)))
    if not images:
        raise PretrainingError(f"no {split!r} image with a referred object in {root} ({dataset}, {split_by})")
    return images


def pretrain_sam(sam: Sam, images: list[PromptableImage], config: PretrainConfig,
                 progress: Callable[[int, float, float], None] | None = None) -> list[tuple[float, float]]:
    """Train ``sam`` in place on one click per object; returns the mean (loss, IoU of the best
    output) over each ``log_every`` steps (``progress(step, loss, iou)`` is called at the same times)."""
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    sam.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(sam.parameters(), lr=config.lr, betas=config.betas, weight_decay=0.0)
    window: list[tuple[float, float]] = []
    history: list[tuple[float, float]] = []
    for step in range(1, config.steps + 1):
        batch = rng.sample(images, min(config.images_per_step, len(images)))
        loss, iou = _step_loss(sam, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append((loss.item(), iou))
        if step % config.log_every == 0 or step == config.steps:
            history.append((sum(v[0] for v in window) / len(window), sum(v[1] for v in window) / len(window)))
            if progress is not None:
                progress(step, *history[-1])
            window = []
    sam.eval().requires_grad_(False)
    return history


def _step_loss(sam: Sam, batch: list[PromptableImage], config: PretrainConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """(loss, mean IoU of the best of the three outputs) for one click in every object of ``batch``."""
    embeddings = sam.image_encoder(torch.stack([image.pixels for image in batch]))
    targets = torch.cat([image.masks for image in batch])[:, None]  # (P, 1, h, w)
    owner = torch.cat([torch.full((len(image.masks),), index) for index, image in enumerate(batch)])
    points = _clicks(targets[:, 0], generator)
    sparse, dense = sam.prompt_encoder(points=(points[:, None], torch.ones(len(points), 1, dtype=torch.int)),
                                       boxes=None, masks=None)
    masks, predicted_iou = decode_prompts(sam.mask_decoder, embeddings, owner, sam.prompt_encoder.get_dense_pe(),
                                          sparse, dense[:1])  # no mask prompt: the same dense for every click
    prompts, outputs = masks.shape[:2]  # output 0: the single-mask output; 1-3: the multimask outputs
    flat_masks, flat_targets = masks.flatten(0, 1), targets.expand(-1, outputs, -1, -1).flatten(0, 1)
    mask_loss = (config.bce_weight * mask_bce_per_sample(flat_masks, flat_targets)
                 + config.dice_weight * mask_dice_per_sample(flat_masks, flat_targets)).view(prompts, outputs)
    with torch.no_grad():
        predicted, actual = masks > sam.mask_threshold, targets > 0.5
        iou = ((predicted & actual).flatten(2).sum(2) / (predicted | actual).flatten(2).sum(2).clamp(min=1)).float()
    best = 1 + mask_loss[:, 1:].argmin(1)
    loss = (mask_loss.gather(1, best[:, None]).mean() + mask_loss[:, 0].mean()
            + config.iou_weight * (predicted_iou - iou).square().mean())
    return loss, iou.gather(1, best[:, None]).mean().item()


def _clicks(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniformly drawn pixel of each (P, h, w) mask, as (x, y) at its centre in SAM's input frame."""
    flat = masks.flatten(1)
    choice = torch.multinomial(flat / flat.sum(1, keepdim=True), 1, generator=generator)[:, 0]
    width = masks.shape[2]
    xy = torch.stack([choice % width, choice // width], dim=1).float()
    return xy * SAM_MASK_STRIDE + SAM_MASK_STRIDE / 2

