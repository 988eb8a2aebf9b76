"""``svp predict --run RUN --image IMG --text TEXT --out overlay.png``: segment what the text refers to.

The image gets superpixels from the same backend the run was trained on (as recorded in its
``run_config.json``; override with ``--backend``), then the model predicts the mask. Writes the
overlay (mask tinted red, the expression written above) and, with ``--mask-out``, the binary mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from jobs import entry
from pipeline.images import ImageDecodeError, decode_image
from pipeline.partition import PartitionConfig
from pipeline.superpixels.base import (
    BACKENDS,
    BackendConfigError,
    BackendSpec,
    SamOptions,
)
from trainer.checkpoint import CheckpointError, load_trained_model, read_run_config
from trainer.predict import predict_mask, render_overlay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory of `svp train`")
    parser.add_argument("--image", required=True, type=Path, help="image file (JPEG, PNG, ...)")
    parser.add_argument("--text", required=True, help="the referring expression, e.g. 'the red circle'")
    parser.add_argument("--out", required=True, type=Path, help="overlay PNG to write")
    parser.add_argument("--mask-out", type=Path, default=None, help="also write the binary mask as a PNG")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="superpixel backend; default: the one the run's training shards were made with")
    parser.add_argument("--sam-checkpoint", default=None, help="SAM .pth, for --backend sam")
    parser.add_argument("--sam-model", default="vit_h", help="architecture of --sam-checkpoint; default vit_h")


def superpixel_backend(args: argparse.Namespace) -> BackendSpec:
    """The backend the run trained on (from its recorded shard config), unless overridden."""
    source = read_run_config(args.run).get("data", {}).get("train", {}).get("config", {})
    name = args.backend or source.get("backend")
    if name is None:
        raise BackendConfigError(f"{args.run} does not record its superpixel backend; pass --backend")
    partition = PartitionConfig(**source["partition"]) if "partition" in source else PartitionConfig()
    sam = None
    if name == "sam":
        recorded = source.get("sam", {})
        sam = SamOptions(checkpoint=args.sam_checkpoint or "", model_type=recorded.get("model_type", args.sam_model),
                         **{k: v for k, v in recorded.items() if k in SamOptions.__dataclass_fields__
                            and k not in ("checkpoint", "model_type", "store_embeddings")})
    spec = BackendSpec(name, partition, sam)
    spec.validate()
    return spec


def run(args: argparse.Namespace) -> int:
    try:
        image = decode_image(args.image.read_bytes())
        spec = superpixel_backend(args)
        model = load_trained_model(args.run)
    except (OSError, ImageDecodeError, BackendConfigError, CheckpointError) as exc:
        print(f"svp predict: error: {exc}", file=sys.stderr)
        return 2
    labels = spec.build()([image.rgb])[0].labels
    mask, tokens = predict_mask(model, image.rgb, labels, args.text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image.rgb, mask, args.text).save(args.out)
    if args.mask_out is not None:
        Image.fromarray((mask * 255).astype(np.uint8)).save(args.mask_out)
    print(f"predict: {int(mask.sum())} of {mask.size} pixels, {tokens} visual tokens; overlay: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
