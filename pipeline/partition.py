"""Overlapping masks → one disjoint label map: the semantic superpixels (DESIGN §4).

Every backend ends here, so the partition invariants (each pixel labelled exactly once, labels
0..K-1 contiguous, no region under ``min_area`` unless the whole image is, K ≤ ``max_regions``)
hold whatever produced the regions. The steps are vectorised over pixels; the merge loop runs
once per *round* of merges, never once per superpixel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from skimage.measure import label as connected_components

_PAINT_CHUNK = 64  # masks painted per step: bounds the N×H×W temporary on large images


@dataclass(frozen=True)
class PartitionConfig:
    """Clean-up applied to every raw partition; part of the shard config hash."""

    min_area: int = field(default=100, metadata={
        "help": "superpixels smaller than this many pixels merge into their largest neighbour"})
    max_regions: int = field(default=256, metadata={
        "help": "upper bound on superpixels (= visual tokens) per image; the smallest merge first"})

    def __post_init__(self) -> None:
        if self.min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")
        if not 1 <= self.max_regions <= np.iinfo(np.uint16).max:
            raise ValueError(f"max_regions must be in 1..65535 (labels are uint16), got {self.max_regions}")

    def as_dict(self) -> dict:
        return asdict(self)


def paint_masks(masks: torch.Tensor) -> torch.Tensor:
    """Paint (N, H, W) boolean masks from the largest to the smallest; -1 where no mask covers.

    Painting in that order means a pixel ends up with the *smallest* mask covering it, so finer
    masks (a face inside a person) keep their pixels. Computed as a max over area ranks, on
    whatever device the masks live on.
    """
    n, h, w = masks.shape
    painted = torch.full((h, w), -1, dtype=torch.int64, device=masks.device)
    if n == 0:
        return painted
    areas = masks.flatten(1).sum(1)
    order = torch.argsort(areas, descending=True, stable=True)
    rank_dtype = torch.int16 if n < torch.iinfo(torch.int16).max else torch.int32
    top = torch.zeros((h, w), dtype=rank_dtype, device=masks.device)
    for start in range(0, n, _PAINT_CHUNK):
        idx = order[start : start + _PAINT_CHUNK]
        ranks = torch.arange(start + 1, start + 1 + len(idx), device=masks.device, dtype=rank_dtype)
        top = torch.maximum(top, (masks[idx].to(rank_dtype) * ranks[:, None, None]).amax(0))
    covered = top > 0
    painted[covered] = order[top[covered].long() - 1]
    return painted


def partition_from_masks(masks: torch.Tensor, config: PartitionConfig) -> np.ndarray:
    """Overlapping (N, H, W) masks → finished (H, W) uint16 partition (paint, fill gaps, clean up)."""
    return finalize_partition(paint_masks(masks).cpu().numpy(), config)


def finalize_partition(labels: np.ndarray, config: PartitionConfig) -> np.ndarray:
    """Any integer label map (negative = unlabelled) → a partition that meets the invariants.

    Unlabelled connected regions become superpixels of their own; regions under ``min_area``
    merge into their largest neighbour; while K exceeds ``max_regions`` the smallest regions merge
    the same way.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"a label map must be a non-empty 2-D array, got shape {labels.shape}")
    labels = labels.astype(np.int64, copy=True)
    gaps = labels < 0
    if gaps.any():
        components = connected_components(gaps, connectivity=1)
        labels[gaps] = labels.max(initial=-1) + components[gaps]
    labels, k = _compact(labels)
    labels = _merge_until_clean(labels, k, config)
    return labels.astype(np.uint16)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..K-1 in increasing order of the old labels (deterministic)."""
    values, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape), len(values)


def _largest_neighbours(labels: np.ndarray, k: int, areas: np.ndarray) -> np.ndarray:
    """For each region, the adjacent region (4-connectivity) with the largest (area, id); -1 if none."""
    pairs = [
        (labels[:, :-1], labels[:, 1:]),
        (labels[:-1, :], labels[1:, :]),
    ]
    src = np.concatenate([np.concatenate([a[a != b], b[a != b]]) for a, b in pairs])
    dst = np.concatenate([np.concatenate([b[a != b], a[a != b]]) for a, b in pairs])
    best = np.full(k, -1, dtype=np.int64)
    if src.size == 0:
        return best
    # Sort by (src, area[dst], dst): the last entry of each src group is its largest neighbour.
    order = np.lexsort((dst, areas[dst], src))
    src, dst = src[order], dst[order]
    last = np.r_[src[1:] != src[:-1], True]
    best[src[last]] = dst[last]
    return best


def _merge_until_clean(labels: np.ndarray, k: int, config: PartitionConfig) -> np.ndarray:
    # An image smaller than min_area ends as one region: every region is small, so all merge.
    while k > 1:
        areas = np.bincount(labels.ravel(), minlength=k)
        small = np.flatnonzero(areas < config.min_area)
        if small.size:
            merging = small
        elif k > config.max_regions:
            merging = np.lexsort((np.arange(k), areas))[: k - config.max_regions]
        else:
            break
        neighbour = _largest_neighbours(labels, k, areas)
        parent = np.arange(k)
        has_neighbour = neighbour[merging] >= 0
        parent[merging[has_neighbour]] = neighbour[merging[has_neighbour]]
        # Two regions that chose each other: the larger (by area, then id) stays a root.
        mutual = parent[parent] == np.arange(k)
        key = areas * k + np.arange(k)
        stays = mutual & (key > key[parent])
        parent[stays] = np.flatnonzero(stays)
        while not np.array_equal(parent, parent[parent]):  # pointer jumping: follow chains to roots
            parent = parent[parent]
        labels, new_k = _compact(parent[labels])
        if new_k == k:
            break
        k = new_k
    return labels


def working_shape(height: int, width: int, longest: int = 1024) -> tuple[int, int]:
    """The (h, w) to segment at: the image itself, or scaled so its longest side is ``longest``.

    Superpixels of a 3000×2000 photo need not be found at full resolution (SAM itself sees 1024
    px); the label map is then brought back to full size by :func:`upsample_partition`.
    """
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def upsample_partition(labels: np.ndarray, shape: tuple[int, int], config: PartitionConfig) -> np.ndarray:
    """Nearest-neighbour upsampling of a partition to ``shape``, re-checked at full resolution."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.arange(shape[0]) * labels.shape[0] // shape[0]
    cols = np.arange(shape[1]) * labels.shape[1] // shape[1]
    return finalize_partition(labels[rows[:, None], cols[None, :]], config)


def scaled_config(config: PartitionConfig, working: tuple[int, int], full: tuple[int, int]) -> PartitionConfig:
    """``config`` with ``min_area`` expressed in working-resolution pixels."""
    ratio = (working[0] * working[1]) / (full[0] * full[1])
    return PartitionConfig(min_area=int(np.ceil(config.min_area * ratio)), max_regions=config.max_regions)


def partition_at_working_resolution(labels: np.ndarray, full: tuple[int, int], config: PartitionConfig) -> np.ndarray:
    """A raw label map found at a working resolution (negative = unlabelled) → the finished
    partition at ``full`` size: cleaned up where it is small (``min_area`` scaled to it), then
    upsampled. What every backend does, so that no step runs on a 3000×2000 photo's every pixel
    more than once; a no-op resize when the working resolution is the full one.
    """
    return upsample_partition(finalize_partition(labels, scaled_config(config, labels.shape, full)), full, config)


def partition_agreement(reference: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """How well ``ours`` reproduces ``reference`` (two partitions of one image, labels 0..K-1), in [0, 1].

    Each reference superpixel is matched to the superpixel of ``ours`` with which it has the
    highest IoU; returns the mean of those IoUs (every superpixel counts once) and their
    area-weighted mean (every pixel counts once). 1.0 means identical partitions. The measure a
    faster partition path (working resolution, batching) must keep high against SAM's own generator.
    """
    if reference.shape != ours.shape:
        raise ValueError(f"partitions of different shapes: {reference.shape} vs {ours.shape}")
    k_ref, k_ours = int(reference.max()) + 1, int(ours.max()) + 1
    pairs = reference.astype(np.int64).ravel() * k_ours + ours.ravel()
    intersection = np.bincount(pairs, minlength=k_ref * k_ours).reshape(k_ref, k_ours)
    union = intersection.sum(1, keepdims=True) + intersection.sum(0, keepdims=True) - intersection
    best = (intersection / union).max(1)
    areas = intersection.sum(1)
    return float(best.mean()), float((best * areas).sum() / areas.sum())
