"""Look at a precompute output before training on it: pictures and numbers a person can check.

A shard directory is bytes a user cannot eyeball; a wrong backend setting (superpixels far too
many or too few), masks in the wrong frame or a stage that fails for half the images would only
show up hours later as a poor cIoU. This module reads an output (a local directory or any fsspec
URL, as :mod:`pipeline.storage` does) and draws what matters:

- ``contact_sheet.png``: sampled images with their superpixel boundaries and one ref's mask
  outlined, captioned with that ref's sentence;
- ``superpixels_hist.png``: superpixels per image, for every written image (from ``index.parquet``);
- ``area_hist.png``: superpixel areas as a fraction of their image (from the sampled label maps);
- ``summary.txt``: per-split counts, failures by stage, superpixel statistics, backend and config;
- optionally ``inspect.html``: the same, in one self-contained page (images as data URIs).

Sampling is deterministic for a seed, spread over the splits, and reads only the shards that hold
the sampled keys (``index.parquet`` says which). Nothing here depends on the backend that wrote
the output: only the shard format of :mod:`pipeline.shards` is read.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
import statistics
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from matplotlib.ticker import MaxNLocator
from PIL import Image
from skimage.morphology import diamond, erosion
from skimage.segmentation import find_boundaries
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.errors import SvpError
from pipeline.images import decode_image
from pipeline.plotting import pyplot, save_figure
from pipeline.refer import ref_mask
from pipeline.shards import ManifestError, decode_label_map, read_manifest
from pipeline.storage import OutputStore, open_url

BOUNDARY_COLOUR = (255, 230, 0)  # superpixel boundaries: yellow
REF_COLOUR = (255, 0, 200)  # the outlined ref's mask: magenta, drawn over the boundaries
REF_OUTLINE_PX = 2
TILE_SIDE = 320  # larger images are scaled down to this longest side before drawing (lines stay visible)
SHEET_COLUMNS = 4
READ_MEMBERS = ("jpg", "spx.png", "refs.json")  # sam.npy (megabytes per sample) is never kept
PICTURES = ("contact_sheet.png", "superpixels_hist.png", "area_hist.png")


class InspectError(SvpError, ValueError):
    """The output cannot be inspected as asked (no written samples, an unknown split, ...)."""


@dataclass(frozen=True)
class Output:
    """What a precompute output says about itself, without opening a shard."""

    root: str
    manifest: dict
    rows: list[dict]  # index.parquet, one row per processed input image
    failures: list[dict]  # failures.jsonl


@dataclass(frozen=True)
class InspectedSample:
    """One sampled image as the trainer would see it, with the ref chosen to outline."""

    key: str
    split: str
    rgb: np.ndarray  # H×W×3 uint8, displayed frame
    labels: np.ndarray  # H×W uint16 superpixel label map
    mask: np.ndarray | None  # H×W 0/1 mask of the chosen ref; None if the image has no ref
    sentence: str


@dataclass
class InspectReport:
    """What one ``svp inspect`` wrote: the numbers, their text, the files by name and the samples drawn
    (kept so that a caller or test can check the pictures against the data behind them)."""

    summary: dict
    text: str
    files: dict[str, Path] = field(default_factory=dict)
    samples: list[InspectedSample] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading


def read_output(root: str | Path) -> Output:
    """The manifest, index and failures of an output; a clear error if it is not one."""
    manifest = read_manifest(root)
    store = OutputStore(root)
    try:
        index = pq.read_table(io.BytesIO(store.read_bytes("index.parquet"))).to_pylist()
    except FileNotFoundError:
        raise ManifestError(f"{store.url_of('index.parquet')} not found: was the precompute job interrupted "
                            f"before its end? Rerun it with the same options to rebuild it") from None
    try:
        lines = store.read_bytes("failures.jsonl").decode().splitlines()
    except FileNotFoundError:
        lines = []
    return Output(root=str(root).rstrip("/"), manifest=manifest, rows=index,
                  failures=[json.loads(line) for line in lines if line.strip()])


def choose_rows(rows: list[dict], count: int, seed: int, split: str | None = None) -> list[dict]:
    """``count`` written images, the same ones for the same seed, taken in turn from each split
    (so a small split is not drowned by train), in a random order within each split."""
    written: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "written":
            written[row["split"]].append(row)
    if split is not None:
        if split not in written:
            raise InspectError(f"split {split!r} has no written samples; splits with samples: "
                               f"{', '.join(sorted(written)) or 'none'}")
        written = {split: written[split]}
    if not written:
        raise InspectError("the output has no written samples to draw")
    rng = random.Random(seed)
    queues = []
    for name in sorted(written):
        queue = sorted(written[name], key=lambda row: row["key"])
        rng.shuffle(queue)
        queues.append(queue)
    chosen: list[dict] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen


def read_samples(root: str | Path, rows: list[dict], seed: int) -> list[InspectedSample]:
    """Decode the samples of ``rows`` in their order, opening each shard that holds one once."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        wanted[row["shard"]].add(row["key"])
    found: dict[str, dict] = {}
    for shard, keys in sorted(wanted.items()):
        url = f"{str(root).rstrip('/')}/{shard}"
        try:
            with open_url(url) as stream:
                members = tar_file_expander([{"stream": stream, "url": url}],
                                            select_files=lambda name: name.split(".", 1)[-1] in READ_MEMBERS)
                for sample in group_by_keys(members):
                    if sample["__key__"] in keys:
                        found[sample["__key__"]] = sample
                        if keys <= found.keys():
                            break
        except FileNotFoundError:
            raise InspectError(f"{url} not found, though index.parquet places samples there: was OUT "
                               f"copied in part? Rerun the precompute job into it to rewrite the shard") from None
        missing = sorted(keys - found.keys())
        if missing:
            raise InspectError(f"{url} lacks samples that index.parquet places there: {', '.join(missing)}")
    return [_decode(found[row["key"]], row, seed) for row in rows]


def _decode(sample: dict, row: dict, seed: int) -> InspectedSample:
    rgb = decode_image(sample["jpg"]).rgb
    labels = decode_label_map(sample["spx.png"])
    refs = json.loads(sample["refs.json"])
    mask, sentence = None, ""
    if refs:
        rng = random.Random(f"{seed}:{row['key']}")  # the same ref for the same seed, whatever else is sampled
        ref = rng.choice(refs)
        mask = ref_mask(ref["segmentation"], *labels.shape)
        sentence = rng.choice(ref["sentences"])["sent"] if ref["sentences"] else ""
    return InspectedSample(key=row["key"], split=row["split"], rgb=rgb, labels=labels, mask=mask, sentence=sentence)


# ---------------------------------------------------------------------------------------------
# Numbers


def summarise(output: Output) -> dict:
    """Counts per split, failures by stage and superpixel statistics, from the index and manifest."""
    manifest = output.manifest
    splits: dict[str, dict] = {}
    for row in output.rows:
        entry = splits.setdefault(row["split"], {"written": 0, "failed": 0, "shards": 0, "samples": 0})
        entry[row["status"]] += 1
    for shard in manifest["shards"]:
        entry = splits.setdefault(shard["split"], {"written": 0, "failed": 0, "shards": 0, "samples": 0})
        entry["shards"] += 1
        entry["samples"] += shard["samples"]
    stages: dict[str, dict] = {}
    for failure in output.failures:
        example = f"{failure['file_name']}: {failure['error']}"
        stage = stages.setdefault(failure["stage"], {"count": 0, "example": example})
        stage["count"] += 1
    counts = [row["num_superpixels"] for row in output.rows if row["status"] == "written"]
    return {
        "root": output.root,
        "backend": manifest["config"].get("backend"),
        "config_hash": manifest["config_hash"],
        "stored": _stored(manifest["config"]),
        "images": {name: manifest[f"images_{name}"] for name in ("total", "written", "failed", "pending")},
        "splits": dict(sorted(splits.items())),
        "failures_by_stage": dict(sorted(stages.items(), key=lambda item: -item[1]["count"])),
        "superpixels_per_image": _statistics(counts),
    }


def _stored(config: dict) -> list[str]:
    """The frozen encoders' outputs the samples hold, and whose they are."""
    stored = []
    if config.get("store_sam_embeddings"):
        stored.append(f"sam.npy (SAM {config['sam']['model_type']})")
    if "vision" in config:
        vision = config["vision"]
        stored.append(f"vision.npy ({vision['model']} at {vision['size']} px)")
    return stored


def _statistics(values: list[int]) -> dict:
    if not values:
        return {"images": 0}
    return {"images": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "p95": float(np.percentile(values, 95)), "min": min(values), "max": max(values)}


def format_summary(summary: dict) -> str:
    """The summary as one screen of text (what ``svp inspect`` prints and ``summary.txt`` holds)."""
    images = summary["images"]
    lines = [f"{summary['root']}: backend {summary['backend']}, config {summary['config_hash']}",
             f"images: {images['written']} written, {images['failed']} failed, {images['pending']} pending "
             f"(of {images['total']})", f"stored features: {', '.join(summary['stored']) or 'none'}", "",
             f"{'split':<12}{'written':>9}{'failed':>8}{'shards':>8}{'samples':>9}"]
    for split, entry in summary["splits"].items():
        lines.append(f"{split:<12}{entry['written']:>9}{entry['failed']:>8}{entry['shards']:>8}{entry['samples']:>9}")
    spx = summary["superpixels_per_image"]
    lines.append("")
    if spx["images"]:
        lines.append(f"superpixels per image: mean {spx['mean']:.1f}, median {spx['median']:g}, p95 {spx['p95']:.1f}, "
                     f"min {spx['min']}, max {spx['max']} ({spx['images']} images)")
    lines.append("failures by stage:" if summary["failures_by_stage"] else "failures: none")
    for stage, entry in summary["failures_by_stage"].items():
        example = textwrap.shorten(entry["example"], width=100, placeholder="...")
        lines.append(f"  {stage:<12}{entry['count']:>6}  e.g. {example}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Pictures


def ref_outline(mask: np.ndarray) -> np.ndarray:
    """The mask's border, drawn inside it: the mask pixels within :data:`REF_OUTLINE_PX` steps
    (4-connected) of a pixel outside it. Inside, so that the outline shows the mask's true extent;
    wider than one pixel, so that it stays visible next to the superpixel boundaries."""
    inside = mask != 0
    return inside & ~erosion(inside, diamond(REF_OUTLINE_PX))


def draw_tile(rgb: np.ndarray, labels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image with every superpixel boundary in :data:`BOUNDARY_COLOUR` and the ref's outline
    in :data:`REF_COLOUR` on top; every other pixel is the image's own."""
    if labels.shape != rgb.shape[:2] or (mask is not None and mask.shape != labels.shape):
        raise ValueError(f"image {rgb.shape[:2]}, label map {labels.shape} and mask "
                         f"{None if mask is None else mask.shape} must have the same size")
    tile = rgb.copy()
    tile[find_boundaries(labels, mode="thick")] = BOUNDARY_COLOUR
    if mask is not None:
        tile[ref_outline(mask)] = REF_COLOUR
    return tile


def _fit(sample: InspectedSample, side: int = TILE_SIDE) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scale a large sample down before drawing, so one-pixel lines survive in the sheet (labels
    and mask by nearest neighbour: they are ids, not intensities)."""
    height, width = sample.labels.shape
    scale = side / max(height, width)
    if scale >= 1:
        return sample.rgb, sample.labels, sample.mask
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = np.asarray(Image.fromarray(sample.rgb).resize(size, Image.Resampling.BILINEAR))
    labels = np.asarray(Image.fromarray(sample.labels).resize(size, Image.Resampling.NEAREST))
    mask = sample.mask
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return rgb, labels, mask


def contact_sheet(samples: list[InspectedSample], path: Path) -> Path:
    """A grid of drawn tiles, each captioned with its sentence, key, split and superpixel count."""
    plt = pyplot()
    columns = min(SHEET_COLUMNS, len(samples))
    rows = -(-len(samples) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, sample in zip(axes.flat, samples):
        axis.imshow(draw_tile(*_fit(sample)), interpolation="nearest")
        axis.set_title("\n".join(textwrap.wrap(f"“{sample.sentence}”", 38)[:2]), fontsize=8)
        axis.text(0.5, -0.04, f"{sample.key} ({sample.split}), {len(np.unique(sample.labels))} superpixels",
                  transform=axis.transAxes, ha="center", va="top", fontsize=7)
    figure.suptitle("superpixel boundaries (yellow), one ref's mask (magenta) and its sentence", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def superpixels_histogram(rows: list[dict], path: Path) -> Path:
    """Superpixels per image over every written image, stacked by split."""
    plt = pyplot()
    by_split: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        if row["status"] == "written":
            by_split[row["split"]].append(row["num_superpixels"])
    if not by_split:
        raise InspectError("the output has no written images to count superpixels of")
    top = max(max(counts) for counts in by_split.values())
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    names = sorted(by_split)
    axis.hist([by_split[name] for name in names], bins=np.linspace(0, top + 1, min(top + 2, 51)), stacked=True,
              label=[f"{name} ({len(by_split[name])})" for name in names])
    axis.set_xlabel("superpixels per image")
    axis.set_ylabel("images")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title("superpixels per image (index.parquet)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def superpixel_areas(samples: list[InspectedSample]) -> np.ndarray:
    """Every superpixel's area as a fraction of its image, over the sampled label maps."""
    areas = [counts[counts > 0] / sample.labels.size
             for sample in samples for counts in [np.bincount(sample.labels.ravel())]]
    return np.concatenate(areas)


def area_histogram(samples: list[InspectedSample], path: Path) -> Path:
    """Superpixel areas on a log scale: a backend that cuts the image too finely or too coarsely shows here."""
    plt = pyplot()
    areas = superpixel_areas(samples)
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    axis.hist(areas, bins=np.logspace(np.log10(areas.min()), 0, 40))
    axis.set_xscale("log")
    axis.set_xlabel("superpixel area / image area")
    axis.set_ylabel("superpixels")
    axis.set_title(f"superpixel area, {len(areas)} superpixels of {len(samples)} sampled images "
                   f"(median {np.median(areas):.2g})", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def write_html(summary: dict, text: str, pictures: dict[str, Path], path: Path) -> Path:
    """One file to send or archive: the pictures inline as data URIs, no external resource."""
    escape = html.escape
    split_rows = "".join(
        f"<tr><td>{escape(split)}</td><td>{e['written']}</td><td>{e['failed']}</td><td>{e['shards']}</td>"
        f"<td>{e['samples']}</td></tr>" for split, e in summary["splits"].items())
    failure_rows = "".join(
        f"<tr><td>{escape(stage)}</td><td>{e['count']}</td><td>{escape(e['example'])}</td></tr>"
        for stage, e in summary["failures_by_stage"].items()) or "<tr><td colspan=3>none</td></tr>"
    images = "".join(
        f"<figure><img alt='{escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(picture.read_bytes()).decode('ascii')}'><figcaption>{escape(name)}</figcaption></figure>"
        for name, picture in pictures.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>svp inspect: {escape(summary['root'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #bbb;padding:0.2em 0.6em;text-align:right}} td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}} figure{{margin:1em 0}} pre{{background:#f4f4f4;padding:0.8em}}</style></head>
<body><h1>svp inspect</h1><pre>{escape(text)}</pre>
<h2>Splits</h2><table><tr><th>split</th><th>written</th><th>failed</th><th>shards</th><th>samples</th></tr>
{split_rows}</table>
<h2>Failures by stage</h2><table><tr><th>stage</th><th>images</th><th>example</th></tr>{failure_rows}</table>
{images}</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The whole report


def inspect_output(root: str | Path, report_dir: Path, *, samples: int = 16, seed: int = 0, split: str | None = None,
                   with_html: bool = False) -> InspectReport:
    """Write the pictures and ``summary.txt`` (and ``inspect.html`` if asked) into ``report_dir``."""
    if samples < 1:
        raise InspectError(f"the number of samples must be at least 1, got {samples}")
    output = read_output(root)
    summary = summarise(output)
    text = format_summary(summary)
    drawn = read_samples(output.root, choose_rows(output.rows, samples, seed, split), seed)
    report_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "contact_sheet.png": contact_sheet(drawn, report_dir / "contact_sheet.png"),
        "superpixels_hist.png": superpixels_histogram(output.rows, report_dir / "superpixels_hist.png"),
        "area_hist.png": area_histogram(drawn, report_dir / "area_hist.png"),
    }
    (report_dir / "summary.txt").write_text(text, encoding="utf-8")
    files["summary.txt"] = report_dir / "summary.txt"
    if with_html:
        files["inspect.html"] = write_html(summary, text, {name: files[name] for name in PICTURES},
                                           report_dir / "inspect.html")
    return InspectReport(summary=summary, text=text, files=files, samples=drawn)
