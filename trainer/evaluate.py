"""Referring-segmentation metrics as the RIS literature reports them, per split.

- cIoU: Σ intersection / Σ union over every (ref, sentence) of the split (large objects weigh more);
- gIoU: the mean of per-sample IoUs;
- visual tokens per image (mean, median, max): what the projector costs the LLM;
- ``all_foreground_ciou``: the cIoU of predicting every pixel, the floor any model must clear.

Masks are compared at the original image resolution.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from trainer.data import DataConfig, DataError, make_loader


def evaluate(model: torch.nn.Module, split_urls: dict[str, list[str]], data_config: DataConfig, *,
             batch_size: int = 8, accelerator: Accelerator | None = None,
             max_samples: int | None = None) -> dict[str, dict]:
    """Evaluate ``model`` on every split of ``split_urls`` ({split name: shard URLs})."""
    model.eval()
    return {split: _evaluate_split(model, urls, data_config, batch_size, accelerator, max_samples)
            for split, urls in split_urls.items()}


@torch.no_grad()
def _evaluate_split(model, urls, data_config, batch_size, accelerator, max_samples) -> dict:
    started = time.perf_counter()
    records: list[dict] = []
    with contextlib.closing(make_loader(urls, data_config, train=False, batch_size=batch_size)) as loader:
        for batch in loader:
            records.extend(_score_batch(model, batch))
            if max_samples is not None and len(records) >= max_samples:
                break
    seconds = time.perf_counter() - started
    if accelerator is not None and accelerator.num_processes > 1:
        records = gather_object(records)
    return summarise(records, seconds)


def _score_batch(model, batch: dict) -> Iterable[dict]:
    logits, tokens = model.predict_masks(batch)
    full = model.mask_head.postprocess(logits, batch["input_sizes"], batch["original_sizes"])
    for i, (prediction, target) in enumerate(zip(full, batch["full_masks"])):
        predicted, target = prediction.squeeze(0) > 0, target.to(prediction.device).bool()
        yield {
            "key": batch["keys"][i],
            "intersection": int((predicted & target).sum()),
            "union": int((predicted | target).sum()),
            "target": int(target.sum()),
            "pixels": int(target.numel()),
            "tokens": int(tokens[i]),
        }


def summarise(records: list[dict], seconds: float) -> dict:
    """Split-level metrics from per-sample records (also used to merge records of several processes)."""
    if not records:
        raise DataError("the split yielded no samples")
    ious = [r["intersection"] / r["union"] if r["union"] else 1.0 for r in records]
    tokens = list({r["key"]: r["tokens"] for r in records}.values())  # per image, not per sentence
    return {
        "samples": len(records),
        "images": len(tokens),
        "ciou": sum(r["intersection"] for r in records) / max(sum(r["union"] for r in records), 1),
        "giou": sum(ious) / len(ious),
        "all_foreground_ciou": sum(r["target"] for r in records) / max(sum(r["pixels"] for r in records), 1),
        "tokens_mean": statistics.fmean(tokens),
        "tokens_median": statistics.median(tokens),
        "tokens_max": max(tokens),
        "samples_per_s": len(records) / max(seconds, 1e-9),
    }


def format_table(results: dict[str, dict], title: str) -> str:
    header = (f"{'split':<22}{'cIoU':>8}{'gIoU':>8}{'all-fg cIoU':>13}{'tokens mean/med/max':>22}"
              f"{'samples':>9}{'samples/s':>11}")
    lines = [title, header]
    for split, r in results.items():
        tokens = f"{r['tokens_mean']:.1f}/{r['tokens_median']:g}/{r['tokens_max']}"
        lines.append(f"{split:<22}{r['ciou']:>8.4f}{r['giou']:>8.4f}{r['all_foreground_ciou']:>13.4f}{tokens:>22}"
                     f"{r['samples']:>9}{r['samples_per_s']:>11.1f}")
    return "\n".join(lines)
