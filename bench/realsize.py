"""Real-size models on this machine, projector by projector: ``python -m bench.realsize``.

The stack a user starts from, at its real sizes with random weights (``bench.hub_models``, saved
and loaded as hub directories): a Qwen2.5-0.5B-shaped LLM (bf16, as shipped), DINOv2-base and SAM
ViT-B, whose embeddings the precompute job stores in the shards (so no step runs SAM's encoder, as
in a real run). For ``mlp``, ``pool`` (at svp's mean token budget) and ``svp``, each in a process
of its own so that its peak memory is its own: parameters trained and frozen, peak RSS (model built,
data read, steps run), the median train step (forward, backward, AdamW) and the inference latency
of one sample; steps and latency also as ratios to ``mlp``.

Not a part of ``python -m bench`` (it takes ~3 GB per model and minutes of building); results go to
``RESULTS/realsize.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import hub_models
from bench.common import DTYPES, RESULTS, describe_device, save_random_sam, write_json
from bench.tokens import pool_budget
from bench.train_step import Timer, first_batch
from trainer.data import DataConfig
from trainer.model import PROJECTORS, ModelConfig, ProjectorConfig, SegmentationMLLM

NAME = "realsize"
LLMS = {"qwen2.5-0.5b": hub_models.save_qwen2, "llama-3.2-1b": hub_models.save_llama}
VISIONS = {"dinov2-base": hub_models.save_dinov2, "clip-vit-l-14-336": hub_models.save_clip,
           "siglip-base-16-224": hub_models.save_siglip}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.realsize", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/svp-bench-realsize"),
                        help="where the hub directories, data and shards go (kept: a rerun reuses them); "
                             "default /tmp/svp-bench-realsize")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"where realsize.json goes; default {RESULTS}")
    parser.add_argument("--llm", choices=sorted(LLMS), default="qwen2.5-0.5b",
                        help="LLM architecture; default qwen2.5-0.5b")
    parser.add_argument("--vision", choices=sorted(VISIONS), default="dinov2-base",
                        help="vision encoder architecture; default dinov2-base")
    parser.add_argument("--projectors", default=",".join(PROJECTORS), help="comma-separated; default mlp,pool,svp")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per train step; default 2")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (the median is kept); default 3")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="fp32, or bf16 autocast (as --mixed-precision bf16); default fp32")
    parser.add_argument("--images", type=int, default=10, help="synthetic images precomputed; default 10")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one projector, in a child process
    return parser


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """Hub directories, the ViT-B checkpoint and shards with its embeddings (each made once)."""
    from jobs.precompute import main as precompute
    from pipeline.synth import synthesize

    work = args.work
    paths = {"llm": work / args.llm, "vision": work / args.vision, "sam": work / "sam_vit_b.pth",
             "refer": work / "refer", "shards": work / "shards"}
    for key, builders, name in (("llm", LLMS, args.llm), ("vision", VISIONS, args.vision)):
        if not (paths[key] / "config.json").is_file():
            builders[name](paths[key])
    save_random_sam(paths["sam"], "vit_b")
    if not (paths["refer"] / "refcoco").is_dir():
        synthesize(paths["refer"], images=args.images, seed=0)
    if not (paths["shards"] / "manifest.json").is_file():
        code = precompute(["--refer-root", str(paths["refer"]), "--dataset", "refcoco", "--split-by", "unc",
                           "--out", str(paths["shards"]), "--backend", "felzenszwalb", "--shard-size", "4",
                           "--store-sam-embeddings", "--sam-checkpoint", str(paths["sam"]), "--sam-model", "vit_b"])
        if code != 0:
            raise SystemExit(f"bench.realsize: the precompute job failed ({code})")
    return paths


def measure(kind: str, args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    """One projector on the real-size stack (run in a fresh process: RSS is this model's)."""
    started = time.perf_counter()
    config = ModelConfig(llm=str(paths["llm"]), vision=str(paths["vision"]), sam_checkpoint=str(paths["sam"]),
                         sam_model="vit_b",
                         projector=ProjectorConfig(kind=kind, pool_tokens=pool_budget(paths["shards"])))
    model = SegmentationMLLM(config)
    built_s = time.perf_counter() - started
    batch = first_batch(paths["shards"], DataConfig(**model.data_config_fields(), use_sam_embeddings=True),
                        args.batch_size)
    timer = Timer(torch.device("cpu"), DTYPES[args.dtype], args.repeats)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trained
    tokens = float(model.predict_masks(batch)[1].float().mean())
    step_s, latency_s = timer.step(model, batch), timer.latency(model, batch)
    return {"projector": kind, "visual_tokens_mean": tokens, "parameters_trained": trained,
            "parameters_frozen": frozen, "build_s": built_s, "step_s": step_s, "latency_s": latency_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    prepare(args)  # once, before the children that each read it
    rows = {}
    for kind in [k for k in args.projectors.split(",") if k]:
        child = subprocess.run([sys.executable, "-m", "bench.realsize", *argv, "--measure", kind],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"bench.realsize: measuring {kind} failed:\n{child.stderr[-4000:]}")
        rows[kind] = json.loads(child.stdout.strip().splitlines()[-1])
    for row in rows.values():
        for name in ("step_s", "latency_s"):
            if "mlp" in rows:
                row[f"{name}_ratio_to_mlp"] = row[name] / rows["mlp"][name]
    return {"llm": args.llm, "vision": args.vision, "sam": "vit_b", "batch_size": args.batch_size,
            "dtype": args.dtype, "repeats": args.repeats, "device": describe_device("cpu"),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "projectors": rows}


def format_table(results: dict) -> str:
    lines = [f"real size: {results['llm']} + {results['vision']} + SAM {results['sam']} (embeddings stored), "
             f"batch {results['batch_size']}, {results['dtype']}, {results['device']}",
             f"{'projector':<10}{'tokens':>8}{'trained':>14}{'frozen':>15}{'peak RSS':>10}{'step s':>9}"
             f"{'x mlp':>7}{'latency s':>11}{'x mlp':>7}"]
    for kind, row in results["projectors"].items():
        lines.append(f"{kind:<10}{row['visual_tokens_mean']:>8.1f}{row['parameters_trained']:>14,}"
                     f"{row['parameters_frozen']:>15,}{row['peak_rss_gib']:>7.2f}GiB{row['step_s']:>9.2f}"
                     f"{row.get('step_s_ratio_to_mlp', float('nan')):>7.2f}{row['latency_s']:>11.2f}"
                     f"{row.get('latency_s_ratio_to_mlp', float('nan')):>7.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args, prepare(args))))
        return None
    results = run(args, argv)
    write_json(args.results / f"{NAME}.json", results)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
