"""The global vision encoder (DINOv2 by default, DESIGN §1): frozen, patch features on a grid.

Both halves load it from here: the trainer runs it at every step, and ``svp precompute
--store-vision-features`` runs it once per image and stores its patch features (``vision.npy``),
recorded with what identifies the encoder (:meth:`VisionEncoder.identity`), so that a trainer runs
it only when the stored features are not its own.

The projectors need the patch features alone, in row-major order, with the grid they lie on: the
superpixel coverage matrix is computed against that grid. ViTs put their prefix tokens first
(DINOv2: CLS + optional registers; CLIP: CLS; SigLIP: none), so the prefix is whatever precedes
the last ``h*w`` tokens: one rule for all three, no per-family table.

Each encoder is fed what its checkpoint expects: the input size of its image processor (DINOv2's
224 crop, CLIP-336's 336, SigLIP's resize) unless ``--vision-size`` says otherwise, and the processor's
mean/std. A CLIP or SigLIP checkpoint holds a text tower too; only the vision tower is loaded (as
LLaVA does), and like LLaVA the CLS token is dropped by the rule above.

This module also resolves where pretrained weights come from (a local directory or a hub id),
shared with the LLM in ``trainer.model.mllm``, so that a wrong ``--vision`` / ``--llm`` fails
on a config read, before any weights are loaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    BaseImageProcessor,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    SiglipVisionModel,
)

from pipeline.errors import SvpError
from pipeline.hashing import tensors_sha256

TINY = "tiny"
TINY_VISION_SIZE = 224
# Checkpoints with a text tower beside the vision tower: load the vision tower alone.
_VISION_TOWERS = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's processor defaults
IMAGENET_STD = (0.229, 0.224, 0.225)
_TINY_VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, patch_size=14)
# The seed a model's random parts are drawn from when none is given (svp train's --seed default): a
# standalone "tiny" encoder (the precompute job's) is the one such a model draws first.
DEFAULT_MODEL_SEED = 0
STORED_DTYPE = np.float16  # vision.npy: half the bytes of float32, and the features are frozen


def vision_field(default: str | None, **metadata: Any) -> Any:
    """``--vision``, declared through here by every config that names the vision encoder."""
    return field(default=default, metadata={"help": (
        "vision encoder: an HF id or local directory (e.g. facebook/dinov2-base), or 'tiny' (a random tiny "
        "DINOv2)"), **metadata})


def vision_size_field(**metadata: Any) -> Any:
    """``--vision-size``, declared through here by every config that names the vision encoder."""
    return field(default=None, metadata={"help": (
        "square input size of the vision encoder; omitted: the encoder's own, from its image processor config "
        "(224 for DINOv2 and tiny, 336 for CLIP ViT-L/14-336, SigLIP's resize), recorded as resolved"), **metadata})


class ModelLoadError(SvpError, ValueError):
    """A model option (``--llm``, ``--vision``, ``--sam-checkpoint``) names nothing loadable."""


def pretrained_source(name: str, option: str) -> tuple[PretrainedConfig, bool]:
    """(config, local_files_only) for a local directory or a hub id, or a ModelLoadError naming ``option``.

    A local directory is read with ``local_files_only=True`` (never a silent hub lookup for a
    typo); anything path-like that does not exist is refused outright; a hub id must resolve to a
    config (from the cache when offline) — a cheap read that catches a wrong id before the weights.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return AutoConfig.from_pretrained(local, local_files_only=True), True
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"{option} {name!r} is not a model directory (it does not exist or is a file)")
    try:
        return AutoConfig.from_pretrained(name), False
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{option} {name!r} is neither a local directory nor a loadable hub model: {error}"
        ) from error


class VisionEncoder(nn.Module):
    """A frozen HF ViT that returns (patch features (B, h*w, D), grid (h, w)) without prefix tokens."""

    def __init__(self, backbone: nn.Module, patch_size: int, hidden_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], interpolate: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.patch_size, self.hidden_size = patch_size, hidden_size
        self.mean, self.std = mean, std
        # CLIP and SigLIP learned position embeddings for one size; at another they must be interpolated
        # (DINOv2 always interpolates and takes no such argument).
        self._forward_kwargs = {"interpolate_pos_encoding": True} if interpolate else {}

    def train(self, mode: bool = True) -> VisionEncoder:
        """Stay in eval mode: the encoder is frozen, so dropout and the like must never switch on."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.grid(pixel_values.shape[-1])
        dtype = next(self.backbone.parameters()).dtype
        tokens = self.backbone(pixel_values=pixel_values.to(dtype), **self._forward_kwargs).last_hidden_state
        return tokens[:, tokens.shape[1] - grid[0] * grid[1] :], grid

    def grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the patch grid of a square ``image_size`` input."""
        return image_size // self.patch_size, image_size // self.patch_size

    def features_shape(self, image_size: int) -> tuple[int, int]:
        """(patches, channels) of one image's features: what ``vision.npy`` holds."""
        rows, columns = self.grid(image_size)
        return rows * columns, self.hidden_size

    def identity(self, name: str, image_size: int) -> dict[str, Any]:
        """What stored features are recorded with, and matched on: the weights by content (a path
        moves, a hub id is re-uploaded), the input size and normalisation that fed them."""
        return {"model": name, "size": image_size, "weights_sha256": tensors_sha256(self.backbone.state_dict()),
                "mean": list(self.mean), "std": list(self.std), "patch_size": self.patch_size,
                "hidden_size": self.hidden_size, "dtype": np.dtype(STORED_DTYPE).name}


def same_encoder(stored: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether features recorded as ``stored`` are what the encoder of ``identity`` computes; the
    name is not compared (the same weights may sit in another directory)."""
    return all(stored.get(key) == identity[key] for key in identity if key != "model")


def vision_pixels(rgb: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The encoder's input: the whole image squashed (not cropped, so every superpixel stays in
    view) to size×size, in [0, 1], normalised; float32 (3, size, size)."""
    image = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0] / 255.0
    return (image - per_channel(mean)) / per_channel(std)


def per_channel(values: tuple[float, ...]) -> torch.Tensor:
    """A (C, 1, 1) tensor that broadcasts a per-channel mean or std over a (C, H, W) image."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None]


def _vision_config(config: PretrainedConfig) -> PretrainedConfig:
    """A CLIP/SigLIP checkpoint holds text and vision; the vision tower has its own config."""
    return getattr(config, "vision_config", None) or config


def _processor(name: str, local: bool) -> BaseImageProcessor | None:
    """The checkpoint's image processor, or None when it ships none (then DINOv2's defaults apply)."""
    try:
        return AutoImageProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError, AttributeError):
        return None


def _processor_size(processor: BaseImageProcessor) -> int | None:
    """The square side the processor feeds its model: the crop when it crops, else the resize."""
    sizes = [getattr(processor, "crop_size", None)] if getattr(processor, "do_center_crop", False) else []
    sizes.append(getattr(processor, "size", None))
    for size in sizes:  # a dict, or transformers' SizeDict (attributes)
        field = size.get if isinstance(size, dict) else (lambda key, size=size: getattr(size, key, None))
        side = field("height") or field("shortest_edge")
        if side:
            return int(side)
    return None


def default_vision_size(name: str, option: str = "--vision") -> int:
    """The input side of ``name``'s own preprocessing (224 for tiny), read from its configs only."""
    if name == TINY:
        return TINY_VISION_SIZE
    config, local = pretrained_source(name, option)
    processor = _processor(name, local)
    side = _processor_size(processor) if processor is not None else None
    return side or int(_vision_config(config).image_size)


def load_vision(name: str, image_size: int, option: str = "--vision") -> tuple[VisionEncoder, int, int]:
    """(frozen encoder, hidden dim, patch size); ``"tiny"`` is a random 2-layer DINOv2 for tests.

    Mean/std come from the checkpoint's image processor when it has one, else ImageNet's (DINOv2's).
    """
    if name == TINY:
        config = Dinov2Config(image_size=image_size, **_TINY_VISION)
        encoder = VisionEncoder(Dinov2Model(config), config.patch_size, config.hidden_size, IMAGENET_MEAN, IMAGENET_STD)
        return encoder, config.hidden_size, config.patch_size
    config, local = pretrained_source(name, option)
    tower = _VISION_TOWERS.get(config.model_type)
    if tower is not None:
        backbone = tower.from_pretrained(name, local_files_only=local, dtype="auto")  # frozen: keep the stored dtype
    else:
        model = AutoModel.from_pretrained(name, local_files_only=local, dtype="auto")
        backbone = getattr(model, "vision_model", model)  # another two-tower model → its vision tower
    processor = _processor(name, local)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if processor is not None:
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    config = _vision_config(config)
    interpolate = tower is not None and image_size != config.image_size
    encoder = VisionEncoder(backbone, config.patch_size, config.hidden_size, mean, std, interpolate)
    return encoder, config.hidden_size, config.patch_size


@dataclass(frozen=True)
class VisionOptions:
    """The frozen vision encoder whose patch features ``svp precompute`` stores beside the superpixels."""

    store_vision_features: bool = field(default=False, metadata={"help": (
        "also write vision.npy: the frozen --vision encoder's patch features of each image (float16, "
        "patches x channels: 384 KiB for DINOv2-base at 224, 2 MiB for DINOv2-large at 448), recorded in the "
        "manifest with the encoder's weights hash, input size and normalisation; a trainer with that very encoder "
        "reads them instead of running it")})
    vision: str | None = vision_field(None)
    vision_size: int | None = vision_size_field()

    def validate(self) -> None:
        """Refuse, before any work starts, a request that cannot be met on the workers."""
        if self.store_vision_features != (self.vision is not None) or (self.vision_size and self.vision is None):
            raise ModelLoadError("--store-vision-features and --vision go together (and --vision-size with them): "
                                 "--vision names the encoder whose features are stored")
        if self.vision is not None and self.vision != TINY:
            pretrained_source(self.vision, "--vision")

    def resolved_size(self) -> int:
        return self.vision_size or default_vision_size(self.vision)

    def load(self) -> VisionEncoder:
        """The encoder, on the CPU (the caller moves it)."""
        return standalone_encoder(self.vision, self.resolved_size())


def standalone_encoder(name: str, image_size: int) -> VisionEncoder:
    """The encoder outside a model. Its random weights, for ``tiny``, are those a model of the
    default seed draws first (``SegmentationMLLM`` builds its vision encoder first); the caller's
    random stream is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(DEFAULT_MODEL_SEED)
        return load_vision(name, image_size)[0]


@functools.cache
def vision_identity(name: str, image_size: int) -> dict[str, Any]:
    """:meth:`VisionEncoder.identity` of the encoder ``name`` (loaded once per process: a job's
    config and its checks each ask)."""
    return standalone_encoder(name, image_size).identity(name, image_size)
