"""Train-step time and inference latency per projector, at two LLM sizes: ``python -m bench.train_step``.

Side by side in one process, on the same LLM, the same batch (the shared synthetic dataset:
felzenszwalb superpixels and SAM embeddings written by the real precompute job) and the same
device and thread count:

- for ``mlp`` (one token per patch), ``pool`` (fixed grid, at svp's mean token budget) and ``svp``
  (one token per superpixel): visual tokens per sample, forward+backward+optimizer step time,
  inference latency (one sample), each also as a ratio to ``mlp``;
- at each LLM size of ``--llm-sizes``: ``tiny`` (the trainer's 2-layer, 64-wide test model) and
  larger Llama-style decoders built from a transformers config with random weights
  (``HIDDENxLAYERS``, see ``bench.common.LlmSize``), saved and loaded as a local model;
- the ``svp`` step with precomputed ``sam.npy`` against the step that runs the SAM encoder
  (``--sam-model``: random weights of that architecture unless ``--sam-checkpoint``), at the
  first LLM size; and the same for each SAM of ``--embedding-sam-models`` (random weights): on a
  CPU the bench's SAM is the 2-block, 32-wide ``tiny``, whose encoder costs little next to the
  rest of a step, so what precomputing saves with a real SAM is measured with ViT-B, the smallest
  (embeddings made by its encoder once, as the precompute job would). The headline
  ``sam_embedding_step_ratio`` is the first real (non-``tiny``) SAM's ratio: the bench's own SAM
  on the gpu preset (ViT-H), ViT-B's on the cpu preset; ``tiny``'s only where nothing else was
  timed. Each ``--embedding-sam-models`` ratio is also under ``sam_embedding_step_ratio_<model>``;
- at the largest LLM size, one pass of ``svp`` training steps over the train split batched in
  arrival order against length-grouped batches (``--length-group``): the share of the
  visual-token and word positions that are padding, and the time of the pass;
- the training loader alone (decode, preprocessing, collate; no DataLoader workers, as the trainer's
  default) in samples/s against the samples/s of the ``svp`` step it feeds at the largest size.

``--dtype bf16`` runs steps and latency under bf16 autocast with the LLM stored in bf16, as a
bf16 training run does (its frozen base in bf16, the trained parts in fp32 under autocast).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import (
    DTYPES,
    LlmSize,
    Workspace,
    median_seconds,
    run_alone,
    save_random_sam,
    speed_sam_checkpoint,
    synchronize,
)
from bench.options import option_of
from bench.tokens import pool_budget
from pipeline.shards import read_manifest, split_shard_urls
from trainer.config import TrainConfig
from trainer.data import DataConfig, item_length, make_loader
from trainer.model import PROJECTORS, ModelConfig, ProjectorConfig, SegmentationMLLM

NAME = "train_step"
PRESETS: dict[str, dict] = {
    "cpu": {},
    "full": {"repeats": 5, "embedding_batch_size": 2, "embedding_repeats": 2},
    "quick": {"step_batch_size": 2, "repeats": 1, "llm_sizes": "tiny,64x2", "loader_batches": 2,
              "embedding_sam_models": "tiny"},
    "gpu": {"step_batch_size": 16, "repeats": 10, "llm_sizes": "tiny,1536x24", "embedding_sam_models": ""},
}


@dataclass(frozen=True)
class TrainStepOptions:
    """train_step: step time and latency per projector."""

    step_batch_size: int = field(default=8, metadata={"help": "training batch of the step"})
    repeats: int = field(default=3, metadata={"help": (
        "timed repetitions per measurement, their median reported (the full preset: 5)")})
    vision_size: int = field(default=224, metadata={"help": "vision input in px (224: 16x16 patches)"})
    llm_sizes: str = field(default="tiny,768x12", metadata={"help": (
        "comma-separated LLM sizes, 'tiny' or HIDDENxLAYERS (random Llama-style decoder); 768x12 has 85M "
        "parameters: about a minute on 2 CPU cores; 1536x24, 0.7B, for the gpu preset")})
    length_group: int = option_of(TrainConfig, "length_group", TrainConfig.length_group)  # a run's grouping
    loader_batches: int = field(default=20, metadata={"help": "batches the loader throughput is measured over"})
    embedding_sam_models: str = field(default="vit_b", metadata={"help": (
        "comma-separated SAMs (random weights) whose svp step with stored embeddings is also timed against the "
        "step that runs their encoder, at the tiny LLM (the gpu preset's --sam-model is vit_h already: none); "
        "'' for none")})
    embedding_batch_size: int = field(default=1, metadata={"help": (
        "batch of those steps (the full preset: 2; ViT-B's encoder takes ~20 s per image on 2 CPU cores)")})
    embedding_repeats: int = field(default=1, metadata={"help": (
        "timed repetitions of those steps, after one warm-up (the full preset: 2)")})


OPTIONS = (TrainStepOptions,)


def first_batch(shards: Path, data_config: DataConfig, batch_size: int) -> dict:
    """The first training batch of the train split: one sentence of each of ``batch_size`` images,
    as training draws them."""
    urls = split_shard_urls(shards, read_manifest(shards), "train")
    return next(iter(make_loader(urls, data_config, train=True, resampled=False, batch_size=batch_size)))


def without_embeddings(data_config: DataConfig) -> DataConfig:
    """The same loader, giving SAM pixels (for the step to encode) instead of stored embeddings."""
    return DataConfig(**{**vars(data_config), "use_sam_embeddings": False})


def batches(shards: Path, data_config: DataConfig, batch_size: int) -> tuple[dict, dict]:
    """A training batch with SAM embeddings, and the same batch with SAM pixels instead."""
    with_embeddings = first_batch(shards, data_config, batch_size)
    return with_embeddings, first_batch(shards, without_embeddings(data_config), batch_size)


def train_pass(urls: list[str], data_config: DataConfig, batch_size: int, length_group: int) -> list[dict]:
    """The batches of one training pass over ``urls`` (as the trainer's loader cuts them)."""
    config = DataConfig(**{**vars(data_config), "length_group": length_group})
    return list(make_loader(urls, config, train=True, resampled=False, batch_size=batch_size))


def padding_fraction(batches: list[dict]) -> float:
    """Share of the batches' padded LLM positions (visual tokens and words) that are padding."""
    used = padded = 0
    for batch in batches:
        lengths = [item_length({"num_superpixels": n, "sentence": sentence})
                   for n, sentence in zip(batch["num_superpixels"].tolist(), batch["sentences"])]
        used, padded = used + sum(lengths), padded + len(lengths) * max(lengths)
    return 1 - used / padded


def loader_samples_per_s(urls: list[str], data_config: DataConfig, batch_size: int, batches: int) -> float:
    """Samples/s of the training loader alone, after one warm-up batch (the first opens the shards)."""
    stream = iter(make_loader(urls, data_config, train=True, batch_size=batch_size))
    next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - started)


class Timer:
    """Step and latency of one model on one device, under autocast when asked."""

    def __init__(self, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
        self.device, self.dtype, self.repeats = device, dtype, repeats

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _stepper(self, model: SegmentationMLLM) -> Callable[[dict], None]:
        """One forward+backward+optimizer step of ``model`` (in train mode) on a batch."""
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step(batch: dict) -> None:
            with self.autocast():
                loss = model(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    def step(self, model: SegmentationMLLM, batch: dict) -> float:
        step = self._stepper(model)
        return median_seconds(lambda: step(batch), self.repeats, self.device)

    def one_pass(self, model: SegmentationMLLM, batches: list[dict]) -> float:
        """Seconds of one step on each batch in turn, after one warm-up step."""
        step = self._stepper(model)
        step(batches[0])
        synchronize(self.device)
        started = time.perf_counter()
        for batch in batches:
            step(batch)
        synchronize(self.device)
        return time.perf_counter() - started

    def latency(self, model: SegmentationMLLM, batch: dict) -> float:
        one = {k: v[:1] for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
        model.eval()

        def predict() -> None:
            with self.autocast():
                model.predict_masks(one)

        return median_seconds(predict, self.repeats, self.device)


def prefix_sharing(model: SegmentationMLLM, batch: dict, timer: Timer) -> dict:
    """The step with the prompt's opening run once per batch against the batch run whole, and which
    of the two the model's rule (``SegmentationMLLM.min_shared_positions``) picks for this batch."""
    default = model.min_shared_positions
    calls: list[tuple[int, ...]] = []
    hook = model.causal_lm().get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: calls.append(tuple(kwargs["inputs_embeds"].shape)), with_kwargs=True)
    try:
        model.train()
        picked_shared = len(decoder_calls(model, batch, timer, calls)) == 2  # the prefix's and the rest's
        model.min_shared_positions = 1
        forced = decoder_calls(model, batch, timer, calls)
        positions = forced[0][1] if len(forced) == 2 else 0  # the prefix call's length
        shared_s = timer.step(model, batch)
        model.min_shared_positions = sys.maxsize
        whole_s = timer.step(model, batch)
    finally:
        model.min_shared_positions = default
        hook.remove()
    samples = len(batch["sentences"])
    return {"shared_positions": positions, "positions_saved": (samples - 1) * positions,
            "step_shared_s": shared_s, "step_whole_s": whole_s, "shared_to_whole": shared_s / whole_s,
            "default": "shared" if picked_shared else "whole"}


def decoder_calls(model: SegmentationMLLM, batch: dict, timer: Timer,
                  calls: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The input shapes of the LLM decoder's calls in one training forward (``calls``: where a hook
    appends them)."""
    calls.clear()
    with timer.autocast():
        model(batch)
    return list(calls)


def measure_passes(model: SegmentationMLLM, args: argparse.Namespace, shards: Path, timer: Timer) -> dict:
    """One svp training pass batched in arrival order vs length-grouped, and the loader's samples/s."""
    data_config = DataConfig(**model.data_config_fields())
    urls = split_shard_urls(shards, read_manifest(shards), "train")
    passes = {}
    for name, group in (("arrival_order", 1), ("length_grouped", args.length_group)):
        batches = train_pass(urls, data_config, args.step_batch_size, group)
        passes[name] = {"length_group": group, "batches": len(batches), "pass_s": timer.one_pass(model, batches),
                        "padding_fraction": padding_fraction(batches)}
    return {"passes": passes,
            "length_grouped_pass_ratio": passes["length_grouped"]["pass_s"] / passes["arrival_order"]["pass_s"],
            "loader_samples_per_s": loader_samples_per_s(urls, data_config, args.step_batch_size, args.loader_batches)}


def measure_size(size: LlmSize, args: argparse.Namespace, workspace: Workspace, timer: Timer,
                 with_sam_encoder: bool, with_passes: bool) -> dict:
    """Every projector on one LLM size; with ``with_sam_encoder`` also the svp step that runs SAM's
    encoder, with ``with_passes`` the svp passes and the loader (:func:`measure_passes`)."""
    shards, sam = workspace.shards(), speed_sam_checkpoint(args, workspace)
    llm = size.materialise(workspace.root, timer.dtype)
    rows, result, data = {}, {}, None
    for kind in PROJECTORS:
        config = ModelConfig(llm=llm, vision_size=args.vision_size, sam_checkpoint=str(sam), sam_model=args.sam_model,
                             projector=ProjectorConfig(kind=kind, pool_tokens=pool_budget(shards)))
        model = SegmentationMLLM(config).to(timer.device)
        data = data or batches(shards, DataConfig(**model.data_config_fields()), args.step_batch_size)
        with_embeddings, with_pixels = data
        rows[kind] = {"tokens_mean": float(model.predict_masks(with_embeddings)[1].float().mean()),
                      "step_s": timer.step(model, with_embeddings), "latency_s": timer.latency(model, with_embeddings)}
        if kind == "svp" and with_sam_encoder:
            result["svp_step_with_sam_encoder_s"] = timer.step(model, with_pixels)
            result["svp_step_with_sam_embeddings_s"] = rows[kind]["step_s"]
        if kind == "svp":
            result["svp_prefix_sharing"] = prefix_sharing(model, with_embeddings, timer)
        if kind == "svp" and with_passes:
            result["svp_training"] = measure_passes(model, args, shards, timer)
            result["svp_training"]["step_samples_per_s"] = args.step_batch_size / rows[kind]["step_s"]
        result["llm_parameters"] = sum(p.numel() for p in model.llm.parameters())
        del model
    for row in rows.values():
        for name in ("tokens_mean", "step_s", "latency_s"):
            row[f"{name}_ratio_to_mlp"] = row[name] / rows["mlp"][name]
    return {**result, "projectors": rows}


def measure_embedding_step(sam_model: str, args: argparse.Namespace, workspace: Workspace, timer: Timer) -> dict:
    """The svp step (tiny LLM) with stored SAM embeddings vs the step that runs the encoder of a
    random-weight SAM of ``sam_model``; the embeddings come from that encoder, once."""
    sam = save_random_sam(workspace.root / f"sam_{sam_model}_random.pth", sam_model)
    config = ModelConfig(llm=LlmSize("tiny").materialise(workspace.root, timer.dtype), vision_size=args.vision_size,
                         sam_checkpoint=str(sam), sam_model=sam_model, projector=ProjectorConfig(kind="svp"))
    model = SegmentationMLLM(config).to(timer.device)
    with_pixels = first_batch(workspace.shards(), without_embeddings(DataConfig(**model.data_config_fields())),
                              args.embedding_batch_size)
    with torch.no_grad(), timer.autocast():
        embeddings = model.mask_head.image_embeddings(with_pixels["sam_pixels"].to(timer.device)).float()
    with_embeddings = {**{k: v for k, v in with_pixels.items() if k != "sam_pixels"}, "sam_embeddings": embeddings}
    timer = Timer(timer.device, timer.dtype, args.embedding_repeats)
    with_encoder_s, with_embeddings_s = timer.step(model, with_pixels), timer.step(model, with_embeddings)
    return {"batch_size": args.embedding_batch_size, "step_with_sam_encoder_s": with_encoder_s,
            "step_with_sam_embeddings_s": with_embeddings_s, "ratio": with_embeddings_s / with_encoder_s}


def run(args: argparse.Namespace, workspace: Workspace) -> dict:
    timer = Timer(torch.device(args.device), DTYPES[args.dtype], args.repeats)
    names = [name for name in args.llm_sizes.split(",") if name]
    sizes = {name: measure_size(LlmSize(name), args, workspace, timer, with_sam_encoder=i == 0,
                                with_passes=i == len(names) - 1)
             for i, name in enumerate(names)}
    last = sizes[names[-1]]["projectors"]
    training = sizes[names[-1]]["svp_training"]
    embedding_steps = {name: measure_embedding_step(name, args, workspace, timer)
                       for name in args.embedding_sam_models.split(",") if name}
    timed = [(args.sam_model, embedding_step_ratio(sizes[names[0]])),
             *((name, row["ratio"]) for name, row in embedding_steps.items())]
    headline_sam, headline_ratio = headline_embedding_step(timed)
    return {
        "batch_size": args.step_batch_size, "vision_size": args.vision_size, "dtype": args.dtype,
        "sam_model": args.sam_model, "sizes": sizes, "embedding_steps": embedding_steps,
        "sam_embedding_step_ratio_sam": headline_sam,
        "headline": {"train_step_ratio_svp_to_mlp": last["svp"]["step_s_ratio_to_mlp"],
                     "infer_latency_ratio_svp_to_mlp": last["svp"]["latency_s_ratio_to_mlp"],
                     "sam_embedding_step_ratio": headline_ratio,
                     "length_grouped_pass_ratio": training["length_grouped_pass_ratio"],
                     "loader_to_step_samples_ratio": training["loader_samples_per_s"] / training["step_samples_per_s"],
                     **{f"sam_embedding_step_ratio_{name}": row["ratio"] for name, row in embedding_steps.items()}},
    }


def headline_embedding_step(timed: Sequence[tuple[str, float]]) -> tuple[str, float]:
    """The first real (non-``tiny``) SAM's (model, sam.npy step ratio) of ``timed``: the claim is
    about SAM's encoder, which the tiny stand-in answers only when no real SAM was timed."""
    return next((row for row in timed if row[0] != "tiny"), timed[0])


def embedding_step_ratio(size: dict) -> float:
    """The svp step with stored embeddings over the step that runs the bench's SAM encoder."""
    return size["svp_step_with_sam_embeddings_s"] / size["svp_step_with_sam_encoder_s"]


def format_table(results: dict) -> str:
    lines = [f"train step and latency, batch {results['batch_size']}, vision {results['vision_size']} px, "
             f"{results['dtype']}, SAM {results['sam_model']}, {results['device']}; ratios are to mlp"]
    for name, size in results["sizes"].items():
        lines += [f"LLM {name} ({size['llm_parameters'] / 1e6:.1f}M parameters)",
                  f"{'projector':<10}{'tokens':>8}{'ratio':>8}{'step s':>9}{'ratio':>8}{'latency s':>11}{'ratio':>8}"]
        for kind, r in size["projectors"].items():
            lines.append(f"{kind:<10}{r['tokens_mean']:>8.1f}{r['tokens_mean_ratio_to_mlp']:>8.3f}{r['step_s']:>9.3f}"
                         f"{r['step_s_ratio_to_mlp']:>8.3f}{r['latency_s']:>11.4f}{r['latency_s_ratio_to_mlp']:>8.3f}")
        if "svp_step_with_sam_encoder_s" in size:
            lines.append(f"svp step with precomputed sam.npy {size['svp_step_with_sam_embeddings_s']:.3f} s vs running "
                         f"the SAM encoder {size['svp_step_with_sam_encoder_s']:.3f} s: "
                         f"ratio {embedding_step_ratio(size):.3f}")
        if "svp_prefix_sharing" in size:
            lines.append(f"svp step: {format_prefix_sharing(size['svp_prefix_sharing'])}")
        if "svp_training" in size:
            training = size["svp_training"]
            for name, row in training["passes"].items():
                lines.append(f"svp pass, {name} (length group {row['length_group']}): {row['batches']} batches "
                             f"in {row['pass_s']:.2f} s, {row['padding_fraction']:.1%} of visual-token and word "
                             "positions padding")
            lines.append(f"length-grouped pass / arrival-order pass: {training['length_grouped_pass_ratio']:.3f}")
            lines.append(f"loader {training['loader_samples_per_s']:.1f} samples/s vs svp step "
                         f"{training['step_samples_per_s']:.1f} samples/s: ratio "
                         f"{results['headline']['loader_to_step_samples_ratio']:.2f} (above 1: the loader keeps up)")
    for sam_model, row in results["embedding_steps"].items():
        lines.append(f"SAM {sam_model} (random weights), LLM tiny, batch {row['batch_size']}: svp step with stored "
                     f"embeddings {row['step_with_sam_embeddings_s']:.3f} s vs running its encoder "
                     f"{row['step_with_sam_encoder_s']:.3f} s: ratio {row['ratio']:.3f}")
    lines.append(f"headline sam_embedding_step_ratio: SAM {results['sam_embedding_step_ratio_sam']}'s "
                 f"({results['headline']['sam_embedding_step_ratio']:.3f}; a real SAM's where one was timed)")
    return "\n".join(lines)


def format_prefix_sharing(row: dict) -> str:
    return (f"the prompt's opening ({row['shared_positions']} positions, {row['positions_saved']} saved) run once "
            f"{row['step_shared_s']:.3f} s vs the batch whole {row['step_whole_s']:.3f} s: ratio "
            f"{row['shared_to_whole']:.3f}; the default runs it {row['default']}")


def main(argv: Sequence[str] | None = None) -> dict:
    return run_alone(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
