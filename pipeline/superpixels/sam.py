"""SAM backend: a fast, batched automatic-mask generator (DESIGN §4).

The masks follow ``segment_anything.SamAutomaticMaskGenerator`` with ``crop_n_layers=0`` (points
grid, three multimask outputs per point, predicted-IoU filter, stability score, box NMS); the
*mechanics* differ, because the reference spends most of its time on work whose result it drops:

- the image encoder runs on a batch of images, not one at a time;
- the mask decoder keeps each point prompt's copy of the image tokens factored, as the image's
  shared tokens plus a low-rank update (``pipeline.sam_factored``): the image's side of every layer
  runs once per image, a prompt costs products with small factors, in float32, the reference's
  arithmetic (to about 1e-7);
- the predicted-IoU filter runs before any mask exists: the IoU head reads the transformer's
  tokens, so only prompts with a passing output have their masks upscaled (the upscaling is more
  work per prompt than the factored transformer), and only their multimask outputs; the upscaling's
  first convolution reads the factored tokens, so a prompt's image tokens are never materialised;
- the stability score, boxes and NMS run on the decoder's 256×256 logits (cropped to the image),
  not on masks upsampled to the image: a mask NMS drops is never upsampled. Only the kept masks
  are brought to the *working resolution* (the image up to 1024 px on the long side, SAM's own
  frame beyond) for the partition, whose finished label map is brought to full size
  (``pipeline.partition.upsample_partition``, as the classical backends do);
- masks stay tensors on the device from the decoder to the partition: no RLE round trip, no
  ``MaskData.cat`` copies, no Python loop over masks;
- where the device computes in bfloat16 (a CUDA GPU, a CPU with AVX-512 bf16 or AMX) and
  ``sam_precision`` is auto (or bf16), the encoder runs under bf16 autocast and the masks are
  upscaled in bf16 (memory-bound elementwise work, which bf16 halves); the decoder's transformer,
  whose predicted IoUs meet SAM's thresholds, stays in float32.

The stability score on low-res logits and bf16 upscaling are approximations of the reference; how
close the partitions stay is measured (``python -m bench.precompute``: agreement with the reference's).

``point_grid="coarse-to-fine"`` (opt-in, recorded with the shards) asks fewer prompts for about the
same partition: every other point of every other row first, then only those of the grid's other
points that no mask kept so far covers, since a point inside a kept mask mostly finds that mask again.

A caller that has already run SAM's image encoder on the images (``svp predict``, whose mask head
needs the same embedding) builds the backend around that encoder (``image_encoder``) and hands it
the embeddings (:meth:`SamSuperpixels.from_embeddings`): the encoder runs once per image, not twice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.utils.amg import batched_mask_to_box, build_all_layer_point_grids, calculate_stability_score
from torchvision.ops import batched_nms

from pipeline.partition import PartitionConfig, paint_masks, partition_at_working_resolution, working_shape
from pipeline.sam_factored import FactoredDecoder
from pipeline.sam_model import SAM_MASK_STRIDE, build_sam
from pipeline.superpixels.base import SamOptions, SuperpixelBackend, SuperpixelResult
from pipeline.superpixels.sam_embeddings import SamImageEncoder, compute_dtype, stored_embedding
from pipeline.timing import StageTimer

# Prompts per decoder call by default (``--points-per-batch``): on a CPU a call's factors should stay in
# the cache (about 2 MB a prompt at 1024 px: the low-rank factor of 116 × 4096 floats).
_CPU_PROMPTS_PER_CALL, _GPU_PROMPTS_PER_CALL = 8, 256
_UPSAMPLE_CHUNK = 64  # masks upsampled at once: bounds the (n, 1024, 1024) float temporary
# Counts of masks after each filter, summed over images (``SamSuperpixels.counts``).
COUNTED = ("prompts", "candidates", "iou_passing", "stable", "kept")
_MULTIMASK = slice(1, None)  # the decoder's outputs 1-3: SAM's three masks per point (``multimask_output=True``)


@dataclass
class _Found:
    """One image's masks that passed the IoU and stability filters so far: low-res logits and scores."""

    logits: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class _Frame:
    """Where one image's masks live: SAM's resized input (``input_size`` inside the 1024 px frame),
    the decoder's low-res logits of it (``low_res``, a quarter of ``input_size``), the partition's
    ``working`` resolution."""

    input_size: tuple[int, int]
    low_res: tuple[int, int]
    working: tuple[int, int]


class SamSuperpixels(SuperpixelBackend):
    """SAM automatic masks → partition, for a batch of images at a time.

    ``stages`` (seconds per step of the generator: encoder, decoder, IoU filter, mask upscaling,
    stability, NMS, upsampling) and ``counts`` (masks after each filter, :data:`COUNTED`) add up
    over calls, for benchmarks; the worker's ``timer`` gets the coarse stages a shard records.
    """

    def __init__(self, options: SamOptions, partition: PartitionConfig, device: str | torch.device = "cpu",
                 timer: StageTimer | None = None, image_encoder: ImageEncoderViT | None = None) -> None:
        """``image_encoder``: one already in memory with the checkpoint's encoder weights, used instead
        of loading another (see :func:`pipeline.sam_model.build_sam`)."""
        super().__init__(timer)
        self.options = options
        self.partition = partition
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.device, options.sam_precision)
        self.sam = build_sam(options.sam_model, options.sam_checkpoint, self.device, image_encoder)
        self.encoder = SamImageEncoder(self.sam, options.images_per_batch, self.device, self.dtype)
        self.transform = self.encoder.transform
        # The mask upscaling in the compute dtype: a copy cast once, not at every call as autocast does; in
        # float32 the decoder's own (the transformer always runs on ``self.sam.mask_decoder``).
        upscaling = self.sam.mask_decoder.output_upscaling
        self.upscaling = upscaling if self.dtype == torch.float32 else copy.deepcopy(upscaling).to(self.dtype)
        self.dense_pe = self.sam.prompt_encoder.get_dense_pe()
        (self.point_grid,) = build_all_layer_point_grids(options.points_per_side, 0, 1)
        self.stages = StageTimer()
        self.counts = dict.fromkeys(COUNTED, 0)

    def __call__(self, images: Sequence[np.ndarray]) -> list[SuperpixelResult]:
        """The encoder and mask decoder count as ``superpixels``; the embedding they share is
        free here, so ``embeddings`` is only its copy to the host."""
        return self._partitions(self._generate(images))

    def from_embeddings(self, images: Sequence[np.ndarray], embeddings: torch.Tensor) -> list[SuperpixelResult]:
        """What ``self(images)`` gives, from ``embeddings`` (N, C, S/16, S/16) that this SAM's image
        encoder made of ``images`` (SAM's preprocessing: resize, normalise, pad), so it does not run."""
        if len(embeddings) != len(images):
            raise ValueError(f"{len(embeddings)} SAM embeddings for {len(images)} images")
        return self._partitions(self._given(images, embeddings.to(self.device)))

    def _partitions(self, generated: Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]) -> list[SuperpixelResult]:
        """Each image's masks → its partition (and its stored embedding when asked for)."""
        results = []
        for image, masks, embedding in self.timer.timed("superpixels", generated):
            with self.timer.stage("partition"), self.stages.stage("partition"):
                painted = paint_masks(masks).cpu().numpy()
                labels = partition_at_working_resolution(painted, image.shape[:2], self.partition)
                result = SuperpixelResult(labels=labels)
            if self.options.store_sam_embeddings:
                with self.timer.stage("embeddings"):
                    result.sam_embedding = stored_embedding(embedding)
            results.append(result)
        return results

    def generate_masks(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each image's kept masks as one (N, h, w) bool tensor at its working resolution
        (``working_shape``), in NMS order: what the partition gets."""
        return [masks for _, masks, _ in self._generate(images)]

    @torch.inference_mode()
    def _generate(self, images: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """(image, masks, embedding) per image; the encoder sees ``images_per_batch`` images at once."""
        for chunk, embeddings in self.stages.timed("encoder", self.encoder.batches(images)):
            yield from self._with_masks(chunk, embeddings)

    @torch.inference_mode()
    def _given(self, images: Sequence[np.ndarray],
               embeddings: torch.Tensor) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """As :meth:`_generate`, the encoder's work already done."""
        step = self.options.images_per_batch
        for start in range(0, len(images), step):
            yield from self._with_masks(images[start : start + step], embeddings[start : start + step])

    def _with_masks(self, images: Sequence[np.ndarray],
                    embeddings: torch.Tensor) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        return zip(images, self._masks(embeddings, [image.shape[:2] for image in images]), embeddings)

    def _masks(self, embeddings: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Points → decoder → IoU filter → upscale survivors → stability → boxes → NMS → upsample the kept."""
        frames = [self._frame(h, w) for h, w in sizes]
        found = [_Found() for _ in sizes]
        with self.stages.stage("decoder"):
            decoders = [FactoredDecoder(self.sam.mask_decoder, embedding.float(), self.dense_pe, self._no_mask())
                        for embedding in embeddings]
        step = self.options.points_per_batch or (
            _GPU_PROMPTS_PER_CALL if self.device.type == "cuda" else _CPU_PROMPTS_PER_CALL)
        for points, owner in self._prompt_rounds(sizes, frames, found):
            for image, decoder in enumerate(decoders):
                for batch in points[owner == image].split(step):
                    self._decode(decoder, batch, frames[image], found[image])
        return [self._kept(image_found, frame) for image_found, frame in zip(found, frames)]

    def _frame(self, height: int, width: int) -> _Frame:
        input_size = self.transform.get_preprocess_shape(height, width, self.transform.target_length)
        low_res = tuple(-(-side // SAM_MASK_STRIDE) for side in input_size)
        return _Frame(input_size, low_res, working_shape(height, width))

    def _prompt_rounds(self, sizes: Sequence[tuple[int, int]], frames: Sequence[_Frame],
                       found: Sequence[_Found]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rounds of prompts ((points, owner) of every image): one round of the whole grid; or, for
        ``coarse-to-fine``, the coarse grid, then the points no kept mask covers. A generator on purpose:
        the second round is chosen after the caller has decoded the first into ``found``."""
        side = self.options.points_per_side
        every = np.ones(side * side, dtype=bool)
        if self.options.point_grid == "full":
            yield self._prompts(sizes, [every] * len(sizes))
            return
        rows, cols = np.divmod(np.arange(side * side), side)
        coarse = (rows % 2 == 0) & (cols % 2 == 0)
        yield self._prompts(sizes, [coarse] * len(sizes))
        yield self._prompts(sizes, [~coarse & ~self._covered(size, frame, image_found)
                                    for size, frame, image_found in zip(sizes, frames, found)])

    def _covered(self, size: tuple[int, int], frame: _Frame, found: _Found) -> np.ndarray:
        """Which points of the grid fall on a pixel that a mask found so far covers."""
        if not found.logits:
            return np.zeros(len(self.point_grid), dtype=bool)
        threshold, (rows, cols) = self.sam.mask_threshold, frame.low_res
        covered = torch.stack([(logits[:, :rows, :cols] > threshold).any(0) for logits in found.logits]).any(0)
        xy = self.transform.apply_coords(self.point_grid * [size[1], size[0]], size) / SAM_MASK_STRIDE
        x = np.clip(xy[:, 0].astype(int), 0, cols - 1)
        y = np.clip(xy[:, 1].astype(int), 0, rows - 1)
        return covered.cpu().numpy()[y, x]

    def _prompts(self, sizes: Sequence[tuple[int, int]],
                 chosen: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``chosen`` points of every image's grid in its resized frame, image after image, and
        whose each point is."""
        points = [self.transform.apply_coords(self.point_grid[mine] * [w, h], (h, w))
                  for (h, w), mine in zip(sizes, chosen)]
        owner = np.repeat(np.arange(len(sizes)), [int(mine.sum()) for mine in chosen])
        return (torch.as_tensor(np.concatenate(points), dtype=torch.float32, device=self.device),
                torch.as_tensor(owner, device=self.device))

    def _no_mask(self) -> torch.Tensor:
        """(1, C, h, w): the dense embedding of a prompt without a mask, as SAM's prompt encoder makes it."""
        encoder = self.sam.prompt_encoder
        return encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *encoder.image_embedding_size)

    def _decode(self, decoder: FactoredDecoder, points: torch.Tensor, frame: _Frame, found: _Found) -> None:
        """One positive click per prompt → SAM's three multimask outputs (``multimask_output=True``);
        those that pass the IoU and stability filters go to ``found``."""
        options = self.options
        with self.stages.stage("decoder"):
            labels = torch.ones((len(points), 1), dtype=torch.int, device=self.device)
            sparse, _ = self.sam.prompt_encoder(points=(points[:, None], labels), boxes=None, masks=None)
            factored = decoder(sparse)
            scores = factored.iou[:, _MULTIMASK]
        self.counts["prompts"] += len(points)
        self.counts["candidates"] += scores.numel()
        with self.stages.stage("IoU filter"):
            passing = (scores > options.pred_iou_thresh) | (options.pred_iou_thresh <= 0.0)  # 0 disables, as in SAM
            prompts = passing.any(1).nonzero()[:, 0]
            passing = passing[prompts]
        if not len(prompts):
            return
        with self.stages.stage("mask upscaling"):
            logits = factored.mask_logits(prompts, _MULTIMASK, self.upscaling)[passing]
        scores = scores[prompts][passing]
        with self.stages.stage("stability"):
            rows, cols = frame.low_res
            stability = calculate_stability_score(logits[:, :rows, :cols], self.sam.mask_threshold,
                                                  options.stability_score_offset)
            stable = (stability >= options.stability_score_thresh) | (options.stability_score_thresh <= 0.0)
            found.logits.append(logits[stable])
            found.scores.append(scores[stable])
        self.counts["iou_passing"] += len(logits)
        self.counts["stable"] += int(stable.sum())

    def _kept(self, found: _Found, frame: _Frame) -> torch.Tensor:
        """NMS on the low-res masks' boxes, then the kept masks at the working resolution (bool, NMS order)."""
        if not found.logits:
            return torch.zeros((0, *frame.working), dtype=torch.bool, device=self.device)
        logits, scores = torch.cat(found.logits), torch.cat(found.scores)
        with self.stages.stage("NMS"):
            rows, cols = frame.low_res
            boxes = batched_mask_to_box(logits[:, :rows, :cols] > self.sam.mask_threshold).float()
            keep = batched_nms(boxes, scores, torch.zeros_like(scores), self.options.box_nms_thresh)
        self.counts["kept"] += len(keep)
        with self.stages.stage("upsampling"):
            return torch.cat([self.sam.postprocess_masks(chunk[:, None].float(), frame.input_size, frame.working)[:, 0]
                              > self.sam.mask_threshold for chunk in logits[keep].split(_UPSAMPLE_CHUNK)])


def build(partition: PartitionConfig, sam: SamOptions | None, device: str, timer: StageTimer | None) -> SamSuperpixels:
    """The registry's builder of ``sam``; ``BackendSpec.validate`` has made sure the options are there."""
    assert sam is not None, "--backend sam needs SAM options"
    return SamSuperpixels(sam, partition, device=device, timer=timer)
