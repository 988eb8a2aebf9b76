"""``svp predict --run RUN --image IMG --text TEXT --out overlay.png``: segment what the text refers to.

The image gets superpixels from the same backend the run was trained on (as recorded in its
``run_config.json``; override with ``--backend``), with the SAM settings it recorded; a
``--sam-model`` given here must be the run's. Then the model predicts the mask. Writes the overlay
(mask tinted red, the expression written above) and, with ``--mask-out``, the binary mask.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from jobs import entry, options
from pipeline.images import ImageDecodeError, decode_image
from pipeline.partition import PartitionConfig
from pipeline.superpixels import BACKENDS
from pipeline.superpixels.base import BackendConfigError, SamOptions, sam_checkpoint_field, sam_model_field
from pipeline.superpixels.spec import BackendSpec
from trainer.checkpoint import load_trained_model, read_run_config
from trainer.predict import predict_mask, render_overlay


@dataclass(frozen=True)
class PredictOptions:
    """What to segment in which image, with which run, and where the overlay goes."""

    run: Path = field(metadata={"help": "run directory of `svp train`"})
    image: Path = field(metadata={"help": "image file (JPEG, PNG, ...)"})
    text: str = field(metadata={"help": "the referring expression, e.g. 'the red circle'; never empty"})
    out: Path = field(metadata={"help": "overlay PNG to write"})
    mask_out: Path | None = field(default=None, metadata={"help": "also write the binary mask as a PNG"})
    backend: str | None = field(default=None, metadata={"choices": tuple(BACKENDS), "help": (
        "superpixel backend; omitted: the one the run's training shards were made with")})
    sam_checkpoint: str | None = sam_checkpoint_field()
    sam_model: str | None = sam_model_field(None)


OPTIONS = (PredictOptions,)


def superpixel_backend(given: PredictOptions) -> BackendSpec:
    """The backend the run trained on (from its recorded shard config), unless overridden, with the
    SAM settings it recorded; a ``--sam-model`` that is not the recorded one is refused, not replaced."""
    source = read_run_config(given.run).get("data", {}).get("train", {}).get("config", {})
    recorded = SamOptions.from_record(source["sam"]) if "sam" in source else None
    if given.sam_model is not None and recorded is not None and given.sam_model != recorded.sam_model:
        raise BackendConfigError(
            f"--sam-model {given.sam_model} is not the SAM of the run: {given.run}'s training shards were made with "
            f"--sam-model {recorded.sam_model}; give that, or leave --sam-model out")
    name = given.backend or source.get("backend")
    if name is None:
        raise BackendConfigError(f"{given.run} does not record its superpixel backend; pass --backend")
    partition = PartitionConfig(**source["partition"]) if "partition" in source else PartitionConfig()
    sam = None
    if name == "sam":
        settings = recorded or SamOptions()
        sam = replace(settings, sam_checkpoint=given.sam_checkpoint, sam_model=given.sam_model or settings.sam_model,
                      store_sam_embeddings=False)
    spec = BackendSpec(name, partition, sam)
    spec.validate()
    return spec


def run(args: argparse.Namespace) -> int:
    given = options.build(PredictOptions, args)
    if not given.text.strip():  # the model would still paint a mask, of nothing anyone asked for
        raise options.OptionError("--text is empty: give the expression to segment, e.g. --text 'the red circle'")
    try:
        data = given.image.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read --image {given.image}: {exc}") from exc
    image = decode_image(data)
    spec = superpixel_backend(given)
    model = load_trained_model(given.run)
    labels = spec.build()([image.rgb])[0].labels
    mask, tokens = predict_mask(model, image.rgb, labels, given.text)
    given.out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image.rgb, mask, given.text).save(given.out)
    if given.mask_out is not None:
        Image.fromarray((mask * 255).astype(np.uint8)).save(given.mask_out)
    print(f"predict: {int(mask.sum())} of {mask.size} pixels, {tokens} visual tokens; overlay: {given.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
