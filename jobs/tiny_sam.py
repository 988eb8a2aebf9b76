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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from jobs import entry, options
from pipeline.errors import SvpError
from pipeline.sam_model import TOY_SAM_MODEL_TYPES, build_sam, save_state_dict, save_tiny_sam
from trainer.sam_pretraining import PretrainConfig, load_promptable_images, pretrain_sam


class PretrainOnError(SvpError, ValueError):
    """A ``--pretrain-on`` REFER root that cannot be read or offers nothing to pretrain on."""


class OutError(SvpError, ValueError):
    """An ``--out`` the checkpoint cannot be written to (a missing or read-only directory, a directory's own path)."""


@dataclass(frozen=True)
class TinySamOptions:
    """Where the tiny SAM goes, and what it is first taught (its defaults: ``PretrainConfig``'s)."""

    out: Path = field(metadata={"help": "where to write the .pth state dict"})
    sam_model: str = field(default="tiny", metadata={"choices": TOY_SAM_MODEL_TYPES, "help": (
        "tiny: SAM at toy sizes (512 px, 64-wide decoder); small: SAM's real prompt encoder, mask decoder and "
        "1024 px frame (what ViT-B/L/H share) on a small image encoder, for benchmarks of SAM's real sizes")})
    seed: int = field(default=0, metadata={"help": "random seed of the initial weights and of the pretraining"})
    pretrain_on: Path | None = field(default=None, metadata={"metavar": "REFER_ROOT", "help": (
        "a REFER root whose train split (refcoco, unc) the SAM learns clicks → masks on; omitted: no pretraining, "
        "random weights")})
    steps: int = field(default=PretrainConfig.steps, metadata={"help": "pretraining steps"})
    images_per_step: int = field(default=PretrainConfig.images_per_step, metadata={"help": (
        "images per pretraining step (one click in each of their objects)")})
    lr: float = field(default=PretrainConfig.lr, metadata={"help": "pretraining learning rate (AdamW)"})

    def __post_init__(self) -> None:
        """Refuse what cannot pretrain before anything is written (``options.build`` reports it: exit 2)."""
        for name in ("steps", "images_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def pretraining(self) -> PretrainConfig:
        """The pretraining asked for: each field of ``PretrainConfig`` that is an option here takes its
        value, the rest keep ``PretrainConfig``'s defaults (so a new option needs no line here)."""
        given = {f.name for f in fields(self)}
        return PretrainConfig(**{f.name: getattr(self, f.name) for f in fields(PretrainConfig) if f.name in given})


OPTIONS = (TinySamOptions,)


def run(args: argparse.Namespace) -> int:
    given = options.build(TinySamOptions, args)
    if given.out.is_dir():
        raise OutError(f"--out {given.out} is a directory: give the path of the .pth file to write")
    if given.pretrain_on is None:
        with _writing(given.out):
            path = save_tiny_sam(given.out, seed=given.seed, model_type=given.sam_model)
        print(f"random {given.sam_model} SAM written to {path} "
              f"(use: --sam-checkpoint {path} --sam-model {given.sam_model})")
        return 0
    # Written under a temporary name and renamed when trained: an interrupted run leaves no
    # random checkpoint where a trained one is expected. Written first, so that an --out that
    # cannot be written is refused before the pretraining, not after it.
    with _writing(given.out):
        staging = save_tiny_sam(given.out.with_name(given.out.name + ".partial"), seed=given.seed,
                                model_type=given.sam_model)
    sam = build_sam(given.sam_model, staging)
    try:
        images = load_promptable_images(given.pretrain_on, sam.image_encoder.img_size)
    except (SvpError, OSError) as error:  # a missing or malformed root, or one without train images
        staging.unlink()
        raise PretrainOnError(f"--pretrain-on {given.pretrain_on}: {error}") from error
    print(f"pretraining the {given.sam_model} SAM on {len(images)} train images "
          f"({sum(len(image.masks) for image in images)} objects), {given.steps} steps")
    started = time.perf_counter()

    def progress(step: int, loss: float, iou: float) -> None:
        print(f"  step {step}/{given.steps}: loss {loss:.3f}, IoU of the best output {iou:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    with torch.random.fork_rng():
        torch.manual_seed(given.seed)
        pretrain_sam(sam, images, given.pretraining(), progress)
    with _writing(given.out):
        path = save_state_dict(sam.state_dict(), staging).replace(given.out)
    print(f"pretrained {given.sam_model} SAM written to {path} (use: --sam-checkpoint {path} "
          f"--sam-model {given.sam_model})")
    return 0


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Report a failure to write the checkpoint as the user's to fix, naming the path (exit 2)."""
    try:
        yield
    except OSError as error:
        raise OutError(f"--out {out}: cannot write {error.filename or out}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
