"""``svp tiny-sam --out PATH [--pretrain-on REFER_ROOT]``: save a tiny SAM checkpoint.

For trying SAM end to end on a laptop or in CI, where the official weights are not at hand: the
file loads through exactly the path an official checkpoint does (``--sam-model tiny``).

Without ``--pretrain-on`` its weights are random and its masks mean nothing (enough for tests of
the mechanics). With ``--pretrain-on`` it first learns what SAM's own training teaches, in
miniature, on the train images of a REFER root: a click inside an object → that object's mask
(``trainer.sam_pretraining``). That stands in for the released weights every real run starts
from (``svp demo --sam-pretrain-steps N`` does it on the demo's data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from jobs import entry
from pipeline.refer import ReferError
from pipeline.superpixels.sam import build_sam, save_tiny_sam
from trainer.sam_pretraining import PretrainConfig, PretrainingError, load_promptable_images, pretrain_sam


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="where to write the .pth state dict")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the initial weights and of the pretraining; default 0")
    parser.add_argument("--pretrain-on", type=Path, metavar="REFER_ROOT",
                        help="a REFER root whose train split (refcoco, unc) the SAM learns clicks → masks on; "
                             "default: no pretraining, random weights")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps,
                        help=f"pretraining steps; default {PretrainConfig.steps}")
    parser.add_argument("--images-per-step", type=int, default=PretrainConfig.images_per_step,
                        help=f"images per pretraining step (one click in each of their objects); "
                             f"default {PretrainConfig.images_per_step}")
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr,
                        help=f"pretraining learning rate (AdamW); default {PretrainConfig.lr}")


def run(args: argparse.Namespace) -> int:
    if args.pretrain_on is None:
        path = save_tiny_sam(args.out, seed=args.seed)
        print(f"random tiny SAM written to {path} (use: --sam-checkpoint {path} --sam-model tiny)")
        return 0
    if args.steps < 1 or args.images_per_step < 1:
        raise SystemExit("svp tiny-sam: --steps and --images-per-step must be >= 1")
    # Written under a temporary name and renamed when trained: an interrupted run leaves no
    # random checkpoint where a trained one is expected.
    staging = save_tiny_sam(args.out.with_name(args.out.name + ".partial"), seed=args.seed)
    sam = build_sam("tiny", staging)
    try:
        images = load_promptable_images(args.pretrain_on, sam.image_encoder.img_size)
    except (ReferError, PretrainingError, OSError) as error:
        staging.unlink()
        raise SystemExit(f"svp tiny-sam: --pretrain-on {args.pretrain_on}: {error}") from error
    print(f"pretraining the tiny SAM on {len(images)} train images "
          f"({sum(len(image.masks) for image in images)} objects), {args.steps} steps")
    started = time.perf_counter()

    def progress(step: int, loss: float, iou: float) -> None:
        print(f"  step {step}/{args.steps}: loss {loss:.3f}, IoU of the best output {iou:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        pretrain_sam(sam, images, PretrainConfig(steps=args.steps, images_per_step=args.images_per_step,
                                                 lr=args.lr, seed=args.seed), progress)
    torch.save(sam.state_dict(), staging)
    path = staging.replace(args.out)
    print(f"pretrained tiny SAM written to {path} (use: --sam-checkpoint {path} --sam-model tiny)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
