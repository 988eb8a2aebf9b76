"""``svp tiny-sam --out PATH``: save a random-initialised tiny SAM checkpoint.

For trying ``--backend sam`` end to end on a laptop or in CI, where the official weights are not
at hand: the file loads through exactly the path an official checkpoint does (``--sam-model
tiny``). Its superpixels are meaningless — it has never been trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs import entry
from pipeline.superpixels.sam import save_tiny_sam


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="where to write the .pth state dict")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial weights; default 0")


def run(args: argparse.Namespace) -> int:
    path = save_tiny_sam(args.out, seed=args.seed)
    print(f"tiny SAM written to {path} (use: --backend sam --sam-checkpoint {path} --sam-model tiny)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
