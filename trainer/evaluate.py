"""Referring-segmentation metrics as the RIS literature reports them, per split.

- cIoU: Σ intersection / Σ union over every (ref, sentence) of the split (large objects weigh more);
- gIoU: the mean of per-sample IoUs;
- visual tokens per image (mean, median, max): what the projector costs the LLM;
- ``all_foreground_ciou``: the cIoU of predicting every pixel, the floor any model must clear;
- ``referred_share``: of the predicted pixels on any referred object of the image, the share on the
  one meant (:func:`referred_share`): whether the model picks the right object, apart from how
  well it outlines it.

Masks are compared at the original image resolution.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from pipeline.shards import source_shard_urls, split_shard_urls
from trainer.data import DataConfig, DataError, make_loader

# The order the RIS papers print their columns in.
DATASET_ORDER = ("refcoco", "refcoco+", "refcocog")
SPLIT_ORDER = ("val", "test", "testA", "testB", "testC")


@dataclass(frozen=True)
class EvalSplit:
    """What one column of the evaluation reads: the shards holding the split's images, and the
    (dataset, split) whose refs are scored where those shards also hold other datasets' refs."""

    urls: list[str]
    source: str | None = None  # ``refcocog/val`` in an output of several datasets; None: every ref read


def evaluation_splits(root: str, manifest: dict, names: Sequence[str] | None = None) -> dict[str, EvalSplit]:
    """{name: what to read} for ``names`` of the precompute output at ``root``, or by default for every
    (dataset, split) but the training ones, in the order the papers print them. An output of one
    dataset names its splits as REFER spells them (``val``, ``testA``); one of several names each
    (dataset, split) (``refcoco/val``, ``refcocog/test``)."""
    several = "," in str(manifest.get("config", {}).get("dataset", ""))
    if names is None:  # what the shards hold, whatever else the manifest counts
        present = {source for shard in manifest["shards"] for source in shard.get("sources", [shard["split"]])}
        if not several:
            present = [name.rsplit("/", 1)[-1] for name in present]
        names = sorted((n for n in present if n.rsplit("/", 1)[-1] != "train"), key=_paper_order)
    return {name: EvalSplit(source_shard_urls(root, manifest, name) if "sources" in manifest
                            else split_shard_urls(root, manifest, name), name if several else None)
            for name in names}


def _paper_order(name: str) -> tuple[int, int, str]:
    dataset, _, split = name.rpartition("/")
    return _rank(DATASET_ORDER, dataset), _rank(SPLIT_ORDER, split), name


def _rank(order: Sequence[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def evaluate(model: torch.nn.Module, splits: dict[str, EvalSplit], data_config: DataConfig, *,
             batch_size: int = 8, max_samples: int | None = None) -> dict[str, dict]:
    """Evaluate ``model`` on every split of ``splits`` (:func:`evaluation_splits`).

    Under ``torchrun``/``accelerate launch`` each process reads its own shards (the loader splits
    them by rank) and the per-sample records of all processes are gathered before they are summed,
    so N processes report the same cIoU and gIoU as one; ``max_samples`` then counts per process."""
    model.eval()
    return {name: _evaluate_split(model, split, data_config, batch_size, max_samples)
            for name, split in splits.items()}


@torch.no_grad()
def _evaluate_split(model, split: EvalSplit, data_config, batch_size, max_samples) -> dict:
    started = time.perf_counter()
    records: list[dict] = []
    sources = [split.source] if split.source is not None else None
    with contextlib.closing(make_loader(split.urls, data_config, train=False, batch_size=batch_size,
                                        sources=sources)) as loader:
        for batch in loader:
            records.extend(_score_batch(model, batch))
            if max_samples is not None and len(records) >= max_samples:
                break
    seconds = time.perf_counter() - started
    if PartialState().num_processes > 1:
        records = gather_object(records)
    return summarise(records, seconds)


def _score_batch(model, batch: dict) -> Iterable[dict]:
    logits, tokens = model.predict_masks(batch)
    full = model.mask_head.postprocess(logits, batch["input_sizes"], batch["original_sizes"])
    others = batch.get("other_objects", [None] * len(full))
    for i, (prediction, target, other) in enumerate(zip(full, batch["full_masks"], others, strict=True)):
        predicted, target = prediction.squeeze(0) > 0, target.to(prediction.device).bool()
        record = {
            "key": batch["keys"][i],
            "intersection": int((predicted & target).sum()),
            "union": int((predicted | target).sum()),
            "target": int(target.sum()),
            "pixels": int(target.numel()),
            "tokens": int(tokens[i]),
        }
        if other is not None:
            record["on_other_objects"] = int((predicted & other.to(prediction.device)).sum())
        yield record


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
        "giou": math.fsum(ious) / len(ious),  # fsum: exact, so the order records were gathered in cannot matter
        "all_foreground_ciou": sum(r["target"] for r in records) / max(sum(r["pixels"] for r in records), 1),
        "tokens_mean": statistics.fmean(tokens),
        "tokens_median": statistics.median(tokens),
        "tokens_max": max(tokens),
        "samples_per_s": len(records) / max(seconds, 1e-9),
        **referred_share(records),
    }


def referred_share(records: list[dict]) -> dict[str, float]:
    """``{"referred_share": ...}``: of the predicted pixels that lie on a referred object of the image,
    the share on the one the sentence means (1: never the wrong object; 0.5: as much on the others,
    e.g. both of two twins). cIoU mixes picking the object with outlining it; this is the first
    alone. Empty when the records do not count the other objects; None when no prediction touched one."""
    if not records or any("on_other_objects" not in r for r in records):
        return {}
    on_referred = sum(r["intersection"] for r in records)
    on_objects = on_referred + sum(r["on_other_objects"] for r in records)
    return {"referred_share": on_referred / on_objects if on_objects else None}


def format_table(results: dict[str, dict], title: str) -> str:
    header = (f"{'split':<22}{'cIoU':>8}{'gIoU':>8}{'all-fg cIoU':>13}{'tokens mean/med/max':>22}"
              f"{'samples':>9}{'samples/s':>11}")
    lines = [title, header]
    for split, r in results.items():
        tokens = f"{r['tokens_mean']:.1f}/{r['tokens_median']:g}/{r['tokens_max']}"
        lines.append(f"{split:<22}{r['ciou']:>8.4f}{r['giou']:>8.4f}{r['all_foreground_ciou']:>13.4f}{tokens:>22}"
                     f"{r['samples']:>9}{r['samples_per_s']:>11.1f}")
    return "\n".join(lines)


def paper_rows(reports: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of ``svp eval`` reports laid out as the RIS papers do: a row per run, then
    cIoU for every split, then gIoU for every split, and the run's visual tokens per image (the
    mean over the splits' images). Every report must hold the same splits."""
    splits = list(reports[0]["splits"])
    header = ["run", "projector", *(f"cIoU {s}" for s in splits), *(f"gIoU {s}" for s in splits), "tokens/image"]
    rows = []
    for report in reports:
        results = [report["splits"][split] for split in splits]
        images = sum(r["images"] for r in results)
        tokens = sum(r["tokens_mean"] * r["images"] for r in results) / max(images, 1)
        rows.append([report["run"], report["projector"], *(f"{100 * r['ciou']:.1f}" for r in results),
                     *(f"{100 * r['giou']:.1f}" for r in results), f"{tokens:.1f}"])
    return header, rows


def paper_csv(reports: Sequence[dict]) -> str:
    """:func:`paper_rows` as CSV (IoUs in percent, as the papers print them)."""
    header, rows = paper_rows(reports)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    return text.getvalue()


def paper_markdown(reports: Sequence[dict]) -> str:
    """:func:`paper_rows` as a Markdown table, ready for a README or a paper draft."""
    header, rows = paper_rows(reports)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def paper_table(reports: Sequence[dict]) -> str:
    """:func:`paper_rows` aligned for a terminal."""
    header, rows = paper_rows(reports)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                                enumerate(zip(line, widths))) for line in [header, *rows])
