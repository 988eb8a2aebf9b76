"""SAM backend: checkpoint loading and a fast, batched automatic-mask generator (DESIGN §4).

The masks follow ``segment_anything.SamAutomaticMaskGenerator`` with ``crop_n_layers=0`` (points
grid, three multimask outputs per point, predicted-IoU filter, stability score, box NMS); only the
*mechanics* differ, because the reference spends most of its time outside the model:

- the image encoder runs on a batch of images, not one at a time;
- the predicted-IoU filter runs on the 256×256 low-res logits, so only survivors are upsampled;
- masks stay tensors on the device from the decoder to the partition: no RLE round trip, no
  ``MaskData.cat`` copies, no Python loop over masks.

``tiny`` is SAM's architecture with a 2-block, 32-wide image encoder: it has the real prompt
encoder, mask decoder and 256×64×64 embedding, but random weights. It exists for tests, the demo
and CPU benchmarks, where the real ViT-H weights (2.5 GB, never downloaded by us) are not at hand;
its masks mean nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batched_mask_to_box, build_all_layer_point_grids, calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from pipeline.partition import PartitionConfig, partition_from_masks
from pipeline.superpixels.base import BackendConfigError, SamOptions, SuperpixelBackend, SuperpixelResult
from pipeline.timing import StageTimer

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")
_UPSAMPLE_CHUNK = 64  # masks upsampled at once: bounds the (n, 1024, 1024) float temporary
_KEYS_SHOWN = 5


class SamCheckpointError(BackendConfigError):
    """The SAM checkpoint is missing, unreadable, or does not match ``--sam-model``."""


def _architecture(model_type: str) -> Sam:
    """SAM with random weights; under ``torch.device("meta")`` it allocates nothing."""
    if model_type not in SAM_MODEL_TYPES:
        raise SamCheckpointError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_MODEL_TYPES)}")
    if model_type == "tiny":
        return _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    return sam_model_registry[model_type](checkpoint=None)


def _load_state_dict(path: str | Path, model_type: str) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint memory-mapped (nothing is copied until used) and refuse what is not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {str(path)!r} (--sam-model {model_type}) does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for "this is not a torch file"
        raise SamCheckpointError(
            f"SAM checkpoint {str(path)!r} is not a torch state dict saved with torch.save: {error}"
        ) from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamCheckpointError(f"SAM checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _check_matches(state: Mapping[str, torch.Tensor], model: Sam, path: str | Path, model_type: str) -> None:
    """Compare names and shapes only, and say which keys are wrong (a vit_b file given as vit_h, ...)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected if k in state and tuple(state[k].shape) != expected[k]
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches (file vs model)": mismatched}
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:_KEYS_SHOWN])}{', ...' if len(keys) > _KEYS_SHOWN else ''}"
        for what, keys in found.items()
        if keys
    ]
    if problems:
        raise SamCheckpointError(
            f"SAM checkpoint {str(path)!r} does not match --sam-model {model_type}: " + "; ".join(problems)
        )


def validate_sam_checkpoint(path: str | Path, model_type: str) -> None:
    """Fail fast on the driver: the file exists, is a state dict and fits ``model_type``.

    Cheap on purpose (it runs before any work): the model is built on the ``meta`` device and the
    checkpoint is memory-mapped, so only names and shapes are read.
    """
    with torch.device("meta"):
        model = _architecture(model_type)
    _check_matches(_load_state_dict(path, model_type), model, path, model_type)


def build_sam(model_type: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Sam:
    """SAM of ``model_type`` in eval mode on ``device``; random weights when ``checkpoint`` is None.

    Weights are loaded with ``weights_only=True`` (a checkpoint is data, never code) and strictly.
    """
    model = _architecture(model_type)
    if checkpoint is not None:
        state = _load_state_dict(checkpoint, model_type)
        _check_matches(state, model, checkpoint, model_type)
        model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def save_tiny_sam(path: str | Path, seed: int = 0) -> Path:
    """Write a random-initialised ``tiny`` SAM state dict: the stand-in checkpoint for tests and the demo."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_sam("tiny")
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


class SamImageEncoder:
    """SAM's image encoder alone, a batch of images at a time: the embedding that both the mask
    generator and the trainer's mask decoder read (so it is computed once and can be stored)."""

    def __init__(self, sam: Sam, images_per_batch: int, device: torch.device) -> None:
        self.sam, self.images_per_batch, self.device = sam, images_per_batch, device
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        """One (256, 64, 64) embedding per image, on the device, in input order."""
        for start in range(0, len(images), self.images_per_batch):
            chunk = images[start : start + self.images_per_batch]
            with self.autocast():
                yield from self.sam.image_encoder(torch.cat([self._preprocess(image) for image in chunk]))

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        """What ``SamPredictor.set_image`` feeds the encoder: resize the long side to 1024, normalise, pad."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SAM expects RGB uint8 images (H, W, 3), got {image.dtype} {image.shape}")
        resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
        return self.sam.preprocess(resized.permute(2, 0, 1)[None].float())


def stored_embedding(embedding: torch.Tensor) -> np.ndarray:
    """The shard's ``sam.npy`` form: float16 on the CPU."""
    return embedding.to(torch.float16).cpu().numpy()


class WithSamEmbeddings(SuperpixelBackend):
    """Any backend's superpixels plus SAM image embeddings, for shards that feed a trainer whose
    SAM encoder should not run at every step (a classical partition with a SAM mask head)."""

    def __init__(self, inner: SuperpixelBackend, options: SamOptions, device: str | torch.device = "cpu") -> None:
        super().__init__(inner.timer)
        self.inner = inner
        device = torch.device(device)
        self.encoder = SamImageEncoder(build_sam(options.model_type, options.checkpoint, device),
                                       options.images_per_batch, device)

    def __call__(self, images: Sequence[np.ndarray]) -> list[SuperpixelResult]:
        results = self.inner(images)
        with self.timer.stage("embeddings"):
            for result, embedding in zip(results, self.encoder(images), strict=True):
                result.sam_embedding = stored_embedding(embedding)
        return results


class SamSuperpixels(SuperpixelBackend):
    """SAM automatic masks → partition, for a batch of images at a time."""

    def __init__(self, options: SamOptions, partition: PartitionConfig, device: str | torch.device = "cpu",
                 timer: StageTimer | None = None) -> None:
        super().__init__(timer)
        self.options = options
        self.partition = partition
        self.device = torch.device(device)
        self.sam = build_sam(options.model_type, options.checkpoint, self.device)
        self.encoder = SamImageEncoder(self.sam, options.images_per_batch, self.device)
        self.transform = self.encoder.transform
        (self.point_grid,) = build_all_layer_point_grids(options.points_per_side, 0, 1)

    def __call__(self, images: Sequence[np.ndarray]) -> list[SuperpixelResult]:
        """The encoder and mask decoder count as ``superpixels``; the embedding they share is
        free here, so ``embeddings`` is only its copy to the host."""
        results = []
        for masks, embedding in self.timer.timed("superpixels", self._generate(images)):
            with self.timer.stage("partition"):
                result = SuperpixelResult(labels=partition_from_masks(masks, self.partition))
            if self.options.store_embeddings:
                with self.timer.stage("embeddings"):
                    result.sam_embedding = stored_embedding(embedding)
            results.append(result)
        return results

    def generate_masks(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each image's kept masks as one (N, H, W) bool tensor, in NMS order (what the partition gets)."""
        return [masks for masks, _ in self._generate(images)]

    @torch.inference_mode()
    def _generate(self, images: Sequence[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(masks, embedding) per image; the encoder sees ``images_per_batch`` images at once."""
        for image, embedding in zip(images, self.encoder(images)):
            yield self._masks(embedding[None], image.shape[:2]), embedding

    def _masks(self, embedding: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Points grid → decoder → IoU filter → upsample survivors → stability → boxes → NMS."""
        options, threshold = self.options, self.sam.mask_threshold
        h, w = size
        input_size = self.transform.get_preprocess_shape(h, w, self.transform.target_length)
        points = self.transform.apply_coords(self.point_grid * [w, h], size)  # the grid in the resized frame
        points = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        kept_masks, kept_scores = [], []
        for batch in points.split(options.points_per_batch):
            low_res, scores = self._decode(embedding, batch)
            passing = (scores > options.pred_iou_thresh) | (options.pred_iou_thresh <= 0.0)  # 0 disables, as in SAM
            for logits, score in zip(low_res[passing].split(_UPSAMPLE_CHUNK), scores[passing].split(_UPSAMPLE_CHUNK)):
                logits = self.sam.postprocess_masks(logits[:, None], input_size, size)[:, 0]
                stability = calculate_stability_score(logits, threshold, options.stability_score_offset)
                stable = (stability >= options.stability_score_thresh) | (options.stability_score_thresh <= 0.0)
                kept_masks.append(logits[stable] > threshold)
                kept_scores.append(score[stable])
        # Never empty lists: there is at least one point batch, and splitting nothing gives one empty chunk.
        masks, scores = torch.cat(kept_masks), torch.cat(kept_scores)
        keep = batched_nms(batched_mask_to_box(masks).float(), scores, torch.zeros_like(scores), options.box_nms_thresh)
        return masks[keep]

    def _decode(self, embedding: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One positive click per prompt → (3·n, 256, 256) float32 low-res logits and their predicted IoU."""
        labels = torch.ones((len(points), 1), dtype=torch.int, device=self.device)
        with self.encoder.autocast():
            sparse, dense = self.sam.prompt_encoder(points=(points[:, None], labels), boxes=None, masks=None)
            low_res, scores = self.sam.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
        return low_res.flatten(0, 1).float(), scores.flatten().float()
