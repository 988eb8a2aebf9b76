"""Visual projectors between the vision encoder and the LLM (DESIGN §1): ``mlp`` | ``pool`` | ``svp``.

All three share one interface — patch features on an h×w grid in, LLM-width tokens padded on the
right plus a validity mask out — so the trainer switches between them with a single flag and the
ablation ladder *pool < superpixel-pool < +SSPE < +SSA* is a matter of configuration.

The semantic projector (``svp``) turns each SAM superpixel into one token. One matrix drives all of
it: the coverage matrix ``A[k, p]`` (fraction of patch ``p`` covered by superpixel ``k``). Pooling is
``A`` row-normalised times the features, SSPE averages patch positions with the same weights, and SSA
masks its inside attention with ``A > 0``. Everything is batched tensor algebra: no Python loop runs
over superpixels or over batch items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTORS = ("mlp", "pool", "svp")

POSITION_DIM = 128  # width of the fixed sin-cos patch-position code, before SSPE's learned projection
GEOMETRY_FEATURES = 7  # box x1, y1, x2, y2, centroid cx, cy, log-area
FFN_RATIO = 2  # SSA's feed-forward is kept at half the usual ViT ratio: it refines, it does not re-encode


@dataclass(frozen=True)
class ProjectorConfig:
    """Which projector, and the knobs of the ablation ladder; part of the resolved run config."""

    kind: str = field(default="svp", metadata={"choices": PROJECTORS, "help": (
        "svp: one token per superpixel; pool: fixed-grid pooling; mlp: one token per patch")})
    pool_tokens: int = field(default=16, metadata={"help": (
        "pool: token budget per image, realised as the closest near-square grid (see pool_grid)")})
    sspe: bool = field(default=True, metadata={"help": (
        "svp: semantic superpixel positional embedding (shape and place of each superpixel)")})
    ssa: bool = field(default=True, metadata={"help": (
        "svp: semantic superpixel aggregator (detail inside, context outside each superpixel)")})
    ssa_layers: int = field(default=1, metadata={"help": "svp: aggregator blocks"})
    ssa_heads: int = field(default=4, metadata={"help": "svp: attention heads of each aggregator block"})
    shuffle_tokens: bool = field(default=False, metadata={"help": (
        "svp: give the LLM each image's superpixel tokens in a random order (drawn from the image's label map, "
        "so an image always gets the same one) rather than in label order, which follows the raster and so "
        "tells the LLM roughly where each token lies: what python -m bench.ablation sets, so that a place "
        "probe measures SSPE and not that code")})

    def __post_init__(self) -> None:
        if self.kind not in PROJECTORS:
            raise ValueError(f"projector kind must be one of {PROJECTORS}, got {self.kind!r}")
        if self.pool_tokens < 1:
            raise ValueError(f"pool_tokens must be >= 1, got {self.pool_tokens}")
        if self.ssa and (self.ssa_layers < 1 or self.ssa_heads < 1):
            raise ValueError(f"ssa needs ssa_layers >= 1 and ssa_heads >= 1, got {self.ssa_layers}, {self.ssa_heads}")

    @property
    def pool_grid(self) -> tuple[int, int]:
        """(rows, cols) of the pooled grid: of the squares and the g×(g+1) grids, the one whose token
        count is closest to the budget (the smaller on a tie). A square alone can miss a budget by
        √budget tokens (17 → 16 or 25), which matters when ``pool`` is compared with ``svp`` at the
        same mean token count; a near-square grid keeps the pooling cells near-square too."""
        side = math.isqrt(self.pool_tokens)
        grids = [(side, side), (side, side + 1), (side + 1, side + 1)]
        return min(grids, key=lambda grid: (abs(grid[0] * grid[1] - self.pool_tokens), grid[0] * grid[1]))


# --------------------------------------------------------------------------------------------------
# Superpixel geometry: coverage, pooling, positions, shape
# --------------------------------------------------------------------------------------------------


def _axis_overlap(pixels: int, cells: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For each of ``pixels`` unit intervals along one axis: the ``cells`` it overlaps, and by how much.

    Cell ``c`` spans ``[c·pixels/cells, (c+1)·pixels/cells)`` in pixel units, so the grid need not
    divide the label map. Returns ``(index, weight)``, both ``(pixels, slots)``: ``weight`` is the
    overlap length as a fraction of one cell's length (0 in unused slots). Scaling both axes by
    ``cells`` keeps every bound an integer, so the weights are exact ratios.
    """
    slots = -(-cells // pixels) + 1  # a pixel is cells/pixels cells long: it touches at most ceil(that)+1
    pixel = torch.arange(pixels, device=device)[:, None]
    cell = (pixel * cells) // pixels + torch.arange(slots, device=device)
    overlap = torch.minimum((pixel + 1) * cells, (cell + 1) * pixels) - torch.maximum(pixel * cells, cell * pixels)
    return cell.clamp_max(cells - 1), overlap.clamp_min(0).float() / pixels


def _check_labels(superpixels: Tensor, num_superpixels: Tensor) -> int:
    """Return ``Kmax`` after checking every label lies in ``0..K_b-1``.

    A label past ``K_b`` would not crash anything downstream — it would silently become a token
    that the validity mask hides — so a loader bug is caught here, at the cost of one host sync.
    """
    in_range = (superpixels >= 0) & (superpixels < num_superpixels.view(-1, 1, 1))
    if not bool(in_range.all()):
        raise ValueError("superpixel labels must lie in 0..num_superpixels[b]-1 for every image b")
    return int(num_superpixels.max())


def coverage_matrix(superpixels: Tensor, num_superpixels: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, Kmax, h*w)`` float32: ``A[b, k, p]`` = fraction of patch ``p``'s area labelled ``k``.

    ``superpixels`` is a ``(B, H, W)`` label map in the frame of the vision input. Pixels and patches
    are treated as rectangles and ``A`` is their exact area overlap (patch ``p`` spans ``H/h × W/w``
    pixels, fractional when the grid does not divide the map). Hence each column sums to 1 over the
    valid ``k``, each row sums to ``pixel_count(k) · h·w / (H·W)``, and **every superpixel that has a
    pixel gets a non-zero row**: a pixel always overlaps at least one patch by a positive area, so
    unlike area-averaging followed by thresholding no small region can lose its mass — a one-pixel
    superpixel keeps weight ``1 / patch_area`` on the patch (or patches) holding that pixel.
    Rows ``k >= K_b`` are zero. Built with one ``scatter_add`` over (pixel, overlapped patch) pairs,
    so memory is O(B·H·W), not the O(B·K·H·W) of a one-hot map.
    """
    batch, height, width = superpixels.shape
    rows, cols = grid
    kmax = _check_labels(superpixels, num_superpixels)
    row_index, row_weight = _axis_overlap(height, rows, superpixels.device)  # (H, Sy)
    col_index, col_weight = _axis_overlap(width, cols, superpixels.device)  # (W, Sx)
    patch = row_index[:, :, None, None] * cols + col_index  # (H, Sy, W, Sx)
    weight = row_weight[:, :, None, None] * col_weight  # (H, Sy, W, Sx)
    target = superpixels[:, :, None, :, None] * (rows * cols) + patch  # (B, H, Sy, W, Sx)
    coverage = torch.zeros(batch, kmax * rows * cols, device=superpixels.device)
    coverage.scatter_add_(1, target.reshape(batch, -1), weight.expand_as(target).reshape(batch, -1))
    return coverage.view(batch, kmax, rows * cols)


_HASH_MASK = (1 << 31) - 1  # the label hash works in 31 bits, so that no product leaves int64


def shuffled_labels(superpixels: Tensor) -> Tensor:
    """``superpixels`` ``(B, H, W)`` with each image's labels ``0..K_b-1`` renumbered by a permutation
    of its own, drawn from its label map: the token order no longer follows the raster.

    A hash of the map seeds the draw rather than an RNG, so that training, evaluation and prediction
    give an image the same order and the global random state is left alone. Vectorised: a hashed
    key per (image, label), sorted; labels past ``K_b`` (padding) sort last and stay unused.
    """
    batch = superpixels.shape[0]
    flat = superpixels.reshape(batch, -1)
    count = int(flat.max()) + 1
    place = torch.arange(1, flat.shape[1] + 1, device=flat.device)
    seed = (flat * ((place * 0x9E3779B1) & _HASH_MASK)).sum(1) & _HASH_MASK  # (B,): the map's own hash
    key = (seed[:, None] + torch.arange(1, count + 1, device=flat.device) * 0x85EBCA6B) & _HASH_MASK
    for _round in range(3):  # xorshift-multiply rounds: nearby labels get unrelated keys
        key = ((key ^ (key >> 15)) * 0x2C1B3C6D) & _HASH_MASK
    key = key.masked_fill(torch.arange(count, device=flat.device) > flat.amax(1, keepdim=True), _HASH_MASK + 1)
    rank = key.argsort(dim=1, stable=True).argsort(dim=1)  # rank[b, k]: the new label of label k
    return rank.gather(1, flat).view_as(superpixels)


def pooling_weights(coverage: Tensor) -> Tensor:
    """Row-normalise the coverage matrix: row ``k`` becomes a distribution over the patches of ``k``.

    Then ``weights @ features`` is superpixel pooling, ``token_k = Σ_p A[k,p]·F[p] / Σ_p A[k,p]``.
    Padded (all-zero) rows stay zero instead of dividing by zero.
    """
    return coverage / coverage.sum(-1, keepdim=True).clamp_min(torch.finfo(coverage.dtype).tiny)


def superpixel_geometry(superpixels: Tensor, num_superpixels: Tensor) -> Tensor:
    """``(B, Kmax, 7)`` shape of every superpixel, each feature in ``[0, 1]``.

    Columns: box ``x1, y1, x2, y2`` (pixel *edges*, so a full-image region is ``0, 0, 1, 1``),
    centroid ``cx, cy`` (pixel centres), and ``log(area) / log(H·W)`` (0 for one pixel, 1 for the
    whole image — log because region sizes span four orders of magnitude). Padded rows are zero.
    """
    batch, height, width = superpixels.shape
    kmax = _check_labels(superpixels, num_superpixels)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=superpixels.device, dtype=torch.float32),
        torch.arange(width, device=superpixels.device, dtype=torch.float32),
        indexing="ij",
    )
    xy = torch.stack([xs.flatten(), ys.flatten()], -1)  # (H*W, 2)
    size = xy.new_tensor([width, height])
    labels = superpixels.reshape(batch, -1, 1)

    def reduce(values: Tensor, how: str) -> Tensor:
        values = values.expand(batch, *values.shape)
        out = values.new_zeros(batch, kmax, values.shape[-1])
        return out.scatter_reduce(1, labels.expand_as(values), values, reduce=how, include_self=False)

    top_left = reduce(xy / size, "amin")
    bottom_right = reduce((xy + 1) / size, "amax")
    sums = reduce(torch.cat([(xy + 0.5) / size, torch.ones_like(xy[:, :1])], -1), "sum")
    count = sums[..., 2:].clamp_min(1)
    centroid = sums[..., :2] / count
    log_area = torch.log(count) / math.log(max(height * width, 2))
    return torch.cat([top_left, bottom_right, centroid, log_area], -1)


def patch_position_table(grid: tuple[int, int], device: torch.device) -> Tensor:
    """``(h*w, POSITION_DIM)`` fixed 2-D sin-cos code of the patch centres, in normalised coordinates.

    Fixed rather than learned because the grid follows the input resolution: a learned ``(h*w, D)``
    table would have to be sized at first use and interpolated for every other resolution, while
    this code is defined for any grid and gives a region the same code wherever its relative
    position is the same. Frequencies run geometrically from π (one wave across the image) to 100·π
    (finer than a patch of a 32×32 grid); SSPE learns a projection of it to the vision width.
    """
    rows, cols = grid
    frequencies = math.pi * 100.0 ** torch.linspace(0, 1, POSITION_DIM // 4, device=device)
    ys, xs = torch.meshgrid(
        (torch.arange(rows, device=device) + 0.5) / rows,
        (torch.arange(cols, device=device) + 0.5) / cols,
        indexing="ij",
    )
    angles_y = ys.reshape(-1, 1) * frequencies
    angles_x = xs.reshape(-1, 1) * frequencies
    return torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], -1)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _two_layer_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA-1.5's ``mlp2x_gelu`` connector: Linear → GELU → Linear."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class SuperpixelPositionalEmbedding(nn.Module):
    """SSPE: where a superpixel is and what shape it has, which pooling to one vector throws away.

    Sum of (a) a learned projection of the coverage-weighted average of the patches' sin-cos codes
    (where the region's mass is) and (b) an MLP of its box, centroid and log-area (its extent and
    size, which a mass average cannot tell apart: a thin ring and a blob can share a centre).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.position = nn.Linear(POSITION_DIM, dim)
        self.geometry = _two_layer_mlp(GEOMETRY_FEATURES, dim)

    def forward(self, weights: Tensor, grid: tuple[int, int], superpixels: Tensor, num_superpixels: Tensor) -> Tensor:
        """``weights``: row-normalised coverage ``(B, Kmax, h*w)``; returns ``(B, Kmax, dim)``."""
        table = patch_position_table(grid, weights.device).to(weights.dtype)
        geometry = superpixel_geometry(superpixels, num_superpixels).to(weights.dtype)
        return self.position(weights @ table) + self.geometry(geometry)


class MaskedAttention(nn.Module):
    """Multi-head attention with a per-image boolean mask ``(B, Tq, Tk)``, True = may attend.

    Written on ``scaled_dot_product_attention`` because ``nn.MultiheadAttention`` wants per-image
    masks flattened into ``(B·heads, Tq, Tk)``. Callers guarantee each query row allows at least
    one key (a fully masked row would softmax to NaN).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, allowed: Tensor) -> Tensor:
        batch, queries, dim = x.shape
        q = self.query(x).view(batch, queries, self.heads, -1).transpose(1, 2)
        k, v = self.key_value(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.out(attended.transpose(1, 2).reshape(batch, queries, dim))


class AggregatorBlock(nn.Module):
    """One SSA block (pre-norm residual): inside detail, outside context, then a small FFN.

    ``inside`` and ``outside`` are public so each path can be checked on its own.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.inside_norm = nn.LayerNorm(dim)
        self.patch_norm = nn.LayerNorm(dim)
        self.inside_attention = MaskedAttention(dim, heads)
        self.outside_norm = nn.LayerNorm(dim)
        self.outside_attention = MaskedAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, FFN_RATIO * dim), nn.GELU(), nn.Linear(FFN_RATIO * dim, dim))

    def inside(self, tokens: Tensor, features: Tensor, touches: Tensor) -> Tensor:
        """Cross-attend from each token to the patches its superpixel touches (``touches``: B, K, h*w).

        Pooling gave the region's mean; attention lets the token pick out the patches that matter.
        """
        return tokens + self.inside_attention(self.inside_norm(tokens), self.patch_norm(features), touches)

    def outside(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """Self-attend across the superpixel tokens of the same image: context from the other regions.

        Valid tokens see only valid tokens, so padding never leaks into real tokens (batching is
        exact); padded rows see every token, only so that no softmax row is empty.
        """
        allowed = valid[:, None, :] | ~valid[:, :, None]
        normed = self.outside_norm(tokens)
        return tokens + self.outside_attention(normed, normed, allowed)

    def forward(self, tokens: Tensor, features: Tensor, touches: Tensor, valid: Tensor) -> Tensor:
        tokens = self.outside(self.inside(tokens, features, touches), valid)
        return tokens + self.ffn(self.ffn_norm(tokens))


class SuperpixelAggregator(nn.Module):
    """SSA: a stack of :class:`AggregatorBlock` in the vision width, driven by the coverage matrix."""

    def __init__(self, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(AggregatorBlock(dim, heads) for _ in range(layers))

    def forward(self, tokens: Tensor, features: Tensor, coverage: Tensor, valid: Tensor) -> Tensor:
        # A row that touches no patch (padding) would softmax to NaN: let it see every patch instead.
        touched = coverage > 0
        touches = touched | ~touched.any(-1, keepdim=True)
        for block in self.blocks:
            tokens = block(tokens, features, touches, valid)
        return tokens


# --------------------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------------------


def _grid_cells(shape: torch.Size, cells: tuple[int, int], device: torch.device) -> Tensor:
    """``(B, H, W)`` long: the row-major index of the ``cells`` grid cell holding each pixel's centre
    (the bins of ``adaptive_avg_pool2d``, up to the pixels it shares between neighbouring cells)."""
    batch, height, width = shape
    rows, cols = cells
    row = (torch.arange(height, device=device) * rows) // height
    col = (torch.arange(width, device=device) * cols) // width
    return (row[:, None] * cols + col).expand(batch, height, width)


class Projector(nn.Module):
    """Vision features → LLM tokens. Subclasses decide which tokens (:meth:`compress`); all then
    share the same 2-layer MLP to the LLM width, so the kinds differ only in what they compress."""

    # Whether the tokens depend on the superpixel labels (not only on the label map's shape): an
    # image for a projector that reads none needs no superpixels made (``trainer.predict``).
    reads_superpixels = False

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.mlp = _two_layer_mlp(vision_dim, llm_dim)

    def compress(
        self, features: Tensor, grid: tuple[int, int], superpixels: Tensor, num_superpixels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Tokens in the vision width ``(B, T, Dv)`` and their validity ``(B, T)``."""
        raise NotImplementedError

    def forward(
        self, features: Tensor, grid: tuple[int, int], superpixels: Tensor, num_superpixels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Project patch features to LLM tokens.

        ``features``: ``(B, h*w, Dv)`` patch features (no CLS) in row-major grid order, ``grid=(h, w)``;
        ``superpixels``: ``(B, H, W)`` long label map in the frame of the vision input, labels
        ``0..K_b-1`` with ``K_b = num_superpixels[b]``. Returns tokens ``(B, T, D_llm)`` padded on the
        right with zeros, and ``valid`` ``(B, T)`` bool (True = real token).
        """
        if features.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"features hold {features.shape[1]} patches, grid {grid} needs {grid[0] * grid[1]}")
        tokens, valid = self.compress(features, grid, superpixels, num_superpixels)
        return self.mlp(tokens).masked_fill(~valid[..., None], 0.0), valid

    def regions(self, grid: tuple[int, int], superpixels: Tensor) -> Tensor:
        """``(B, H, W)`` long: the token each pixel of the vision frame belongs to, in token order.

        What a token *is* in image space, so that selecting tokens can be drawn as a mask (the
        region prompt of ``trainer.model.region_prompt``).
        """
        raise NotImplementedError


class MLPProjector(Projector):
    """``mlp``: every patch is a token (LLaVA-1.5) — the uncompressed reference, T = h·w."""

    def compress(
        self, features: Tensor, grid: tuple[int, int], superpixels: Tensor, num_superpixels: Tensor
    ) -> tuple[Tensor, Tensor]:
        return features, features.new_ones(features.shape[:2], dtype=torch.bool)

    def regions(self, grid: tuple[int, int], superpixels: Tensor) -> Tensor:
        return _grid_cells(superpixels.shape, grid, superpixels.device)  # token p is patch p


class PoolProjector(Projector):
    """``pool``: average-pool the patch grid to a fixed rows×cols — compression blind to image content."""

    def __init__(self, vision_dim: int, llm_dim: int, grid: tuple[int, int]) -> None:
        super().__init__(vision_dim, llm_dim)
        self.grid = grid

    def compress(
        self, features: Tensor, grid: tuple[int, int], superpixels: Tensor, num_superpixels: Tensor
    ) -> tuple[Tensor, Tensor]:
        image = features.transpose(1, 2).unflatten(2, grid)  # (B, Dv, h, w)
        tokens = F.adaptive_avg_pool2d(image, self.grid).flatten(2).transpose(1, 2)
        return tokens, tokens.new_ones(tokens.shape[:2], dtype=torch.bool)

    def regions(self, grid: tuple[int, int], superpixels: Tensor) -> Tensor:
        return _grid_cells(superpixels.shape, self.grid, superpixels.device)  # token c is pooled cell c


class SemanticProjector(Projector):
    """``svp``: one token per superpixel (pooling), optionally with SSPE and SSA; T = max_b K_b.

    With neither SSPE nor SSA this is the "superpixel pooling only" rung of the ablation ladder.
    """

    reads_superpixels = True

    def __init__(self, vision_dim: int, llm_dim: int, config: ProjectorConfig) -> None:
        super().__init__(vision_dim, llm_dim)
        self.position = SuperpixelPositionalEmbedding(vision_dim) if config.sspe else None
        self.aggregator = (
            SuperpixelAggregator(vision_dim, config.ssa_heads, config.ssa_layers) if config.ssa else None
        )
        self.shuffle_tokens = config.shuffle_tokens

    def _labels(self, superpixels: Tensor) -> Tensor:
        """The label map in token order: as it is, or shuffled (``ProjectorConfig.shuffle_tokens``)."""
        return shuffled_labels(superpixels) if self.shuffle_tokens else superpixels

    def compress(
        self, features: Tensor, grid: tuple[int, int], superpixels: Tensor, num_superpixels: Tensor
    ) -> tuple[Tensor, Tensor]:
        superpixels = self._labels(superpixels)
        num_superpixels = num_superpixels.to(superpixels.device)
        coverage = coverage_matrix(superpixels, num_superpixels, grid)
        valid = torch.arange(coverage.shape[1], device=coverage.device) < num_superpixels[:, None]
        weights = pooling_weights(coverage).to(features.dtype)
        tokens = weights @ features
        if self.position is not None:
            tokens = tokens + self.position(weights, grid, superpixels, num_superpixels)
        if self.aggregator is not None:
            tokens = self.aggregator(tokens, features, coverage, valid)
        return tokens, valid

    def regions(self, grid: tuple[int, int], superpixels: Tensor) -> Tensor:
        return self._labels(superpixels)  # token k is superpixel k (of the order compress used)


def build_projector(config: ProjectorConfig, vision_dim: int, llm_dim: int) -> Projector:
    """The projector ``config.kind`` names, mapping ``vision_dim`` patch features to ``llm_dim`` tokens."""
    if config.kind == "mlp":
        return MLPProjector(vision_dim, llm_dim)
    if config.kind == "pool":
        return PoolProjector(vision_dim, llm_dim, config.pool_grid)
    if config.ssa and vision_dim % config.ssa_heads:
        raise ValueError(f"vision_dim {vision_dim} is not divisible by ssa_heads {config.ssa_heads}")
    return SemanticProjector(vision_dim, llm_dim, config)
