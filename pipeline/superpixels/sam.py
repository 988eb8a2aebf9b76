"""SAM backend: a fast, batched automatic-mask generator (DESIGN §4).

The masks follow ``segment_anything.SamAutomaticMaskGenerator`` with ``crop_n_layers=0`` (points
grid, three multimask outputs per point, predicted-IoU filter, stability score, box NMS); only the
*mechanics* differ, because the reference spends most of its time outside the model:

- the image encoder runs on a batch of images, not one at a time, and so does the mask decoder:
  one call takes the point prompts of every image of the encoder batch, and runs its first layer's
  image side once per image and its attention through fused kernels
  (``pipeline.sam_decoder.decode_prompts``);
- the predicted-IoU filter runs on the 256×256 low-res logits, so only survivors are upsampled;
- survivors are upsampled to the *working resolution* (the image itself up to 1024 px on the long
  side, SAM's own input frame beyond), never to a 3000×2000 photo's full size: the stability
  score, boxes, NMS and partition run there, and only the finished label map is brought to full
  size (``pipeline.partition.upsample_partition``, as the classical backends do);
- masks stay tensors on the device from the decoder to the partition: no RLE round trip, no
  ``MaskData.cat`` copies, no Python loop over masks; on a GPU the encoder and decoder run under
  bf16 autocast.

A caller that has already run SAM's image encoder on the images (``svp predict``, whose mask head
needs the same embedding) builds the backend around that encoder (``image_encoder``) and hands it
the embeddings (:meth:`SamSuperpixels.from_embeddings`): the encoder runs once per image, not twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.utils.amg import batched_mask_to_box, build_all_layer_point_grids, calculate_stability_score
from torchvision.ops import batched_nms

from pipeline.partition import PartitionConfig, paint_masks, partition_at_working_resolution, working_shape
from pipeline.sam_decoder import decode_prompts
from pipeline.sam_model import build_sam
from pipeline.superpixels.base import SamOptions, SuperpixelBackend, SuperpixelResult
from pipeline.superpixels.sam_embeddings import SamImageEncoder, stored_embedding
from pipeline.timing import StageTimer

_UPSAMPLE_CHUNK = 64  # masks upsampled at once: bounds the (n, 1024, 1024) float temporary


class SamSuperpixels(SuperpixelBackend):
    """SAM automatic masks → partition, for a batch of images at a time."""

    def __init__(self, options: SamOptions, partition: PartitionConfig, device: str | torch.device = "cpu",
                 timer: StageTimer | None = None, image_encoder: ImageEncoderViT | None = None) -> None:
        """``image_encoder``: one already in memory with the checkpoint's encoder weights, used instead
        of loading another (see :func:`pipeline.sam_model.build_sam`)."""
        super().__init__(timer)
        self.options = options
        self.partition = partition
        self.device = torch.device(device)
        self.sam = build_sam(options.sam_model, options.sam_checkpoint, self.device, image_encoder)
        self.encoder = SamImageEncoder(self.sam, options.images_per_batch, self.device)
        self.transform = self.encoder.transform
        (self.point_grid,) = build_all_layer_point_grids(options.points_per_side, 0, 1)

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
            with self.timer.stage("partition"):
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
        """(image, masks, embedding) per image; encoder and decoder see ``images_per_batch`` images at once."""
        for chunk, embeddings in self.encoder.batches(images):
            yield from self._with_masks(chunk, embeddings)

    @torch.inference_mode()
    def _given(self, images: Sequence[np.ndarray],
               embeddings: torch.Tensor) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """As :meth:`_generate`, the encoder's work already done: the decoder still sees
        ``images_per_batch`` images at once."""
        step = self.options.images_per_batch
        for start in range(0, len(images), step):
            yield from self._with_masks(images[start : start + step], embeddings[start : start + step])

    def _with_masks(self, images: Sequence[np.ndarray],
                    embeddings: torch.Tensor) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        return zip(images, self._masks(embeddings, [image.shape[:2] for image in images]), embeddings)

    def _masks(self, embeddings: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Points grids → decoder → IoU filter → upsample survivors → stability → boxes → NMS, per image."""
        options = self.options
        points, owner = self._prompts(sizes)
        frames = [(self.transform.get_preprocess_shape(h, w, self.transform.target_length), working_shape(h, w))
                  for h, w in sizes]
        # Each image's (masks, scores) chunks start with an empty one: an image none of whose masks
        # survive still ends with a (0, h, w) tensor, which the partition turns into one region.
        candidates = [[(torch.zeros((0, *working), dtype=torch.bool, device=self.device),
                        torch.zeros(0, device=self.device))] for _, working in frames]
        for batch, batch_owner in zip(points.split(options.points_per_batch), owner.split(options.points_per_batch)):
            low_res, scores, mask_owner = self._decode(embeddings, batch, batch_owner)
            passing = (scores > options.pred_iou_thresh) | (options.pred_iou_thresh <= 0.0)  # 0 disables, as in SAM
            for image in mask_owner[passing].unique().tolist():
                mine = passing & (mask_owner == image)
                candidates[image] += self._stable_masks(low_res[mine], scores[mine], *frames[image])
        return [self._nms(*map(torch.cat, zip(*found))) for found in candidates]

    def _prompts(self, sizes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's points grid in its resized frame, image after image, and whose each point is."""
        points = [self.transform.apply_coords(self.point_grid * [w, h], (h, w)) for h, w in sizes]
        owner = np.repeat(np.arange(len(sizes)), len(self.point_grid))
        return (torch.as_tensor(np.concatenate(points), dtype=torch.float32, device=self.device),
                torch.as_tensor(owner, device=self.device))

    def _stable_masks(self, low_res: torch.Tensor, scores: torch.Tensor, input_size: tuple[int, int],
                      working: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """IoU-passing low-res logits → (bool masks at ``working`` size, scores) that pass the stability filter."""
        options, threshold = self.options, self.sam.mask_threshold
        kept = []
        for logits, score in zip(low_res.split(_UPSAMPLE_CHUNK), scores.split(_UPSAMPLE_CHUNK)):
            logits = self.sam.postprocess_masks(logits[:, None], input_size, working)[:, 0]
            stability = calculate_stability_score(logits, threshold, options.stability_score_offset)
            stable = (stability >= options.stability_score_thresh) | (options.stability_score_thresh <= 0.0)
            kept.append((logits[stable] > threshold, score[stable]))
        return kept

    def _nms(self, masks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        boxes = batched_mask_to_box(masks).float()
        keep = batched_nms(boxes, scores, torch.zeros_like(scores), self.options.box_nms_thresh)
        return masks[keep]

    def _decode(self, embeddings: torch.Tensor, points: torch.Tensor,
                owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One positive click per prompt → (3·n, 256, 256) float32 low-res logits, their predicted IoU
        and the image each belongs to (SAM's three multimask outputs, as ``multimask_output=True``)."""
        labels = torch.ones((len(points), 1), dtype=torch.int, device=self.device)
        with self.encoder.autocast():
            sparse, dense = self.sam.prompt_encoder(points=(points[:, None], labels), boxes=None, masks=None)
            low_res, scores = decode_prompts(self.sam.mask_decoder, embeddings, owner,
                                             self.sam.prompt_encoder.get_dense_pe(), sparse, dense[:1])
        multimask = slice(1, None)
        outputs = low_res.shape[1] - 1
        return (low_res[:, multimask].flatten(0, 1).float(), scores[:, multimask].flatten().float(),
                owner.repeat_interleave(outputs))


def build(partition: PartitionConfig, sam: SamOptions | None, device: str, timer: StageTimer | None) -> SamSuperpixels:
    """The registry's builder of ``sam``; ``BackendSpec.validate`` has made sure the options are there."""
    assert sam is not None, "--backend sam needs SAM options"
    return SamSuperpixels(sam, partition, device=device, timer=timer)
