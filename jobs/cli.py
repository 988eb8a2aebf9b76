"""``svp``: one command line for every part of the product (``svp <command> --help``)."""

from __future__ import annotations

from types import ModuleType

from jobs import demo, entry, eval, export, inspect, precompute, predict, synth, tiny_sam, train
from jobs.options import OptionsParser

COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "synth": (synth, "write a synthetic RefCOCO-format dataset (exact REFER layout)"),
    "precompute": (precompute, "REFER dataset -> superpixel WebDataset shards, as a Ray job"),
    "inspect": (inspect, "contact sheet, histograms and summary of a precompute output (local or s3://)"),
    "train": (train, "fine-tune the projector, LoRA and mask decoder from shards (Accelerate)"),
    "eval": (eval, "cIoU / gIoU / visual tokens / speed of a trained run, per split"),
    "predict": (predict, "segment what a text refers to in one image; writes an overlay"),
    "export": (export, "a run's checkpoint as a PEFT adapter, svp's trained parts and a model card"),
    "demo": (demo, "synth -> precompute -> train -> eval -> overlays, on a CPU in minutes"),
    "tiny-sam": (tiny_sam, "save a random tiny SAM checkpoint (for trying --backend sam without real weights)"),
}


def build_parser() -> OptionsParser:
    parser = OptionsParser(prog="svp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        entry.configure(commands.add_parser(name, help=summary), module)
    return parser


def main(argv: list[str] | None = None) -> int:
    return entry.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
