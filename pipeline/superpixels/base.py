"""The one interface every superpixel backend implements, and the spec that names a backend.

A :class:`BackendSpec` is small, picklable and checked on the driver *before* any work starts
(missing or mismatched SAM checkpoint, unknown backend); each Ray worker then calls
:meth:`BackendSpec.build` once to hold one model for all the shards it processes.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.partition import PartitionConfig
from pipeline.timing import StageTimer

BACKENDS = ("sam", "felzenszwalb", "slic")
CLASSICAL_BACKENDS = ("felzenszwalb", "slic")


class BackendConfigError(ValueError):
    """A backend was asked for with options that cannot work; raised before any work starts."""


@dataclass
class SuperpixelResult:
    """One image's output: the partition, and SAM's image embedding when it was asked for."""

    labels: np.ndarray  # (H, W) uint16, labels 0..K-1, H×W of the displayed image
    sam_embedding: np.ndarray | None = None  # (C, S/16, S/16) float16: (256, 64, 64) for SAM

    @property
    def num_superpixels(self) -> int:
        return int(self.labels.max()) + 1


class SuperpixelBackend(ABC):
    """Turns a batch of RGB uint8 images (H, W, 3) into one partition each.

    ``timer`` is where the backend charges its own stages (``superpixels``, ``partition``,
    ``embeddings``), so that the shard record says which of them the time went to.
    """

    def __init__(self, timer: StageTimer | None = None) -> None:
        self.timer = timer if timer is not None else StageTimer()

    @abstractmethod
    def __call__(self, images: Sequence[np.ndarray]) -> list[SuperpixelResult]: ...


@dataclass(frozen=True)
class SamOptions:
    """SAM automatic-mask settings (SAM's own defaults, DESIGN §4) and where the weights are."""

    checkpoint: str
    model_type: str = "vit_h"
    points_per_side: int = 32
    points_per_batch: int = 256
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    images_per_batch: int = 4
    store_embeddings: bool = False


@dataclass(frozen=True)
class BackendSpec:
    """Which backend, with which settings; what the shard config hash is computed from."""

    name: str
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sam: SamOptions | None = None

    def validate(self) -> None:
        """Refuse, with a message naming the option, anything that would fail on every worker."""
        if self.name not in BACKENDS:
            raise BackendConfigError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")
        if self.name == "sam":
            if self.sam is None or not self.sam.checkpoint:
                raise BackendConfigError(
                    "--backend sam needs --sam-checkpoint PATH (an official SAM .pth such as "
                    "sam_vit_h_4b8939.pth); weights are never downloaded. For CPU-only runs use "
                    "--backend felzenszwalb or --backend slic."
                )
            from pipeline.superpixels.sam import validate_sam_checkpoint

            validate_sam_checkpoint(self.sam.checkpoint, self.sam.model_type)
        elif self.stores_sam_embeddings:
            if not self.sam.checkpoint:
                raise BackendConfigError(
                    "--store-sam-embeddings needs --sam-checkpoint: the embedding comes from SAM's image encoder"
                )
            from pipeline.superpixels.sam import validate_sam_checkpoint

            validate_sam_checkpoint(self.sam.checkpoint, self.sam.model_type)

    def config(self) -> dict:
        """Everything that changes the output bytes (the checkpoint by content, not by path)."""
        config: dict = {"backend": self.name, "partition": self.partition.as_dict()}
        if self.name == "sam" or self.stores_sam_embeddings:
            assert self.sam is not None
            options = {k: v for k, v in vars(self.sam).items() if k not in ("checkpoint", "points_per_batch", "images_per_batch")}
            config["sam"] = options | {"checkpoint_sha256": file_sha256(self.sam.checkpoint)}
        if self.name != "sam":
            from pipeline.superpixels.classical import CLASSICAL_PARAMS

            config["params"] = CLASSICAL_PARAMS[self.name]
        return config

    @property
    def stores_sam_embeddings(self) -> bool:
        return self.sam is not None and self.sam.store_embeddings

    def build(self, device: str = "cpu", timer: StageTimer | None = None) -> SuperpixelBackend:
        """Instantiate the backend on ``device`` (called once per worker), timing its stages on ``timer``."""
        if self.name == "sam":
            from pipeline.superpixels.sam import SamSuperpixels

            assert self.sam is not None
            return SamSuperpixels(self.sam, self.partition, device=device, timer=timer)
        from pipeline.superpixels.classical import ClassicalSuperpixels

        backend: SuperpixelBackend = ClassicalSuperpixels(self.name, self.partition, timer)
        if self.stores_sam_embeddings:
            from pipeline.superpixels.sam import WithSamEmbeddings

            assert self.sam is not None
            backend = WithSamEmbeddings(backend, self.sam, device=device)
        return backend


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
