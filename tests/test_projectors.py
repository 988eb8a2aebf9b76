"""Projectors (DESIGN §1): the coverage matrix, superpixel pooling, SSPE geometry, SSA masking,
exact batching, token counts, gradients and bf16 autocast for ``mlp`` | ``pool`` | ``svp``."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.model.projectors import (
    AggregatorBlock,
    ProjectorConfig,
    build_projector,
    coverage_matrix,
    shuffled_labels,
    superpixel_geometry,
)

DV, DLLM = 32, 48


def random_partition(size: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(size, size)`` label map using every label in ``0..k-1`` (the shard contract)."""
    labels = torch.randint(0, k, (size * size,), generator=generator)
    labels[torch.randperm(size * size, generator=generator)[:k]] = torch.arange(k)
    return labels.view(size, size)


def random_batch(counts: list[int], size: int, grid: tuple[int, int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    superpixels = torch.stack([random_partition(size, k, generator) for k in counts])
    features = torch.randn(len(counts), grid[0] * grid[1], DV, generator=generator)
    return features, superpixels, torch.tensor(counts)


def svp(sspe: bool = True, ssa: bool = True, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_projector(ProjectorConfig(kind="svp", sspe=sspe, ssa=ssa, **overrides), DV, DLLM).eval()


def reference_coverage(labels: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """Slow, independent coverage: split pixels into sub-pixels so that patches hold whole sub-pixels."""
    (height, width), (rows, cols) = labels.shape, grid
    sy, sx = math.lcm(height, rows) // height, math.lcm(width, cols) // width
    fine = labels.repeat_interleave(sy, 0).repeat_interleave(sx, 1)
    ph, pw = fine.shape[0] // rows, fine.shape[1] // cols
    out = torch.zeros(k, rows * cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            for label in fine[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].flatten().tolist():
                out[label, r * cols + c] += 1 / (ph * pw)
    return out


# ---------------------------------------------------------------------------------------- coverage


def test_coverage_hand_example_and_padded_rows():
    image0 = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1], [3, 3, 3, 1], [3, 3, 3, 3]])
    image1 = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    coverage = coverage_matrix(torch.stack([image0, image1]), torch.tensor([4, 2]), (2, 2))
    expected0 = torch.tensor(
        [
            [0.75, 0.0, 0.0, 0.0],  # label 0: three pixels of the top-left patch
            [0.0, 1.0, 0.0, 0.25],  # label 1: the whole top-right patch, one pixel of the bottom-right
            [0.25, 0.0, 0.0, 0.0],  # label 2: one pixel
            [0.0, 0.0, 1.0, 0.75],
        ]
    )
    expected1 = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0] * 4, [0.0] * 4])
    torch.testing.assert_close(coverage, torch.stack([expected0, expected1]))


@pytest.mark.parametrize("size, grid", [(24, (4, 6)), (30, (4, 7)), (10, (3, 3)), (5, (7, 7))])
def test_coverage_sums_and_reference(size, grid):
    """Rows carry the superpixel's area in patch units, columns sum to 1 — also when V ∤ grid."""
    counts = [6, 11]
    _, superpixels, num = random_batch(counts, size, grid)
    coverage = coverage_matrix(superpixels, num, grid)
    assert coverage.shape == (2, max(counts), grid[0] * grid[1])
    patch_area = size * size / (grid[0] * grid[1])
    for b, k in enumerate(counts):
        pixels = torch.bincount(superpixels[b].flatten(), minlength=k).double()
        torch.testing.assert_close(coverage[b, :k].double().sum(-1) * patch_area, pixels, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(coverage[b, :k].sum(0), torch.ones(grid[0] * grid[1]))
        assert not coverage[b, k:].any()
        reference = reference_coverage(superpixels[b], k, grid)
        torch.testing.assert_close(coverage[b, :k].double(), reference, rtol=1e-5, atol=1e-6)


def test_one_pixel_superpixel_keeps_a_row():
    labels = torch.zeros(2, 28, 28, dtype=torch.long)
    labels[0, 9, 16] = 1  # inside patch (1, 2) of a 4×4 grid of 7×7-pixel patches
    labels[1, 3, 3] = 1  # 10×10 map on a 3×3 grid: this pixel straddles four patches
    coverage = coverage_matrix(labels[:1], torch.tensor([2]), (4, 4))[0]
    assert coverage[1].nonzero().flatten().tolist() == [1 * 4 + 2]
    assert coverage[1, 6].item() == pytest.approx(1 / 49)
    small = coverage_matrix(labels[1:, :10, :10], torch.tensor([2]), (3, 3))[0]
    assert sorted(small[1].nonzero().flatten().tolist()) == [0, 1, 3, 4]
    assert small[1].sum().item() * (100 / 9) == pytest.approx(1.0)


def test_labels_out_of_range_are_rejected():
    labels = torch.tensor([[[0, 1], [2, 2]]])
    with pytest.raises(ValueError, match="labels"):
        coverage_matrix(labels, torch.tensor([2]), (1, 1))


# ----------------------------------------------------------------------------------------- pooling


def test_superpixel_pooling_matches_loop_reference():
    """token_k = mean over k's pixels of the feature of the patch holding each pixel (V a multiple)."""
    grid, size, counts = (4, 4), 16, [5, 9]
    features, superpixels, num = random_batch(counts, size, grid, seed=1)
    tokens, valid = svp(sspe=False, ssa=False).compress(features, grid, superpixels, num)
    patch = size // grid[0]
    for b, k_b in enumerate(counts):
        for k in range(k_b):
            total, count = torch.zeros(DV), 0
            for y in range(size):
                for x in range(size):
                    if superpixels[b, y, x] == k:
                        total += features[b, (y // patch) * grid[1] + x // patch]
                        count += 1
            torch.testing.assert_close(tokens[b, k], total / count)
    assert valid.tolist() == [[k < c for k in range(max(counts))] for c in counts]


def test_label_permutation_permutes_tokens():
    grid, counts = (4, 4), [7]
    features, superpixels, num = random_batch(counts, 20, grid, seed=2)
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    projector = svp()
    with torch.no_grad():
        tokens, _ = projector(features, grid, superpixels, num)
        permuted, _ = projector(features, grid, permutation[superpixels], num)
    torch.testing.assert_close(permuted[0, permutation], tokens[0])


def test_shuffled_labels_are_a_fixed_permutation_of_each_image_that_does_not_follow_the_raster():
    stripes = torch.arange(40).repeat_interleave(3).expand(120, 120)  # 40 labels in raster (column) order
    batch = torch.stack([stripes, stripes.flip(1), torch.zeros_like(stripes)])
    shuffled = shuffled_labels(batch)
    assert torch.equal(shuffled, shuffled_labels(batch.clone()))  # the same image, the same order, every time
    for image, new in zip(batch, shuffled, strict=True):
        pairs = torch.unique(torch.stack([image.flatten(), new.flatten()]), dim=1)
        assert torch.equal(pairs[0], image.unique()) and torch.equal(pairs[1].sort().values, image.unique())
    order = shuffled[0, 0, ::3]  # the new label of each column stripe, left to right
    assert not torch.equal(order, order.sort().values) and not torch.equal(order, shuffled[1, 0, ::3].flip(0))
    assert abs(torch.corrcoef(torch.stack([order.float(), torch.arange(40.0)]))[0, 1]) < 0.5  # no raster trend


def test_shuffled_tokens_are_the_same_tokens_in_another_order_with_regions_to_match():
    grid, counts = (4, 4), [7, 5]
    features, superpixels, num = random_batch(counts, 20, grid, seed=2)
    plain, shuffled = svp(), svp(shuffle_tokens=True)
    with torch.no_grad():
        tokens, valid = plain(features, grid, superpixels, num)
        mixed, mixed_valid = shuffled(features, grid, superpixels, num)
    assert torch.equal(valid, mixed_valid)
    regions, mixed_regions = plain.regions(grid, superpixels), shuffled.regions(grid, superpixels)
    assert not torch.equal(regions, mixed_regions)
    for b, k in enumerate(counts):  # the token a pixel belongs to is the same token, wherever it now stands
        new = torch.zeros(k, dtype=torch.long).scatter_(0, regions[b].flatten(), mixed_regions[b].flatten())
        torch.testing.assert_close(mixed[b, new], tokens[b, :k])


# ----------------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("budget, grid", [(1, (1, 1)), (2, (1, 2)), (16, (4, 4)), (17, (4, 4)), (18, (4, 4)),
                                          (19, (4, 5)), (31, (5, 6)), (35, (6, 6))])
def test_pool_grid_is_the_near_square_grid_closest_to_the_budget(budget, grid):
    assert ProjectorConfig(kind="pool", pool_tokens=budget).pool_grid == grid


@pytest.mark.parametrize(
    "config, expected",
    [
        (ProjectorConfig(kind="mlp"), 6 * 5),
        (ProjectorConfig(kind="pool", pool_tokens=16), 16),
        (ProjectorConfig(kind="pool", pool_tokens=10), 9),
        (ProjectorConfig(kind="pool", pool_tokens=12), 12),
        (ProjectorConfig(kind="svp"), 8),
    ],
)
def test_token_counts(config, expected):
    grid, counts = (6, 5), [3, 8]
    features, superpixels, num = random_batch(counts, 30, grid)
    tokens, valid = build_projector(config, DV, DLLM)(features, grid, superpixels, num)
    assert tokens.shape == (2, expected, DLLM)
    if config.kind == "svp":
        assert valid.sum(1).tolist() == counts
    else:
        assert valid.all()


def test_batching_is_exact_and_padding_is_zero():
    """Image 0's tokens do not depend on what else is in the batch, nor on how much it is padded."""
    grid = (4, 4)
    features, superpixels, num = random_batch([4, 12], 16, grid, seed=4)
    projector = svp(ssa_layers=2)
    with torch.no_grad():
        alone, _ = projector(features[:1], grid, superpixels[:1], num[:1])
        batched, valid = projector(features, grid, superpixels, num)
        other = features.clone()
        other[1] = torch.randn_like(other[1]) * 10
        changed, _ = projector(other, grid, superpixels, num)
    assert batched.shape[1] == 12 and alone.shape[1] == 4
    torch.testing.assert_close(batched[0, :4], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(changed[0], batched[0], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(batched).all()
    assert not batched[~valid].any()


# ------------------------------------------------------------------------------------------- SSPE


def test_geometry_of_a_rectangle():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 1:3, 0:4] = 1  # rows 1-2, columns 0-3: 8 pixels
    geometry = superpixel_geometry(labels, torch.tensor([3]))
    x1, y1, x2, y2, cx, cy, log_area = geometry[0, 1].tolist()
    assert (x1, y1, x2, y2) == pytest.approx((0.0, 1 / 8, 4 / 8, 3 / 8))
    assert (cx, cy) == pytest.approx((2 / 8, 2 / 8))
    assert log_area == pytest.approx(math.log(8) / math.log(64))
    background = geometry[0, 0].tolist()
    assert background[:4] == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert background[6] == pytest.approx(math.log(56) / math.log(64))
    assert not geometry[0, 2].any()  # padded label


# -------------------------------------------------------------------------------------------- SSA


def test_inside_attention_sees_only_touched_patches():
    """Superpixel 0 (left half) ignores a right-half patch inside; it still hears it through outside."""
    grid = (4, 4)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 1
    num = torch.tensor([2])
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1, 16, DV, generator=generator)
    perturbed = features.clone()
    perturbed[0, 1 * 4 + 3] = torch.randn(DV, generator=generator)  # patch (1, 3): right half only

    torch.manual_seed(0)
    block = AggregatorBlock(DV, heads=4)
    coverage = coverage_matrix(labels, num, grid)
    tokens = torch.randn(1, 2, DV, generator=generator)
    with torch.no_grad():
        before = block.inside(tokens, features, coverage > 0)
        after = block.inside(tokens, perturbed, coverage > 0)
    torch.testing.assert_close(after[0, 0], before[0, 0])
    assert not torch.allclose(after[0, 1], before[0, 1])

    with torch.no_grad():
        pooled_only = [svp(sspe=False, ssa=False).compress(f, grid, labels, num)[0] for f in (features, perturbed)]
        aggregated = [svp(sspe=False).compress(f, grid, labels, num)[0] for f in (features, perturbed)]
    torch.testing.assert_close(pooled_only[1][0, 0], pooled_only[0][0, 0])
    assert not torch.allclose(aggregated[1][0, 0], aggregated[0][0, 0])


# ----------------------------------------------------------------------- gradients, dtypes, config


KINDS = [
    ProjectorConfig(kind="mlp"),
    ProjectorConfig(kind="pool", pool_tokens=4),
    ProjectorConfig(kind="svp", sspe=False, ssa=False),
    ProjectorConfig(kind="svp", ssa_layers=2),
]


@pytest.mark.parametrize("config", KINDS, ids=lambda c: f"{c.kind}-sspe{c.sspe:d}-ssa{c.ssa:d}")
def test_gradients_reach_features_and_every_parameter(config):
    grid = (4, 4)
    features, superpixels, num = random_batch([3, 6], 12, grid, seed=6)
    features.requires_grad_(True)
    projector = build_projector(config, DV, DLLM)
    tokens, valid = projector(features, grid, superpixels, num)
    (tokens[valid] * torch.randn_like(tokens[valid])).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    for name, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("config", KINDS, ids=lambda c: f"{c.kind}-sspe{c.sspe:d}-ssa{c.ssa:d}")
def test_bf16_autocast_on_cpu(config):
    grid = (4, 4)
    features, superpixels, num = random_batch([3, 6], 12, grid, seed=7)
    features.requires_grad_(True)
    projector = build_projector(config, DV, DLLM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, valid = projector(features, grid, superpixels, num)
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens).all()
    tokens.float().sum().backward()
    assert torch.isfinite(features.grad).all()


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        ProjectorConfig(kind="qformer")
    with pytest.raises(ValueError, match="pool_tokens"):
        ProjectorConfig(kind="pool", pool_tokens=0)
    with pytest.raises(ValueError, match="divisible"):
        build_projector(ProjectorConfig(ssa_heads=5), DV, DLLM)
    with pytest.raises(ValueError, match="patches"):
        build_projector(ProjectorConfig(kind="mlp"), DV, DLLM)(torch.zeros(1, 15, DV), (4, 4), None, None)
