"""Every CUDA path in one short run: ``make gpu-check`` (``python -m bench.gpu_check``).

A lent GPU is rare and brief, so what needs one is gathered here, sized to finish in a few minutes
on one H100: the commands a user types, each in a process of its own as a user runs it, then the
two benchmarks whose figures a GPU changes.

1. ``svp synth``, then ``svp precompute`` with the SAM backend on SAM ViT-H's architecture (random
   weights, official ``.pth`` format, 1024 px frame, 32×32 grid, embeddings stored), one GPU worker;
2. ``svp train``: the real-size stack (a Qwen2.5-0.5B-shaped LLM, DINOv2-base, that SAM) for a few
   steps in bf16 mixed precision;
3. ``svp eval`` and ``svp predict`` on that run (SAM's encoder and the generator in bf16);
4. ``bench.precompute`` (the generators side by side, at real size too) and ``bench.inference``
   (a new image end to end), their results beside this run's.

``RESULTS/check.json`` records each step's command, exit status and seconds, the card and the
commit. ``--dry-run`` runs the same chain on the CPU at toy sizes (tiny models, 4×4 grid, the
benchmarks' quick settings): ``make test`` runs it, so the script itself cannot rot between GPUs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import hub_models
from bench.common import describe_device, save_random_sam, write_json
from bench.options import RANDOM_WEIGHT_THRESHOLDS
from jobs.options import OptionsParser
from trainer.checkpoint import git_commit

RESULTS = Path(__file__).parent / "results" / "gpu"
STEP_TIMEOUT_S = 600


@dataclass(frozen=True)
class GpuCheckOptions:
    """Where the check works and writes, and whether it is the CPU dry run."""

    work: Path = field(default=Path("/tmp/svp-gpu-check"), metadata={"help": (
        "working directory: data, models, the run (kept: a rerun reuses the saved models)")})
    results: Path = field(default=RESULTS, metadata={"help": "where check.json and the benchmarks' results go"})
    dry_run: bool = field(default=False, metadata={"help": (
        "the same steps on the CPU at toy sizes (tiny models, a 4x4 grid): what make test runs")})


def _thresholds() -> list[str]:
    """A random SAM's masks all fall below SAM's own thresholds: these keep some, as real weights do."""
    return [item for name, value in RANDOM_WEIGHT_THRESHOLDS.items() for item in (f"--{name.replace('_', '-')}",
                                                                                 str(value))]


def steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, command line) of every step, in order; each needs the ones before it."""
    work, python = args.work, sys.executable
    refer, shards, run = work / "refer", work / "shards", work / "run"
    if args.dry_run:
        sam, sam_model, models, grid = work / "sam_tiny.pth", "tiny", [], "4"
        save_random_sam(sam, "tiny")  # each a no-op once saved: a rerun reuses them
        workers, precision = [], []
        bench_precompute = ["--preset", "quick"]
        bench_inference = ["--stacks", "demo", "--batch-size", "2", "--points-per-side", grid]
    else:
        sam, sam_model, grid = work / "sam_vit_h.pth", "vit_h", "32"
        save_random_sam(sam, "vit_h")
        llm, vision = work / "qwen2.5-0.5b", work / "dinov2-base"
        if not (llm / "config.json").is_file():
            hub_models.save_qwen2(llm)
        if not (vision / "config.json").is_file():
            hub_models.save_dinov2(vision)
        models = ["--llm", str(llm), "--vision", str(vision)]
        workers, precision = ["--gpus-per-worker", "1"], ["--mixed-precision", "bf16"]
        bench_precompute = ["--preset", "gpu", "--realsize-images", "2"]
        bench_inference = ["--stacks", "realsize", "--dtype", "bf16"]
    image = refer / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000001.jpg"  # synth's first
    sam_flags = ["--sam-checkpoint", str(sam), "--sam-model", sam_model]
    results = ["--results", str(args.results), "--allow-busy"]
    return [
        ("synth", [python, "-m", "jobs.synth", "--out", str(refer), "--images", "6"]),
        ("precompute", [python, "-m", "jobs.precompute", "--refer-root", str(refer), "--dataset", "refcoco",
                        "--split-by", "unc", "--out", str(shards), "--backend", "sam", *sam_flags,
                        "--points-per-side", grid, *_thresholds(), "--store-sam-embeddings", "--shard-size", "2",
                        "--workers", "1", *workers]),
        ("train", [python, "-m", "jobs.train", "--shards", str(shards), "--run-dir", str(run), *models, *sam_flags,
                   "--batch-size", "2", "--max-steps", "3", "--warmup-steps", "0", *precision]),
        ("eval", [python, "-m", "jobs.eval", "--run-dir", str(run), "--shards", str(shards), "--splits", "val",
                  "--batch-size", "2"]),
        ("predict", [python, "-m", "jobs.predict", "--run-dir", str(run), "--image", str(image), "--text",
                     "the red circle", "--out", str(work / "overlay.png"), *sam_flags]),
        ("bench.precompute", [python, "-m", "bench.precompute", *bench_precompute, "--skip-workers",
                              "--work", str(work / "bench-precompute"), *results]),
        ("bench.inference", [python, "-m", "bench.inference", *bench_inference, "--repeats", "1",
                             "--work", str(work / "bench-inference"), *results]),
    ]


def run_steps(args: argparse.Namespace) -> dict:
    """Each step in turn, timed; after a failure the rest are recorded as not run."""
    args.work.mkdir(parents=True, exist_ok=True)
    done, failed = [], None
    for name, command in steps(args):
        if failed is not None:
            done.append({"step": name, "command": command, "status": "not run"})
            continue
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        seconds = round(time.perf_counter() - started, 2)
        entry = {"step": name, "command": command, "rc": result.returncode, "seconds": seconds,
                 "status": "ok" if result.returncode == 0 else "failed"}
        if result.returncode != 0:
            entry["stderr_tail"] = result.stderr[-3000:]
            failed = name
        done.append(entry)
        print(f"gpu-check: {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    device = "cpu" if args.dry_run else "cuda"
    return {"ok": failed is None, "dry_run": args.dry_run, "device": describe_device(device),
            "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "steps": done}


def build_parser() -> OptionsParser:
    parser = OptionsParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_options(GpuCheckOptions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_steps(args)
    write_json(args.results / "check.json", report)
    print(json.dumps({"ok": report["ok"], "device": report["device"]}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
