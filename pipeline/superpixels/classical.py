"""CPU-only classical backends (scikit-image): for machines without SAM weights, the demo and tests.

They are *not* the method: they over-segment by colour, not by object. They exist so the whole
product runs on a laptop, and they go through the same partition clean-up as SAM. Large images
are segmented at SAM's working resolution (longest side 1024) and the partition upsampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb, slic

from pipeline.partition import PartitionConfig, partition_at_working_resolution, working_shape
from pipeline.superpixels.base import Builder, SamOptions, SuperpixelBackend, SuperpixelResult
from pipeline.timing import StageTimer

CLASSICAL_PARAMS: dict[str, dict] = {
    "felzenszwalb": {"scale": 200.0, "sigma": 0.8, "min_size": 50},
    "slic": {"n_segments": 96, "compactness": 10.0, "start_label": 0},
}


class ClassicalSuperpixels(SuperpixelBackend):
    def __init__(self, name: str, partition: PartitionConfig, timer: StageTimer | None = None) -> None:
        if name not in CLASSICAL_PARAMS:
            raise ValueError(f"unknown classical backend {name!r}")
        super().__init__(timer)
        self.partition = partition
        self._segment = {"felzenszwalb": felzenszwalb, "slic": slic}[name]
        self._params = CLASSICAL_PARAMS[name]

    def __call__(self, images: Sequence[np.ndarray]) -> list[SuperpixelResult]:
        return [SuperpixelResult(labels=self._one(image)) for image in images]

    def _one(self, image: np.ndarray) -> np.ndarray:
        full = image.shape[:2]
        working = working_shape(*full)
        with self.timer.stage("superpixels"):
            if working != full:
                image = np.asarray(Image.fromarray(image).resize((working[1], working[0]), Image.Resampling.BILINEAR))
            raw = self._segment(image, **self._params)
        with self.timer.stage("partition"):
            return partition_at_working_resolution(raw, full, self.partition)


def builder(name: str) -> Builder:
    """The registry's builder of the classical backend ``name``: it runs on the CPU and takes no SAM
    options (SAM embeddings, when asked for, are added around it by ``BackendSpec.build``)."""

    def build(partition: PartitionConfig, sam: SamOptions | None, device: str,
              timer: StageTimer | None) -> ClassicalSuperpixels:
        return ClassicalSuperpixels(name, partition, timer)

    return build
