"""SAM backend (checkpoint checks, batched generator vs the reference) and the partition invariants.

Everything runs on CPU with the random-weight ``tiny`` SAM: its masks are meaningless, but the code
path (encoder batch, decoder, filters, NMS, partition) is the one the real weights go through.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from pipeline.partition import (
    PartitionConfig,
    finalize_partition,
    paint_masks,
    partition_agreement,
    partition_at_working_resolution,
    partition_from_masks,
    working_shape,
)
from pipeline.sam_model import SamCheckpointError, build_sam, save_tiny_sam, validate_sam_checkpoint
from pipeline.superpixels.base import BackendConfigError, SamOptions
from pipeline.superpixels.sam import SamSuperpixels
from pipeline.superpixels.sam_embeddings import compute_dtype
from pipeline.superpixels.spec import BackendSpec

# Random weights give predicted IoUs around 0.0-0.3 and logits around ±0.05: these thresholds let
# some masks through and reject others, so the filters are exercised rather than bypassed.
TEST_OPTIONS = dict(points_per_side=4, pred_iou_thresh=0.2, stability_score_thresh=0.6, stability_score_offset=0.01)


def shapes_image(h: int, w: int, seed: int) -> np.ndarray:
    """A background with a few flat-coloured rectangles: some structure for the encoder to see."""
    rng = np.random.default_rng(seed)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        y, x = rng.integers(0, h), rng.integers(0, w)
        image[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3)
    return image


def sam_options(checkpoint: Path, **overrides) -> SamOptions:
    return SamOptions(str(checkpoint), "tiny", **(TEST_OPTIONS | overrides))


# --- checkpoints ------------------------------------------------------------------------------


def test_saved_tiny_sam_validates_and_loads_back(tiny_sam_checkpoint: Path) -> None:
    validate_sam_checkpoint(tiny_sam_checkpoint, "tiny")
    saved = torch.load(tiny_sam_checkpoint, weights_only=True)
    loaded = build_sam("tiny", tiny_sam_checkpoint).state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_checkpoint_of_another_model_type_lists_the_keys(tiny_sam_checkpoint: Path) -> None:
    with pytest.raises(SamCheckpointError) as error:
        validate_sam_checkpoint(tiny_sam_checkpoint, "vit_b")
    message = str(error.value)
    assert str(tiny_sam_checkpoint) in message and "vit_b" in message
    assert "missing keys: image_encoder.blocks.2." in message  # tiny has 2 blocks, vit_b 12
    assert "shape mismatches" in message and "(32,) vs (768,)" in message


@pytest.mark.parametrize(
    "write, model_type, expected",
    [
        (None, "tiny", "does not exist"),
        (lambda p: p.write_text("not a checkpoint\n"), "tiny", "not a torch state dict"),
        (lambda p: torch.save([torch.zeros(1)], p), "tiny", "holds a list"),
        (lambda p: save_tiny_sam(p), "vit_x", "unknown SAM model type 'vit_x'"),
    ],
)
def test_bad_checkpoints_are_refused_clearly(tmp_path: Path, write, model_type: str, expected: str) -> None:
    path = tmp_path / "sam.pth"
    if write:
        write(path)
    with pytest.raises(SamCheckpointError, match=expected):
        validate_sam_checkpoint(path, model_type)


def test_sam_backend_without_checkpoint_names_the_flag() -> None:
    with pytest.raises(BackendConfigError, match="--sam-checkpoint"):
        BackendSpec("sam", sam=None).validate()


# --- generator and partition ------------------------------------------------------------------


def assert_partition(labels: np.ndarray, shape: tuple[int, int], config: PartitionConfig) -> None:
    assert labels.shape == shape and labels.dtype == np.uint16
    k = int(labels.max()) + 1
    areas = np.bincount(labels.ravel().astype(np.int64), minlength=k)
    assert (areas > 0).all(), "labels must be 0..K-1 with no gap"
    assert k <= config.max_regions
    if labels.size >= config.min_area:
        assert areas.min() >= config.min_area


def test_sam_superpixels_are_partitions(tiny_sam_checkpoint: Path) -> None:
    """Through BackendSpec, as a worker builds it; two encoder batches, one with a single image."""
    config = PartitionConfig(min_area=40, max_regions=12)
    spec = BackendSpec("sam", config, sam_options(tiny_sam_checkpoint, images_per_batch=2, store_sam_embeddings=True))
    spec.validate()
    gray = np.repeat(shapes_image(64, 64, 2)[..., :1], 3, axis=2)
    images = [shapes_image(96, 160, 0), shapes_image(17, 11, 1), gray]
    results = spec.build()(images)
    assert len(results) == len(images)
    for image, result in zip(images, results):
        assert_partition(result.labels, image.shape[:2], config)
        assert result.sam_embedding.dtype == np.float16 and result.sam_embedding.shape == (64, 32, 32)


def test_no_surviving_mask_still_gives_a_partition(tiny_sam_checkpoint: Path) -> None:
    """The random tiny SAM never predicts an IoU of 0.99: nothing survives, the gap-fill makes one region."""
    backend = SamSuperpixels(sam_options(tiny_sam_checkpoint, points_per_side=2, pred_iou_thresh=0.99),
                             PartitionConfig())
    image = shapes_image(32, 48, 0)
    assert backend.generate_masks([image])[0].shape == (0, 32, 48)
    (result,) = backend([image])
    assert (result.labels == 0).all() and result.sam_embedding is None  # embeddings only when asked


def test_non_rgb_input_is_refused(tiny_sam_checkpoint: Path) -> None:
    backend = SamSuperpixels(sam_options(tiny_sam_checkpoint), PartitionConfig())
    with pytest.raises(ValueError, match="RGB uint8"):
        backend([np.zeros((8, 8), np.uint8)])


@pytest.mark.parametrize("box_nms_thresh", [1.0, 0.7], ids=["nms-off", "nms-0.7"])
def test_masks_agree_with_the_reference_generator(tiny_sam_checkpoint: Path, box_nms_thresh: float) -> None:
    """Same model, points and thresholds as SamAutomaticMaskGenerator: the same masks.

    Ours batches differently on purpose (two images per encoder pass, all 16 points per decoder
    call; the reference: one image, 5 points per call), so batching cannot change the result; and its
    decoder keeps each prompt's image tokens factored (``pipeline.sam_factored``).
    """
    # An IoU threshold inside the random tiny SAM's narrow range of predictions (0.20-0.27 here), so that
    # the IoU filter rejects some of the candidates and passes others.
    options = sam_options(tiny_sam_checkpoint, box_nms_thresh=box_nms_thresh, images_per_batch=2, points_per_batch=64,
                          pred_iou_thresh=0.25)
    ours = SamSuperpixels(options, PartitionConfig())
    reference = SamAutomaticMaskGenerator(
        ours.sam,
        points_per_side=options.points_per_side,
        points_per_batch=5,
        pred_iou_thresh=options.pred_iou_thresh,
        stability_score_thresh=options.stability_score_thresh,
        stability_score_offset=options.stability_score_offset,
        box_nms_thresh=options.box_nms_thresh,
    )
    images = [shapes_image(120, 160, 3), shapes_image(100, 72, 4)]
    for image, masks in zip(images, ours.generate_masks(images)):
        expected = torch.from_numpy(np.stack([a["segmentation"] for a in reference.generate(image)]))
        candidates = 3 * options.points_per_side**2
        assert 1 <= len(expected) < candidates, "thresholds must keep some masks and reject others"
        assert masks.shape == expected.shape
        intersection = (expected[:, None] & masks[None]).flatten(2).sum(2)
        union = (expected[:, None] | masks[None]).flatten(2).sum(2)
        best_iou = (intersection / union).amax(1)
        assert best_iou.min() > 0.95 and best_iou.mean() > 0.99
    assert 0 < ours.counts["iou_passing"] < ours.counts["candidates"]


def test_large_image_is_partitioned_at_working_resolution(tiny_sam_checkpoint: Path) -> None:
    """A 1300×1100 image: its masks stay at 1024×866 (SAM's own frame), its partition is full size."""
    ours = SamSuperpixels(sam_options(tiny_sam_checkpoint, points_per_side=2), PartitionConfig())
    image = shapes_image(1100, 1300, 5)
    (masks,) = ours.generate_masks([image])
    assert masks.shape[1:] == working_shape(1100, 1300) == (866, 1024) and len(masks) >= 1
    (result,) = ours([image])
    assert_partition(result.labels, (1100, 1300), PartitionConfig())


# --- partition.py -----------------------------------------------------------------------------


def test_paint_masks_keeps_finer_masks_and_marks_gaps() -> None:
    masks = torch.zeros((3, 10, 10), dtype=torch.bool)
    masks[0, :, :6] = True  # large
    masks[1, 2:4, 2:4] = True  # small, inside 0
    masks[2, :8, :] = True  # largest, overlaps 0
    painted = paint_masks(masks)
    assert (painted[2:4, 2:4] == 1).all()
    assert painted[0, 0] == 0 and painted[0, 9] == 2
    assert (painted[8:, 6:] == -1).all() and painted[9, 0] == 0


def test_finalize_partition_fills_gaps_and_merges_small_regions() -> None:
    labels = np.full((20, 20), 5)
    labels[:, 10:] = 9
    labels[0:2, 0:2] = 7  # 4 px: under min_area, merges into its largest neighbour (5, 196 px)
    labels[18:, 18:] = -1  # unlabelled corner: a region of its own, also too small → into 9
    labels[10, 0:10] = -1  # unlabelled stripe: its own region (10 px, kept with min_area 10)
    out = finalize_partition(labels, PartitionConfig(min_area=10, max_regions=256))
    assert_partition(out, (20, 20), PartitionConfig(min_area=10))
    assert len(np.unique(out)) == 3
    assert out[0, 0] == out[5, 5] and out[19, 19] == out[0, 15] and out[10, 0] != out[0, 0]


def test_finalize_partition_respects_max_regions() -> None:
    labels = np.arange(64).reshape(8, 8).repeat(4, 0).repeat(4, 1)  # 64 regions of 16 px
    config = PartitionConfig(min_area=0, max_regions=10)
    out = finalize_partition(labels, config)
    assert_partition(out, (32, 32), config)
    # Merging goes by regions, never splits one: each input region lies in exactly one output region.
    assert all(len(np.unique(out[labels == v])) == 1 for v in range(64))


@pytest.mark.parametrize("shape", [(5, 7), (1, 1)])
def test_image_smaller_than_min_area_is_one_region(shape: tuple[int, int]) -> None:
    labels = np.arange(shape[0] * shape[1]).reshape(shape) % 3
    out = finalize_partition(labels, PartitionConfig(min_area=100))
    assert out.shape == shape and out.dtype == np.uint16 and (out == 0).all()


def test_no_masks_is_one_region() -> None:
    out = partition_from_masks(torch.zeros((0, 6, 9), dtype=torch.bool), PartitionConfig())
    assert out.shape == (6, 9) and (out == 0).all()


def object_masks(shape: tuple[int, int]) -> torch.Tensor:
    """Smooth, object-like masks (as real SAM gives) of a fixed scene drawn at ``shape``: discs and
    boxes, nested and overlapping, placed in relative coordinates."""
    h, w = shape
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    discs = [(0.3, 0.3, 0.2), (0.3, 0.3, 0.08), (0.7, 0.6, 0.25), (0.75, 0.55, 0.1), (0.2, 0.8, 0.12)]
    boxes = [(0.05, 0.5, 0.45, 0.95), (0.5, 0.0, 0.95, 0.4), (0.6, 0.05, 0.7, 0.15)]
    masks = [((x - cx) * w) ** 2 + ((y - cy) * h) ** 2 < (r * min(h, w)) ** 2 for cy, cx, r in discs]
    masks += [(y >= y0) & (y < y1) & (x >= x0) & (x < x1) for y0, x0, y1, x1 in boxes]
    return torch.stack(masks)


def test_partition_at_working_resolution_agrees_with_the_full_size_one() -> None:
    """The masks of a 1500×2000 scene partitioned at 768×1024 and upsampled ≈ partitioned at full size."""
    full, working = (1500, 2000), working_shape(1500, 2000)
    config = PartitionConfig(min_area=400)
    reference = partition_from_masks(object_masks(full), config)
    ours = partition_at_working_resolution(paint_masks(object_masks(working)).numpy(), full, config)
    assert_partition(ours, full, config)
    assert int(ours.max()) == int(reference.max()) >= 8
    mean, area_weighted = partition_agreement(reference, ours)
    assert mean > 0.98 and area_weighted > 0.99


def test_partition_agreement() -> None:
    reference = np.zeros((4, 8), np.uint16)
    reference[:, 4:] = 1
    assert partition_agreement(reference, reference) == (1.0, 1.0)
    assert partition_agreement(reference, 1 - reference) == (1.0, 1.0)  # labels may differ, regions not
    merged = np.zeros_like(reference)  # one region where the reference has two halves: IoU 0.5 each
    assert partition_agreement(reference, merged) == (0.5, 0.5)
    shifted = reference.copy()
    shifted[:, 3] = 1  # a column moves from the left region to the right one: IoU 12/16 and 16/20
    mean, area_weighted = partition_agreement(reference, shifted)
    assert mean == pytest.approx((12 / 16 + 16 / 20) / 2)
    assert area_weighted == pytest.approx((12 / 16 * 16 + 16 / 20 * 16) / 32)
    with pytest.raises(ValueError, match="different shapes"):
        partition_agreement(reference, reference[:, :4])


# --- fewer prompts, precision ------------------------------------------------------------------


def test_the_point_grid_is_recorded_only_when_it_is_not_the_default(tiny_sam_checkpoint: Path) -> None:
    """Shards written before the option existed keep their config hash (and so resume)."""
    full = SamOptions(str(tiny_sam_checkpoint), "tiny")
    assert "point_grid" not in full.record()
    fewer = SamOptions(str(tiny_sam_checkpoint), "tiny", point_grid="coarse-to-fine")
    assert fewer.record()["point_grid"] == "coarse-to-fine"
    assert SamOptions.from_record(fewer.record()).point_grid == "coarse-to-fine"
    assert SamOptions.from_record(full.record()).point_grid == "full"
    assert "sam_precision" not in full.record()  # bf16 or fp32: the same masks to rounding, as batch sizes


@pytest.mark.parametrize("side", [4, 5])
def test_coarse_to_fine_asks_the_rest_of_the_grid_only_where_no_mask_covers(tiny_sam_checkpoint: Path,
                                                                          side: int) -> None:
    image = shapes_image(96, 128, 0)
    coarse = ((side + 1) // 2) ** 2
    nothing_kept = sam_options(tiny_sam_checkpoint, points_per_side=side, pred_iou_thresh=0.99,
                               point_grid="coarse-to-fine")
    backend = SamSuperpixels(nothing_kept, PartitionConfig())
    backend.generate_masks([image])
    assert backend.counts["prompts"] == side * side  # nothing covers: every point is asked
    everything_kept = replace(nothing_kept, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    backend = SamSuperpixels(everything_kept, PartitionConfig())
    masks = backend.generate_masks([image])[0]
    assert coarse <= backend.counts["prompts"] < side * side and len(masks) >= 1
    full = SamSuperpixels(replace(everything_kept, point_grid="full"), PartitionConfig())
    full.generate_masks([image])
    assert full.counts["prompts"] == side * side


def test_sam_precision_picks_what_sam_computes_in() -> None:
    assert compute_dtype("cpu", "fp32") == torch.float32 and compute_dtype("cpu", "bf16") == torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
