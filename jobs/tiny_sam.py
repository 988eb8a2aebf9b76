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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jobs import entry, options
from pipeline.refer import ReferError
from pipeline.sam_model import build_sam, save_tiny_sam
from trainer.sam_pretraining import PretrainConfig, PretrainingError, load_promptable_images, pretrain_sam


@dataclass(frozen=True)
class TinySamOptions:
    """Where the tiny SAM goes, and what it is first taught (its defaults: ``PretrainConfig``'s)."""

    out: Path = field(metadata={"help": "where to write the .pth state dict"})
    seed: int = field(default=0, metadata={"help": "random seed of the initial weights and of the pretraining"})
    pretrain_on: Path | None = field(default=None, metadata={"metavar": "REFER_ROOT", "help": (
        "a REFER root whose train split (refcoco, unc) the SAM learns clicks → masks on; omitted: no pretraining, "
        "random weights")})
    steps: int = field(default=PretrainConfig.steps, metadata={"help": "pretraining steps"})
    images_per_step: int = field(default=PretrainConfig.images_per_step, metadata={"help": (
        "images per pretraining step (one click in each of their objects)")})
    lr: float = field(default=PretrainConfig.lr, metadata={"help": "pretraining learning rate (AdamW)"})


OPTIONS = (TinySamOptions,)


def run(args: argparse.Namespace) -> int:
    given = options.build(TinySamOptions, args)
    if given.pretrain_on is None:
        path = save_tiny_sam(given.out, seed=given.seed)
        print(f"random tiny SAM written to {path} (use: --sam-checkpoint {path} --sam-model tiny)")
        return 0
    if given.steps < 1 or given.images_per_step < 1:
        raise SystemExit("svp tiny-sam: --steps and --images-per-step must be >= 1")
    # Written under a temporary name and renamed when trained: an interrupted run leaves no
    # random checkpoint where a trained one is expected.
    staging = save_tiny_sam(given.out.with_name(given.out.name + ".partial"), seed=given.seed)
    sam = build_sam("tiny", staging)
    try:
        images = load_promptable_images(given.pretrain_on, sam.image_encoder.img_size)
    except (ReferError, PretrainingError, OSError) as error:
        staging.unlink()
        raise SystemExit(f"svp tiny-sam: --pretrain-on {given.pretrain_on}: {error}") from error
    print(f"pretraining the tiny SAM on {len(images)} train images "
          f"({sum(len(image.masks) for image in images)} objects), {given.steps} steps")
    started = time.perf_counter()

    def progress(step: int, loss: float, iou: float) -> None:
        print(f"  step {step}/{given.steps}: loss {loss:.3f}, IoU of the best output {iou:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    with torch.random.fork_rng():
        torch.manual_seed(given.seed)
        pretrain_sam(sam, images, PretrainConfig(steps=given.steps, images_per_step=given.images_per_step,
                                                 lr=given.lr, seed=given.seed), progress)
    torch.save(sam.state_dict(), staging)
    path = staging.replace(given.out)
    print(f"pretrained tiny SAM written to {path} (use: --sam-checkpoint {path} --sam-model tiny)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
