"""Images + expressions → masks, and an overlay a person can look at.

:class:`Predictor` holds a trained model and the superpixel backend its run was trained with. What
every expression about an image shares is computed once per image (:meth:`Predictor.prepare`): its
superpixels, the vision encoder's patch features and SAM's image embedding. That embedding comes from the mask
head's SAM encoder and feeds the mask decoder for each expression (the batch's ``sam_embeddings``).
When the backend is SAM with the run's own checkpoint (the same bytes), its mask generator is built
around the mask head's encoder and reads the same embedding (``SamSuperpixels.from_embeddings``): one
SAM encoder in memory, run once per image. Another SAM (or none, for a classical backend) keeps its
own encoder, and SAM's encoder then runs twice per image, as it must.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.hashing import file_sha256
from pipeline.superpixels.base import SuperpixelBackend
from pipeline.superpixels.sam import SamSuperpixels
from pipeline.superpixels.sam_embeddings import compute_dtype, encoder_autocast
from pipeline.superpixels.spec import BackendSpec
from pipeline.vision_model import vision_pixels
from trainer.data import DataConfig, sam_inputs, superpixel_inputs
from trainer.export import load_exported_model

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)


@dataclass
class PreparedImage:
    """What every expression about one image shares, computed once for the image."""

    original_size: tuple[int, int]  # (H, W) of the image: the mask's size
    input_size: tuple[int, int]  # (h, w) of the image inside SAM's padded S×S frame
    sam_embedding: torch.Tensor  # (C, S/16, S/16), on the model's device
    vision_features: torch.Tensor  # (P, D): the vision encoder's patch features, on the model's device
    superpixels: torch.Tensor  # (V, V) long, labels 0..K-1 in the vision encoder's frame
    num_superpixels: int  # K


@torch.no_grad()
def sam_embeddings(model: torch.nn.Module, images: Sequence[np.ndarray], config: DataConfig, batch_size: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(N, C, S/16, S/16) embeddings by the mask head's SAM encoder computing in ``dtype``, ``batch_size``
    images per pass, and each image's (h, w) inside SAM's frame; SAM's own preprocessing
    (``trainer.data.sam_inputs``). The same embedding as the superpixel generator's encoder makes."""
    embeddings, sizes = [], []
    for start in range(0, len(images), batch_size):
        inputs = [sam_inputs(rgb, config) for rgb in images[start : start + batch_size]]
        pixels = torch.stack([pixels for pixels, _ in inputs]).to(model.device)
        with encoder_autocast(model.device, dtype):
            embeddings.append(model.mask_head.image_embeddings(pixels).float())
        sizes += [size for _, size in inputs]
    return torch.cat(embeddings), sizes


@torch.no_grad()
def vision_features(model: torch.nn.Module, images: Sequence[np.ndarray], config: DataConfig,
                    batch_size: int) -> torch.Tensor:
    """(N, P, D) patch features by the model's vision encoder, ``batch_size`` images per pass, on the
    input training gave it (``pipeline.vision_model.vision_pixels``)."""
    features = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([vision_pixels(rgb, config.vision_size, config.vision_mean, config.vision_std)
                              for rgb in images[start : start + batch_size]])
        features.append(model.vision(pixels.to(model.device))[0])
    return torch.cat(features)


def prepared_image(rgb: np.ndarray, labels: np.ndarray, sam_embedding: torch.Tensor, features: torch.Tensor,
                   input_size: tuple[int, int], config: DataConfig) -> PreparedImage:
    superpixels, count = superpixel_inputs(labels, rgb.shape[:2], config)
    return PreparedImage(rgb.shape[:2], input_size, sam_embedding, features, superpixels, count)


@torch.no_grad()
def decode_masks(model: torch.nn.Module, requests: Sequence[tuple[PreparedImage, str]]) -> list[tuple[np.ndarray, int]]:
    """One forward pass of the model over (image, expression) pairs: per pair the (H, W) bool mask and
    the number of visual tokens the LLM saw."""
    images = [image for image, _ in requests]
    batch = {
        "vision_features": torch.stack([image.vision_features for image in images]),
        "superpixels": torch.stack([image.superpixels for image in images]),
        "num_superpixels": torch.as_tensor([image.num_superpixels for image in images]),
        "sentences": [text for _, text in requests],
        "sam_embeddings": torch.stack([image.sam_embedding for image in images]),
        "input_sizes": torch.as_tensor([image.input_size for image in images]),
        "original_sizes": torch.as_tensor([image.original_size for image in images]),
    }
    logits, tokens = model.predict_masks(batch)
    full = model.mask_head.postprocess(logits, batch["input_sizes"], batch["original_sizes"])
    return [((logits.squeeze(0) > 0).cpu().numpy(), int(count)) for logits, count in zip(full, tokens)]


def predict_mask(model: torch.nn.Module, rgb: np.ndarray, superpixels: np.ndarray, text: str) -> tuple[np.ndarray, int]:
    """(H, W) bool mask for ``text`` on ``rgb`` (superpixels from the same backend the model trained on),
    and the number of visual tokens the LLM saw."""
    config = DataConfig(**model.data_config_fields())
    embeddings, [size] = sam_embeddings(model, [rgb], config, 1, compute_dtype(model.device))
    features = vision_features(model, [rgb], config, batch_size=1)
    [prediction] = decode_masks(model, [(prepared_image(rgb, superpixels, embeddings[0], features[0], size, config),
                                         text)])
    return prediction


def same_checkpoint(path: str | Path, other: str | Path) -> bool:
    """Whether two checkpoint paths hold the same weights: the same file, or the same bytes."""
    return os.path.samefile(path, other) or file_sha256(path) == file_sha256(other)


class Predictor:
    """A trained model with its superpixel backend: images and expressions → masks (module docstring)."""

    def __init__(self, model: torch.nn.Module, superpixels: SuperpixelBackend | None, batch_size: int = 8,
                 sam_precision: str = "auto") -> None:
        """``superpixels``: the backend the run trained with; None for a projector that reads no
        superpixels (mlp, pool: each image is then one region, as far as the model can tell).
        ``batch_size``: expressions per forward pass of the model, and images per pass of SAM's encoder.
        ``sam_precision``: what the mask head's SAM encoder computes in (``--sam-precision``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.superpixels, self.batch_size = model, superpixels, batch_size
        self.sam_dtype = compute_dtype(model.device, sam_precision)
        self.config = DataConfig(**model.data_config_fields())

    @classmethod
    def load(cls, run_dir: Path, spec: BackendSpec, device: str | torch.device = "cpu", batch_size: int = 8,
             sam_precision: str = "auto") -> Predictor:
        """The trained model of ``run_dir`` (a run directory or an export) on ``device`` and ``spec``'s
        backend, sharing SAM's encoder where ``spec`` is SAM with the model's own checkpoint (compared by
        content, not path)."""
        model = load_exported_model(run_dir, device)
        own = model.config
        if not model.projector.reads_superpixels:
            backend = None
        elif (spec.name == "sam" and own.sam_checkpoint is not None and spec.sam.sam_model == own.sam_model
                and same_checkpoint(spec.sam.sam_checkpoint, own.sam_checkpoint)):
            backend = SamSuperpixels(spec.sam, spec.partition, device, image_encoder=model.mask_head.sam.image_encoder)
        else:
            backend = spec.build(str(device))
        return cls(model, backend, batch_size, sam_precision)

    @property
    def shares_sam_encoder(self) -> bool:
        """Whether the superpixel generator reads the mask head's SAM embedding (one encoder pass per image)."""
        return (isinstance(self.superpixels, SamSuperpixels)
                and self.superpixels.sam.image_encoder is self.model.mask_head.sam.image_encoder)

    def prepare(self, images: Sequence[np.ndarray]) -> list[PreparedImage]:
        """Each image's superpixels, SAM embedding and vision features: what its expressions share."""
        embeddings, sizes = sam_embeddings(self.model, images, self.config, self.batch_size, self.sam_dtype)
        features = vision_features(self.model, images, self.config, self.batch_size)
        if self.superpixels is None:
            labels = [np.zeros(rgb.shape[:2], dtype=np.int64) for rgb in images]
        elif self.shares_sam_encoder:
            labels = [partition.labels for partition in self.superpixels.from_embeddings(images, embeddings)]
        else:
            labels = [partition.labels for partition in self.superpixels(images)]
        return [prepared_image(rgb, labels_of_image, embedding, image_features, size, self.config)
                for rgb, labels_of_image, embedding, image_features, size
                in zip(images, labels, embeddings, features, sizes, strict=True)]

    def masks(self, requests: Sequence[tuple[PreparedImage, str]]) -> list[tuple[np.ndarray, int]]:
        """(mask, visual tokens) per (image, expression), ``batch_size`` pairs per forward pass."""
        return [prediction for start in range(0, len(requests), self.batch_size)
                for prediction in decode_masks(self.model, requests[start : start + self.batch_size])]


def render_overlay(rgb: np.ndarray, mask: np.ndarray, text: str, alpha: float = 0.5) -> Image.Image:
    """The image with the mask tinted red and the expression written on a band above it."""
    tinted = rgb.astype(np.float32)
    tinted[mask] = (1 - alpha) * tinted[mask] + alpha * OVERLAY_COLOUR
    picture = Image.fromarray(tinted.clip(0, 255).astype(np.uint8))
    font = ImageFont.load_default(size=max(12, rgb.shape[1] // 30))
    band = max(20, int(font.size * 1.8))
    canvas = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    canvas.paste(picture, (0, band))
    ImageDraw.Draw(canvas).text((6, band // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas
