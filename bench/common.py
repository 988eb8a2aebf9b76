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
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jobs.options import OptionsParser
from jobs.workflow import SAM_PRETRAIN_STEPS, SyntheticData, synthetic_data
from pipeline.sam_model import build_sam
from pipeline.superpixels.base import sam_checkpoint_field, sam_model_field
from pipeline.timing import StageTimer
from trainer.checkpoint import git_commit
from trainer.model.token_rows import frozen_layer
from trainer.model.tokenizer import tiny_tokenizer

PRESETS = ("cpu", "full", "quick", "gpu")
# The shared flags' values per preset; each part names its own in its PRESETS. The flags' defaults
# are the cpu preset's, so ``full`` names every value in which it differs from cpu (differences_from_full).
COMMON_PRESETS = {"cpu": {}, "full": {}, "quick": {"images": 16, "sam_pretrain_steps": 10},
                  "gpu": {"images": 400, "sam_model": "vit_h", "dtype": "bf16"}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = Path("bench/results")
QUIET_LOAD = 0.5  # the 1-minute load average below which a machine counts as quiet


# ------------------------------------------------------------------------------------ command line


@dataclass(frozen=True)
class BenchOptions:
    """Every part: the sizes (a preset), where work goes, the dataset the parts share, and the SAM of
    the speed measurements (precompute, train_step: random weights of --sam-model unless
    --sam-checkpoint)."""

    preset: str = field(default="cpu", metadata={"choices": PRESETS, "help": (
        "sizes of everything: cpu (make bench, about 15 min on 2 cores: fewer accuracy steps and seeds, fewer "
        "repetitions; the results' notes say what shrank), full (the recorded CPU sizes, about 1.5 h on 2 cores), "
        "quick (toy sizes, minutes), gpu (make bench-gpu: CUDA, bf16, SAM ViT-H and a ~0.7B LLM)")})
    quick: bool = field(default=False, metadata={"help": "the same as --preset quick (and wins over it)"})
    device: str | None = field(default=None, metadata={"help": (
        "torch device of the speed measurements; omitted: cuda for the gpu preset, else cpu (accuracy trains "
        "where the trainer does: on the GPU if there is one)")})
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


@dataclass(frozen=True)
class OutputOptions:
    """Every benchmark: where its results go, and whether a busy machine may produce them."""

    results: Path = field(default=RESULTS, metadata={"help": "where the results (JSON, figures) go"})
    allow_busy: bool = field(default=False, metadata={"help": (
        f"measure and write results even when the 1-minute load average before the run is {QUIET_LOAD} or more "
        "(another job shares the machine: its figures are noise); the results then say the machine was busy")})


@dataclass(frozen=True)
class MeasurementOptions:
    """The parts and bench.inference: the precision their models run at."""

    dtype: str = field(default="fp32", metadata={"choices": tuple(sorted(DTYPES)), "help": (
        "fp32, or bf16: train steps and latency under bf16 autocast (train_step stores its LLM in bf16 too, as a "
        "bf16 run stores its frozen base), accuracy with bf16 mixed precision (the gpu preset's)")})


def build_parser(parts: Sequence[ModuleType], prog: str, description: str) -> OptionsParser:
    """The flags of ``parts``: :class:`BenchOptions`, :class:`OutputOptions`, :class:`MeasurementOptions`
    and each part's ``OPTIONS``."""
    parser = OptionsParser(prog=prog, description=description)
    parser.add_options(BenchOptions, OutputOptions, MeasurementOptions,
                       *(config for part in parts for config in part.OPTIONS))
    return parser


def parse_args(parts: Sequence[ModuleType], argv: Sequence[str] | None, prog: str,
               description: str) -> argparse.Namespace:
    """``argv`` parsed by :func:`build_parser`, with the preset's values (each part names its own in
    its ``PRESETS``) as the defaults: an explicit flag always wins."""
    parser = build_parser(parts, prog, description)
    first = parser.parse_known_args(argv)[0]
    preset = "quick" if first.quick else first.preset
    parser.set_defaults(**COMMON_PRESETS[preset])
    for part in parts:
        parser.set_defaults(**part.PRESETS[preset])
    args = parser.parse_args(argv)
    args.preset = preset
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
    load = machine_load(args)
    results = run_parts([part], args)[part.NAME]
    results.update(load)
    write_json(args.results / f"{part.NAME}.json", results)
    return results


def machine_load(args: argparse.Namespace) -> dict:
    """The load average before a run, printed with the results to come, and the commit that runs; a
    busy machine is refused (``SystemExit``) unless ``--allow-busy``, and the record then says it was busy."""
    load = os.getloadavg()
    busy = load[0] >= QUIET_LOAD
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"
          + (" (busy)" if busy else ""), flush=True)
    if busy and not args.allow_busy:
        raise SystemExit(f"bench: the machine is busy (1-minute load average {load[0]:.2f} >= {QUIET_LOAD}): figures "
                         f"measured beside another job are noise. Wait until it is quiet, or pass --allow-busy (the "
                         f"results then say the machine was busy)")
    return {"load_average_before": [round(value, 2) for value in load], "busy": busy, "git_commit": git_commit()}


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


class PartClock(StageTimer):
    """Seconds per part of a model's step or prediction: forward hooks charge each call's wall time
    to its part (``parts``: name → module), :meth:`stage` charges a block (backward, the optimizer,
    decoding) to a name, and :meth:`take_all` hands the sums over, with ``other`` the rest of
    ``total``. A superpixel backend given this clock as its timer charges its own stages to it.

    Parts must not nest (a part's time would count twice); on a GPU the hooks time the launch, so
    this is a CPU tool unless the caller synchronises."""

    def __init__(self, parts: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self._handles = [handle for name, module in parts.items() for handle in self._hook(name, module)]

    def _hook(self, name: str, module: torch.nn.Module) -> list:
        started: list[float] = []

        def before(*_: object) -> None:
            started.append(time.perf_counter())

        def after(*_: object) -> None:
            self.add(name, time.perf_counter() - started.pop())

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def take_all(self, total: float) -> dict[str, float]:
        """The seconds per part since the last take, ``other`` (``total`` less them) and ``total``."""
        seconds = self.take()
        return {**seconds, "other": max(0.0, total - sum(seconds.values())), "total": total}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def model_parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The parts of a ``SegmentationMLLM`` a step or a prediction is timed by (:class:`PartClock`)."""
    llm = model.causal_lm()
    return {"sam_encoder": model.mask_head.sam.image_encoder, "vision": model.vision, "projector": model.projector,
            "llm_body": llm.get_decoder(), "lm_head": frozen_layer(llm.get_output_embeddings()),
            "mask_head": model.mask_head}


def median_parts(run: Callable[[], None], clock: PartClock, repeats: int) -> dict[str, float]:
    """Median seconds per part (and ``total``) over ``repeats`` runs of ``run``, after a warm-up run."""
    run()
    clock.take()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        runs.append(clock.take_all(time.perf_counter() - started))
    keys = {key for measured in runs for key in measured}
    return {key: statistics.median(measured.get(key, 0.0) for measured in runs) for key in sorted(keys)}


def measured_main(module: ModuleType, argv: Sequence[str] | None) -> dict | None:
    """``main`` of a benchmark that measures each variant in a child process of its own
    (bench.realsize, bench.inference: a model's memory and threads are then its own): with
    ``--measure`` this is such a child and prints its row as JSON; else the quiet-machine check,
    ``module.run`` (which starts the children through :func:`measure_in_child`), the results
    written to ``RESULTS/NAME.json`` and printed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = module.build_parser().parse_args(argv)
    if args.measure:
        print(json.dumps(module.measure_child(args)))
        return None
    load = machine_load(args)
    results = {**module.run(args, argv), **load}
    write_json(args.results / f"{module.NAME}.json", results)
    print(module.format_table(results))
    return results


def measure_in_child(module: str, argv: Sequence[str], measure: str) -> dict:
    """The row ``python -m MODULE ARGV --measure MEASURE`` prints (see :func:`measured_main`)."""
    child = subprocess.run([sys.executable, "-m", module, *argv, "--measure", measure], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"{module}: measuring {measure} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])
