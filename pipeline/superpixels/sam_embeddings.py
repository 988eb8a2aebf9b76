"""SAM's image encoder, a batch of images at a time, and the wrapper that adds its embeddings to
any backend's output: the embedding the trainer's mask decoder reads (``sam.npy`` in a shard)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from pipeline.sam_model import build_sam
from pipeline.superpixels.base import SamOptions, SuperpixelBackend, SuperpixelResult


class SamImageEncoder:
    """SAM's image encoder alone, a batch of images at a time: the embedding that both the mask
    generator and the trainer's mask decoder read (so it is computed once and can be stored)."""

    def __init__(self, sam: Sam, images_per_batch: int, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """``dtype``: what the encoder computes in (bfloat16: under autocast); None: :func:`compute_dtype`."""
        self.sam, self.images_per_batch, self.device = sam, images_per_batch, device
        self.dtype = dtype or compute_dtype(device)
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
        return encoder_autocast(self.device, self.dtype)

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        """What ``SamPredictor.set_image`` feeds the encoder: resize the long side to 1024, normalise, pad."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SAM expects RGB uint8 images (H, W, 3), got {image.dtype} {image.shape}")
        resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
        return self.sam.preprocess(resized.permute(2, 0, 1)[None].float())


def compute_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype:
    """What SAM computes in for ``--sam-precision`` ``precision``. auto: bfloat16 where the device
    computes in it natively (a CUDA GPU that has it; a CPU with AVX-512 bf16 or AMX, where oneDNN's
    bf16 matmuls are about twice the float32 ones and every elementwise pass moves half the bytes),
    else float32. SAM was trained in float32; what bf16 changes in its masks is measured against the
    float32 reference (``bench.precompute``)."""
    if precision != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def encoder_autocast(device: str | torch.device, dtype: torch.dtype | None = None) -> torch.autocast:
    """bf16 autocast where SAM's image encoder computes in ``dtype`` (None: :func:`compute_dtype`) =
    bfloat16: every path that encodes an image for SAM (the precompute job, the mask generator,
    ``svp predict``'s mask head) enters this one, so they give the same embedding of an image."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype or compute_dtype(device)) == torch.bfloat16)


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
        self.encoder = SamImageEncoder(build_sam(options.sam_model, options.sam_checkpoint, device),
                                       options.images_per_batch, device, compute_dtype(device, options.sam_precision))

    def __call__(self, images: Sequence[np.ndarray]) -> list[SuperpixelResult]:
        results = self.inner(images)
        with self.timer.stage("embeddings"):
            for result, embedding in zip(results, self.encoder(images), strict=True):
                result.sam_embedding = stored_embedding(embedding)
        return results
