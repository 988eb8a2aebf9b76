"""What every benchmark part shares: presets, the command line, the workspace (one synthetic
dataset for all parts), random models of a chosen size, timing, and where results go.

Presets pick the sizes; any flag overrides its preset's value:

- ``cpu`` (``make bench``, the default): what a 2-core CPU does in about a quarter of an hour:
  fewer accuracy steps and seeds and fewer timing repetitions than ``full``; each part's
  ``notes`` (and the headline's) say what shrank, so that no figure is read at a size it did not have;
- ``full``: the sizes behind the recorded CPU figures, about an hour and a half on 2 cores;
- ``quick``: the same code paths at toy sizes, in a couple of minutes (the test of the plumbing);
- ``gpu`` (``make bench-gpu``): CUDA, bf16, a SAM ViT-H-sized model and a ~0.7B-parameter LLM,
  both with random weights (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jobs.options import add_options
from jobs.workflow import SAM_PRETRAIN_STEPS, SyntheticData, synthetic_data
from pipeline.sam_model import build_sam
from pipeline.superpixels.base import sam_checkpoint_field, sam_model_field
from trainer.model.tokenizer import tiny_tokenizer

PRESETS = ("cpu", "full", "quick", "gpu")
# The shared flags' values per preset; each part names its own in its PRESETS. The flags' defaults
# are the cpu preset's, so ``full`` names every value in which it differs from cpu (differences_from_full).
COMMON_PRESETS = {"cpu": {}, "full": {}, "quick": {"images": 16, "sam_pretrain_steps": 10},
                  "gpu": {"images": 400, "sam_model": "vit_h", "dtype": "bf16"}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = Path("bench/results")


# ------------------------------------------------------------------------------------ command line


@dataclass(frozen=True)
class BenchOptions:
    """Every part: the sizes (a preset), where results and work go, the dataset the parts share, and
    the SAM of the speed measurements (precompute, train_step: random weights of --sam-model unless
    --sam-checkpoint)."""

    preset: str = field(default="cpu", metadata={"choices": PRESETS, "help": (
        "sizes of everything: cpu (make bench, about 15 min on 2 cores: fewer accuracy steps and seeds, fewer "
        "repetitions; the results' notes say what shrank), full (the recorded CPU sizes, about 1.5 h on 2 cores), "
        "quick (toy sizes, minutes), gpu (make bench-gpu: CUDA, bf16, SAM ViT-H and a ~0.7B LLM)")})
    device: str | None = field(default=None, metadata={"help": (
        "torch device of the speed measurements; omitted: cuda for the gpu preset, else cpu (accuracy trains "
        "where the trainer does: on the GPU if there is one)")})
    dtype: str = field(default="fp32", metadata={"choices": tuple(sorted(DTYPES)), "help": (
        "fp32, or bf16: train steps and latency under bf16 autocast with the LLM stored in bf16, accuracy runs "
        "with bf16 mixed precision (the gpu preset's)")})
    results: Path = field(default=RESULTS, metadata={"help": "where results go"})
    work: Path | None = field(default=None, metadata={"help": (
        "working directory (data, runs, models); omitted: a temporary one, removed at the end")})
    images: int = field(default=400, metadata={"help": (
        "images of the synthetic dataset that tokens, train_step and accuracy share")})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic dataset"})
    sam_pretrain_steps: int = field(default=SAM_PRETRAIN_STEPS, metadata={"help": (
        "promptable pretraining steps of the dataset's tiny SAM (its embeddings are in the shards; the accuracy "
        "part's mask head), as in the demo")})
    sam_model: str = sam_model_field("tiny")
    sam_checkpoint: str | None = sam_checkpoint_field()


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every part: :class:`BenchOptions`, and ``--quick`` for the preset most often typed."""
    add_options(parser, BenchOptions)
    parser.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="the same as --preset quick")


def parse_args(parts: Sequence[ModuleType], argv: Sequence[str] | None, prog: str,
               description: str) -> argparse.Namespace:
    """One parser for ``parts`` (each adds its flags and names its presets' values), with the
    preset's values as defaults: an explicit flag always wins."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_common_arguments(parser)
    for part in parts:
        part.add_arguments(parser)
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**COMMON_PRESETS[preset])
    for part in parts:
        parser.set_defaults(**part.PRESETS[preset])
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if preset == "gpu" else "cpu")
    return args


# ------------------------------------------------------------------------------------ workspace


@dataclass
class Workspace:
    """The working directory of one benchmark run and the dataset its parts share, made on first use."""

    root: Path
    images: int
    seed: int
    sam_pretrain_steps: int
    _data: SyntheticData | None = field(default=None, init=False)

    def data(self) -> SyntheticData:
        """Synthetic REFER data → a tiny SAM (pretrained on its train images when
        ``--sam-pretrain-steps`` > 0) → felzenszwalb superpixels + that SAM's embeddings, by the
        demo's chain (``jobs.workflow``)."""
        if self._data is None:
            self._data = synthetic_data(self.root / "data", images=self.images, seed=self.seed,
                                        sam_pretrain_steps=self.sam_pretrain_steps)
        return self._data

    def shards(self) -> Path:
        return self.data().shards

    @property
    def sam_checkpoint(self) -> Path:
        """The tiny SAM of the shared dataset: its embeddings are in the shards' ``sam.npy``."""
        return self.data().sam_checkpoint


def speed_sam_checkpoint(args: argparse.Namespace, workspace: Workspace) -> Path:
    """The SAM of the speed measurements: ``--sam-checkpoint``, or random weights of ``--sam-model``.

    Not the dataset's SAM even for ``tiny``: the same code path serves ``tiny`` on a CPU and
    ``vit_h`` on a GPU, and a step's cost does not depend on what the ``sam.npy`` it reads holds.
    """
    if args.sam_checkpoint is not None:
        return Path(args.sam_checkpoint)
    return save_random_sam(workspace.root / f"sam_{args.sam_model}_random.pth", args.sam_model)


def run_parts(parts: Sequence[ModuleType], args: argparse.Namespace) -> dict[str, dict]:
    """Run each part in a workspace (``--work`` or a temporary one); {part name: its results}."""
    with nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="svp-bench-") as root:
        Path(root).mkdir(parents=True, exist_ok=True)
        workspace = Workspace(Path(root), args.images, args.seed, args.sam_pretrain_steps)
        results = {}
        for part in parts:
            start = time.perf_counter()
            results[part.NAME] = part.run(args, workspace)
            results[part.NAME]["seconds"] = time.perf_counter() - start
            results[part.NAME]["device"] = describe_device(args.device)
            results[part.NAME]["notes"] = [*differences_from_full(args, part.PRESETS["full"]),
                                           *results[part.NAME].get("notes", [])]
            write_json(args.results / f"{part.NAME}.json", results[part.NAME])
            print(part.format_table(results[part.NAME]), flush=True)
            print("".join(f"note: {note}\n" for note in results[part.NAME]["notes"]), flush=True)
    return results


def differences_from_full(args: argparse.Namespace, full: dict) -> list[str]:
    """Each value of ``full`` (the full preset of a part's or the shared flags) that this run sets
    otherwise, as "--flag VALUE (full preset: VALUE)": what the cpu preset shrank, said next to the
    figures it shaped, so that a quarter-hour run is not read as the recorded one."""
    return [f"--{key.replace('_', '-')} {getattr(args, key)} (full preset: {value})"
            for key, value in full.items() if getattr(args, key) != value]


def run_alone(part: ModuleType, argv: Sequence[str] | None) -> dict:
    """``python -m bench.<part>``: that part alone, with the same flags and presets as in ``python -m bench``."""
    args = parse_args([part], argv, f"python -m bench.{part.NAME}", part.__doc__.split("\n")[0])
    return run_parts([part], args)[part.NAME]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------ measuring


def describe_device(device: str | torch.device) -> str:
    """What the timings ran on, for the results and the tables."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], repeats: int, device: str | torch.device) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample; 0 for one value), min, max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


# ------------------------------------------------------------------------------------ random models


def save_random_sam(path: Path, model_type: str, seed: int = 0) -> Path:
    """A SAM of ``model_type`` (tiny, vit_b, vit_l, vit_h) with segment-anything's random init (seeded,
    so runs compare), saved as a checkpoint: the shape and cost of the real model, nothing downloaded."""
    if not path.exists():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            torch.save(build_sam(model_type).state_dict(), path)
    return path


@dataclass(frozen=True)
class LlmSize:
    """A Llama-style decoder by width and depth (``"HIDDENxLAYERS"``, e.g. ``1536x24``): heads of
    64 dims, an 8/3-wide SwiGLU MLP (Llama's ratio, rounded up to 64); ``tiny`` is the trainer's own."""

    name: str

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    def config_fields(self) -> dict:
        try:
            hidden, layers = (int(v) for v in self.name.lower().split("x"))
        except ValueError:
            raise ValueError(f"an LLM size is 'tiny' or HIDDENxLAYERS such as 512x8, got {self.name!r}") from None
        if hidden % 64 or hidden <= 0 or layers <= 0:
            raise ValueError(f"LLM size {self.name!r}: the width must be a positive multiple of 64, the depth positive")
        intermediate = math.ceil(hidden * 8 / 3 / 64) * 64
        return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                    num_key_value_heads=hidden // 64, intermediate_size=intermediate, max_position_embeddings=2048,
                    tie_word_embeddings=False)

    def materialise(self, root: Path, dtype: torch.dtype) -> str:
        """The ``--llm`` value of this size: ``tiny``, or a directory holding a random-weight model
        of it (in ``dtype``) and the tiny tokenizer, loaded by the trainer like any local model."""
        if self.is_tiny:
            return "tiny"
        path = root / f"llm-{self.name}-{str(dtype).removeprefix('torch.')}"
        if not (path / "config.json").exists():
            tokenizer = tiny_tokenizer()
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **self.config_fields()))
            model.to(dtype).save_pretrained(path)
            tokenizer.save_pretrained(path)
        return str(path)
