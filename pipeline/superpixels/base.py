"""The one interface every superpixel backend implements, the SAM settings, and a builder's signature.

This module imports no backend: the concrete ones (``classical``, ``sam``) import it, and the
registry in :mod:`pipeline.superpixels` names them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pipeline.errors import SvpError
from pipeline.hashing import file_sha256
from pipeline.partition import PartitionConfig
from pipeline.sam_model import SAM_MODEL_TYPES
from pipeline.timing import StageTimer


class BackendConfigError(SvpError, ValueError):
    """A backend was asked for with options that cannot work; raised before any work starts."""


@dataclass
class SuperpixelResult:
    """One image's output: the partition, and the frozen encoders' outputs that were asked for."""

    labels: np.ndarray  # (H, W) uint16, labels 0..K-1, H×W of the displayed image
    sam_embedding: np.ndarray | None = None  # (C, S/16, S/16) float16: (256, 64, 64) for SAM
    vision_features: np.ndarray | None = None  # (patches, channels) float16: (256, 768) for DINOv2-base at 224

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


def sam_checkpoint_field() -> Any:
    """``--sam-checkpoint``, declared through here by every config that names a SAM."""
    return field(default=None, metadata={
        "help": "official SAM .pth of --sam-model (e.g. sam_vit_h_4b8939.pth), or a tiny one from `svp tiny-sam`; "
                "never downloaded, and readable on every node that loads it. Where a command can do without: "
                "omitted means random weights (svp train: only for --sam-model tiny, for tests and the demo)"})


def sam_model_field(default: str | None, **metadata: Any) -> Any:
    """``--sam-model``, declared through here by every config that names a SAM, with ``metadata`` of
    the config's own. The default is the config's too: a model for tests and the demo has a tiny SAM,
    the precompute job SAM's largest, and ``svp predict`` none (the run's record says)."""
    return field(default=default, metadata={
        "help": "architecture of --sam-checkpoint (tiny: SAM at toy sizes, for tests and CPUs)",
        "choices": SAM_MODEL_TYPES, **metadata})


POINT_GRIDS = ("full", "coarse-to-fine")
SAM_PRECISIONS = ("auto", "bf16", "fp32")


def sam_precision_field(**metadata: Any) -> Any:
    """``--sam-precision``: what SAM computes in, for every command that runs SAM."""
    return field(default="auto", metadata={"choices": SAM_PRECISIONS, "help": (
        "what SAM's image encoder and the upscaling of the generator's masks compute in (the mask decoder's "
        "transformer, whose predicted IoUs meet SAM's thresholds, stays fp32). auto: bf16 where the device has it (a "
        "CUDA GPU; a CPU with AVX-512 bf16 or AMX), else fp32. bf16's masks agree with fp32's to rounding "
        "(BENCHMARKS.md) but, unlike fp32's, can differ by a pixel with how images are batched"),
        **metadata})


def point_grid_field(default: str | None, **metadata: Any) -> Any:
    """``--point-grid``: which points of SAM's grid prompt the mask decoder."""
    return field(default=default, metadata={"choices": POINT_GRIDS, "help": (
        "full: every point of the grid is a prompt (SAM's own generator); coarse-to-fine: every other point of every "
        "other row first, then only the grid's points that no mask kept so far covers (fewer prompts for about the "
        "same partition, BENCHMARKS.md). Recorded with the shards"), **metadata})


# The names shard configs record two settings by, kept from before the fields took their flags'
# names: a config hash must not change with a rename, and predict reads older records too.
_RECORDED_AS = {"sam_model": "model_type", "store_sam_embeddings": "store_embeddings"}


@dataclass(frozen=True)
class SamOptions:
    """SAM: which weights, and the automatic-mask settings (SAM's own defaults, DESIGN §4)."""

    sam_checkpoint: str | None = sam_checkpoint_field()
    sam_model: str = sam_model_field("vit_h")
    points_per_side: int = field(default=32, metadata={"help": "SAM point grid per side"})
    point_grid: str = point_grid_field("full", recorded_unless_default=True)
    points_per_batch: int | None = field(default=None, metadata={"speed_only": True, "help": (
        "point prompts per pass of SAM's mask decoder (in fp32 the same masks); omitted: 8 on a CPU, where 8 "
        "prompts' image tokens (2 MB each at 1024 px in bf16) stay in the cache, "
        "256 on a GPU")})
    sam_precision: str = sam_precision_field(speed_only=True)
    pred_iou_thresh: float = field(default=0.88, metadata={"help": "SAM predicted-IoU filter"})
    stability_score_thresh: float = field(default=0.95, metadata={"help": "SAM stability filter"})
    stability_score_offset: float = field(default=1.0, metadata={"help": "logit offset of SAM's stability score"})
    box_nms_thresh: float = field(default=0.7, metadata={"help": "box NMS IoU between SAM masks"})
    images_per_batch: int = field(default=4, metadata={
        "help": "images per SAM encoder batch (memory for speed; in fp32 the same masks)", "speed_only": True})
    store_sam_embeddings: bool = field(default=False, metadata={
        "help": "also write sam.npy (float16 256x64x64 SAM image embedding; with --backend sam from the same SAM "
                "pass, with a classical backend from SAM's encoder alone; needs --sam-checkpoint) so that training "
                "skips the SAM encoder"})

    def record(self) -> dict[str, Any]:
        """What of these settings changes the output, for the shard config and its hash: the
        checkpoint by its content (a path can move), and nothing that only changes the speed. A
        setting added later is left out at its default, so that the outputs written before it keep
        their hash (and resume)."""
        recorded = {_RECORDED_AS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)
                    if f.name != "sam_checkpoint" and not f.metadata.get("speed_only")
                    and not (f.metadata.get("recorded_unless_default") and getattr(self, f.name) == f.default)}
        return recorded | {"checkpoint_sha256": file_sha256(self.sam_checkpoint)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SamOptions:
        """The settings a shard config recorded (:meth:`record`), defaults for what it lacks; no checkpoint."""
        return cls(**{f.name: record[_RECORDED_AS.get(f.name, f.name)] for f in fields(cls)
                      if _RECORDED_AS.get(f.name, f.name) in record and f.name != "sam_checkpoint"})


# What the registry holds per backend name: (partition, SAM options or None, device, timer) → backend.
Builder = Callable[[PartitionConfig, SamOptions | None, str, StageTimer | None], SuperpixelBackend]
