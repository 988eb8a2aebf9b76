"""SAM backend: checkpoint loading and a fast, batched automatic-mask generator (DESIGN §4).

The masks follow ``segment_anything.SamAutomaticMaskGenerator`` with ``crop_n_layers=0`` (points
grid, three multimask outputs per point, predicted-IoU filter, stability score, box NMS); only the
*mechanics* differ, because the reference spends most of its time outside the model:

- the image encoder runs on a batch of images, not one at a time, and so does the mask decoder:
  one call takes the point prompts of every image of the encoder batch, and runs its first layer's
  image side once per image and its attention through fused kernels (``sam_decoder.decode_prompts``);
- the predicted-IoU filter runs on the 256×256 low-res logits, so only survivors are upsampled;
- survivors are upsampled to the *working resolution* (the image itself up to 1024 px on the long
  side, SAM's own input frame beyond), never to a 3000×2000 photo's full size: the stability
  score, boxes, NMS and partition run there, and only the finished label map is brought to full
  size (``pipeline.partition.upsample_partition``, as the classical backends do);
- masks stay tensors on the device from the decoder to the partition: no RLE round trip, no
  ``MaskData.cat`` copies, no Python loop over masks; on a GPU the encoder and decoder run under
  bf16 autocast.

``tiny`` is SAM's architecture at toy sizes: every module of SAM (ViT image encoder with a neck,
prompt encoder, two-way-transformer mask decoder, SAM's 256-wide IoU head), with a 2-block,
32-wide encoder on a 512 px frame and a 64-wide prompt encoder and decoder, so its embedding is
64×32×32 instead of 256×64×64. The decoder is what a training step spends most of its time in,
and the tiny one costs a small fraction of SAM's, which is what lets the demo train on a CPU. It
exists for tests, the demo and CPU benchmarks, where the real ViT-H weights (2.5 GB, never
downloaded by us) are not at hand. Random, its masks mean nothing; ``svp tiny-sam --pretrain-on``
teaches it clicks → masks first (``trainer.sam_pretraining``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.amg import batched_mask_to_box, build_all_layer_point_grids, calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from pipeline.partition import PartitionConfig, paint_masks, partition_at_working_resolution, working_shape
from pipeline.superpixels.base import BackendConfigError, SamOptions, SuperpixelBackend, SuperpixelResult
from pipeline.superpixels.sam_decoder import decode_prompts
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
        return _tiny_architecture()
    return sam_model_registry[model_type](checkpoint=None)


def _tiny_architecture(image_size: int = 512, width: int = 64) -> Sam:
    """SAM's modules wired as ``segment_anything.build_sam._build_sam`` wires them, at toy sizes."""
    grid = image_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=(1,), window_size=14, out_chans=width,
        ),
        prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=4 * width, num_heads=4),
            transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


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

    def __call__(self, images: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        """One (C, S/16, S/16) embedding per image ((256, 64, 64) for SAM), on the device, in input order."""
        for _, embeddings in self.batches(images):
            yield from embeddings

    @torch.inference_mode()
    def batches(self, images: Sequence[np.ndarray]) -> Iterator[tuple[Sequence[np.ndarray], torch.Tensor]]:
        """(images, their (b, C, S/16, S/16) embeddings) for each run of ``images_per_batch`` images.

        Autocast ends before each yield: a generator suspended inside the ``with`` would leave it
        on for whatever code the consumer runs in between.
        """
        for start in range(0, len(images), self.images_per_batch):
            chunk = images[start : start + self.images_per_batch]
            with self.autocast():
                embeddings = self.sam.image_encoder(torch.cat([self._preprocess(image) for image in chunk]))
            yield chunk, embeddings

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
        for image, masks, embedding in self.timer.timed("superpixels", self._generate(images)):
            with self.timer.stage("partition"):
                painted = paint_masks(masks).cpu().numpy()
                labels = partition_at_working_resolution(painted, image.shape[:2], self.partition)
                result = SuperpixelResult(labels=labels)
            if self.options.store_embeddings:
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
            yield from zip(chunk, self._masks(embeddings, [image.shape[:2] for image in chunk]), embeddings)

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
