"""The wrapper that adds the frozen vision encoder's patch features to any backend's output:
what the trainer reads instead of running the encoder (``vision.npy`` in a shard)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.superpixels.base import SuperpixelBackend, SuperpixelResult
from pipeline.vision_model import STORED_DTYPE, VisionOptions, vision_pixels

IMAGES_PER_PASS = 16  # bounds the encoder's activations whatever the shard size


class WithVisionFeatures(SuperpixelBackend):
    """Any backend's superpixels plus the vision encoder's patch features of each image.

    The encoder runs in float32, as a trainer without stored features runs it, on exactly the input
    the trainer would give it (:func:`pipeline.vision_model.vision_pixels`); only the stored copy is
    rounded to float16.
    """

    def __init__(self, inner: SuperpixelBackend, options: VisionOptions, device: str | torch.device = "cpu") -> None:
        super().__init__(inner.timer)
        self.inner = inner
        self.device = torch.device(device)
        self.size = options.resolved_size()
        self.encoder = options.load().to(self.device)

    def __call__(self, images: Sequence[np.ndarray]) -> list[SuperpixelResult]:
        results = self.inner(images)
        with self.timer.stage("embeddings"):
            for start in range(0, len(images), IMAGES_PER_PASS):
                chunk = images[start : start + IMAGES_PER_PASS]
                pixels = torch.stack([vision_pixels(image, self.size, self.encoder.mean, self.encoder.std)
                                      for image in chunk]).to(self.device)
                features, _ = self.encoder(pixels)
                for result, image_features in zip(results[start : start + IMAGES_PER_PASS], features, strict=True):
                    result.vision_features = image_features.float().cpu().numpy().astype(STORED_DTYPE)
        return results
