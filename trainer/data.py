"""Stream the precomputed shards (DESIGN §2-§3) into training and evaluation batches.

Modelled on open_clip's ``training/data.py`` WebDataset pipeline: a shard list (resampled for
multi-epoch training, or split by node and then by DataLoader worker), a shard shuffle, tar →
samples, a sample shuffle, decoding, batching and a ``WebLoader``. What is particular to us:

- a shard sample is one *image*; it becomes one item per (ref, sentence): one drawn at random per
  pass in training, every one in a fixed order in evaluation. The image is decoded once either way;
- a corrupt sample is skipped and counted (``batch["skipped"]``), never fatal: one bad image in a
  million must not end a multi-day run, but the run must be able to say how many it lost;
- the per-image preprocessing (:func:`pipeline.vision_model.vision_pixels`, :func:`superpixel_inputs`,
  :func:`sam_inputs`) is public, so inference and the precompute job use exactly what training used;
- a sample may hold the refs of several (dataset, split)s (*sources*: an output of several REFER
  datasets writes each image once). Read by source (``make_loader(sources=...)``), each source is a
  stream of its own shards whose samples keep only that source's refs; training draws from the
  streams by weight (a mixture), evaluation reads them one after the other.

The shard bytes are read through :mod:`pipeline.shards` and :mod:`pipeline.images`, so the writer
and this reader cannot disagree about the format.

A batch (the contract with the model; B items, V = vision_size, S = sam_size):
``keys``, ``sentences`` (REFER's normalised ``sent``), ``ref_ids``, ``sent_ids``, ``datasets``, ``splits``:
lists (``datasets``: each ref's dataset, "" where the shard's refs do not name it);
``vision_features`` float32 (B,P,D) when every item has stored features of the shape asked for
(``DataConfig.vision_features_shape``), else ``pixel_values`` float32 (B,3,V,V); ``superpixels``
int64 (B,V,V) with labels 0..K'-1 and ``num_superpixels`` int64 (B,) = K'; ``sam_embeddings``
float32 (B,C,S/16,S/16) when every item has a stored embedding of that shape, else ``sam_pixels``
float32 (B,3,S,S); ``gt_masks`` float32 (B,S/4,S/4) binary; ``input_sizes`` / ``original_sizes``
int64 (B,2) as (h, w); ``full_masks``: list of uint8 (H,W) tensors; in evaluation only,
``other_objects``: list of bool (H,W) tensors, the image's other referred objects (what a
prediction that picks the wrong object lands on); ``skipped``: corrupt samples this worker
skipped since its previous batch.
"""

from __future__ import annotations

import enum
import functools
import glob
import itertools
import json
import logging
import math
import posixpath
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from segment_anything.utils.transforms import ResizeLongestSide
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.errors import SvpError
from pipeline.images import decode_image
from pipeline.refer import ref_mask
from pipeline.sam_model import SAM_MASK_STRIDE, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from pipeline.shards import (
    MANIFEST_FILE,
    ManifestError,
    ManifestNotFound,
    decode_label_map,
    decode_stored_array,
    job_file_url,
    read_manifest,
    read_manifest_and_sha256,
    resolve_source,
    source_name,
    source_shard_urls,
    split_shard_urls,
)
from pipeline.storage import StorageError, glob_urls, open_url
from pipeline.vision_model import per_channel, vision_pixels

log = logging.getLogger(__name__)

REQUIRED_MEMBERS = ("jpg", "spx.png", "refs.json", "meta.json")
LOGGED_SKIPS = 5  # per worker: the first few corrupt samples are named, the rest only counted
# What a corrupt sample raises from the decoders (ImageDecodeError, ReferError, JSON and PIL errors
# are all ValueError or OSError); anything else is a bug in this module and must surface.
_CORRUPT_SAMPLE_ERRORS = (ValueError, KeyError, TypeError, IndexError, OSError, EOFError)


class DataError(SvpError, ValueError):
    """The shards asked for cannot be read as a dataset; the message names the URL or split."""


@dataclass(frozen=True)
class DataConfig:
    """Input geometry and normalisation of the two encoders, and the training shuffle."""

    vision_size: int = 224  # V: the global vision encoder sees the whole image squashed to V×V
    vision_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    vision_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    sam_size: int = 1024  # S: SAM's input frame (longest side S, zero padded to S×S)
    sam_channels: int = 256  # C: SAM's embedding width (its prompt and decoder width too)
    use_sam_embeddings: bool = True  # read sam.npy when present (only valid if it came from the trainer's SAM)
    # (patches, channels): read vision.npy of this shape instead of encoding pixels (only valid if it
    # came from the trainer's very vision encoder: trainer.stored_features says); None: pixels
    vision_features_shape: tuple[int, int] | None = None
    shuffle_buffer: int = 256
    # Training: sort each window of length_group × batch_size items by length and batch neighbours
    # (HF's group_by_length in a stream); 1 = batches in arrival order.
    length_group: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        # SAM's image embedding is S/16 on a side and its masks S/4: both must be whole.
        if self.sam_size % 16:
            raise ValueError(f"sam_size must be a multiple of 16, got {self.sam_size}")
        if self.length_group < 1:
            raise ValueError(f"length_group must be >= 1, got {self.length_group}")

    @property
    def sam_embedding_shape(self) -> tuple[int, int, int]:
        return (self.sam_channels, self.sam_size // 16, self.sam_size // 16)


# ---------------------------------------------------------------------------------------------
# Per-image preprocessing, shared with single-image inference


def superpixel_inputs(labels: np.ndarray, image_size: tuple[int, int], config: DataConfig) -> tuple[torch.Tensor, int]:
    """The superpixel map squashed to the vision encoder's V×V frame, as ``vision_pixels`` squashes the image.

    Labels are resized NEAREST, so each cell keeps a real label; a superpixel smaller than a cell can
    vanish, so the labels left are renumbered 0..K'-1 (in their original order) and K' is returned
    with them: superpixels int64 (V, V) and K'.
    """
    if labels.shape != tuple(image_size):
        raise ValueError(f"label map is {labels.shape[1]}x{labels.shape[0]} (WxH) but the image is "
                         f"{image_size[1]}x{image_size[0]}")
    size = (config.vision_size, config.vision_size)
    label_map = torch.from_numpy(labels.astype(np.float32))[None, None]  # float32 holds uint16 exactly
    label_map = F.interpolate(label_map, size=size, mode="nearest-exact")[0, 0].long()
    present, superpixels = torch.unique(label_map, return_inverse=True)
    return superpixels, len(present)


def sam_inputs(rgb: np.ndarray, config: DataConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's own preprocessing, so the frozen encoder sees what it was trained on.

    ``ResizeLongestSide`` to S, then ``Sam.preprocess``: pixel normalisation and zero padding at the
    bottom/right to S×S. Returns sam_pixels float32 (3, S, S) and the (h, w) of the image inside the
    frame, which SAM's ``postprocess_masks`` needs to map masks back to the original image.
    """
    resized = ResizeLongestSide(config.sam_size).apply_image(rgb)
    height, width = resized.shape[:2]
    pixels = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1)
    pixels = (pixels - per_channel(SAM_PIXEL_MEAN)) / per_channel(SAM_PIXEL_STD)
    return F.pad(pixels, (0, config.sam_size - width, 0, config.sam_size - height)), (height, width)


def sam_mask_target(mask: np.ndarray, input_size: tuple[int, int], config: DataConfig) -> torch.Tensor:
    """A full-resolution 0/1 mask in SAM's low-res mask frame: float32 (S/4, S/4), binary.

    Resized (bilinear) and padded exactly like the image in :func:`sam_inputs`, then each 4×4 cell
    is averaged and thresholded at 0.5: a target pixel is 1 when most of its cell is in the mask.
    """
    height, width = input_size
    full = torch.from_numpy(mask.astype(np.float32))[None, None]
    resized = F.interpolate(full, size=input_size, mode="bilinear", antialias=True, align_corners=False)
    framed = F.pad(resized, (0, config.sam_size - width, 0, config.sam_size - height))
    return (F.avg_pool2d(framed, SAM_MASK_STRIDE)[0, 0] >= 0.5).float()


# ---------------------------------------------------------------------------------------------
# Shard URLs


def shard_urls(shards: str, split: str, sources: Sequence[str] | None = None) -> list[str] | str:
    """What to read for ``split``, or for ``sources`` when given: ``shards`` itself when it names
    shards (a spec that :func:`expand_urls` reads: a ``.tar``, a brace, glob or list spec, a ``pipe:``
    command), else the shards that the manifest of the shard root ``shards`` (a directory or prefix
    written by ``svp precompute``) lists for the split, or for any of the sources (``dataset/split``
    or ``dataset/split:weight``, see :func:`parse_sources`), in manifest order."""
    names_shards = len(_split_specs(shards)) != 1 or _is_pipe(shards) or _is_glob(shards) or "{" in shards
    if names_shards or shards.endswith(".tar"):
        return shards
    manifest = read_manifest(shards)
    if not sources:
        return split_shard_urls(shards, manifest, split)
    wanted = {url for name, _ in parse_sources(sources) for url in source_shard_urls(shards, manifest, name)}
    listed = [job_file_url(shards, shard["name"]) for shard in manifest["shards"]]
    return [url for url in listed if url in wanted]


def parse_sources(specs: Sequence[str]) -> list[tuple[str, float]]:
    """``dataset/split[:weight]`` specs (``refcoco/train``, ``refcocog/train:2``) → (name, weight) pairs,
    weight 1 where none is given. A bare split (``train``) names that split of an output of one dataset."""
    parsed: list[tuple[str, float]] = []
    for spec in specs:
        name, _, weight = spec.strip().partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise DataError(f"source {spec!r}: the weight after ':' must be a number") from None
        if not (math.isfinite(value) and value > 0):
            raise DataError(f"source {spec!r}: the weight must be positive, got {weight}")
        if not name or name in (n for n, _ in parsed):
            raise DataError(f"source {spec!r} is empty or given twice in {', '.join(specs)}")
        parsed.append((name, value))
    if not parsed:
        raise DataError("no source given")
    return parsed


def _source_shards(shards: Sequence[str], names: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """For each source of ``names``, the shards among ``shards`` that hold its images, as (URL, the
    source's full name in their manifest), in the order given; read from the manifest beside them."""
    manifests: dict[str, dict] = {}
    found: dict[str, list[tuple[str, str]]] = {name: [] for name in names}
    for url in shards:
        directory = _parent(url)
        if directory not in manifests:
            try:
                manifests[directory] = read_manifest(directory)
            except ManifestError as exc:
                raise DataError(f"reading shards by (dataset, split) needs the manifest beside them: {exc}") from None
        manifest = manifests[directory]
        held = next((s.get("sources", {}) for s in manifest["shards"] if s["name"] == posixpath.basename(url)), {})
        for name in names:
            full = resolve_source(name, manifest.get("sources", {}))
            if full is not None and full in held:
                found[name].append((url, full))
    for name, urls in found.items():
        if not urls:
            present = sorted({source for manifest in manifests.values() for source in manifest.get("sources", {})})
            raise DataError(f"no shard given holds images of {name!r}; their manifests list "
                            f"{', '.join(present) or 'no (dataset, split)'}")
    return found


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard specs → a list of shard URLs.

    A string may hold several specs separated by ``::`` or by commas outside braces; a sequence
    holds one spec per element. Each spec is brace-expanded (``train-{000000..000009}.tar``); a
    spec with ``*?[`` is globbed (sorted), locally or through fsspec (``s3://bucket/train-*.tar``,
    one listing). Other remote URLs (anything with ``://``) and ``pipe:`` commands pass through
    unchecked (a check per shard would cost a request each); local paths must exist, so a typo
    fails here, naming the path, rather than as an empty epoch later.
    """
    specs = _split_specs(urls) if isinstance(urls, str) else list(urls)
    shards = [shard for spec in specs for url in braceexpand.braceexpand(spec) for shard in _resolve(url)]
    if not shards:
        raise DataError(f"no shard URLs in {urls!r}")
    return shards


def _split_specs(urls: str) -> list[str]:
    """Split on ``::`` and on commas at brace depth 0 (``{a,b}`` is one brace alternation)."""
    specs = []
    for part in urls.split("::"):
        depth, start = 0, 0
        for index, char in enumerate(part):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "," and depth == 0:
                specs.append(part[start:index])
                start = index + 1
        specs.append(part[start:])
    return [spec.strip() for spec in specs if spec.strip()]


def _is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def _is_glob(url: str) -> bool:
    return any(char in url for char in "*?[")


def _resolve(url: str) -> list[str]:
    """One URL → its shards: a glob is listed, a local path must exist, the rest pass through."""
    if _is_glob(url) and not _is_pipe(url):
        if "://" in url:
            try:
                matches = glob_urls(url)
            except StorageError as exc:
                raise DataError(str(exc)) from None
        else:
            matches = sorted(glob.glob(str(Path(url).expanduser())))
        if not matches:
            raise DataError(f"no shard matches {url}")
        return matches
    if "://" in url or _is_pipe(url):
        return [url]
    path = Path(url).expanduser()
    if not path.is_file():
        raise DataError(f"shard not found: {url}")
    return [str(path)]


def _parent(url: str) -> str:
    """The directory (or object-store prefix) that holds a shard, where its manifest.json is."""
    return url.rsplit("/", 1)[0] if "://" in url else str(Path(url).parent)


def describe_shards(urls: str | Sequence[str]) -> dict:
    """What the run reads, for its reproducibility record: the manifest next to the shards.

    Returns the manifest's path or URL and its sha256, the precompute job's config and its hash, and
    the sha256 and sample count the manifest lists for each shard used. Several shard directories
    give ``{"sources": [...]}``, one per directory; no manifest found (or ``pipe:`` commands) gives ``{}``.
    """
    shards = [url for url in expand_urls(urls) if not _is_pipe(url)]
    sources = []
    for directory in sorted({_parent(url) for url in shards}):
        try:
            manifest, manifest_sha256 = read_manifest_and_sha256(directory)
        except ManifestNotFound:
            continue
        except ManifestError as exc:
            raise DataError(str(exc)) from None
        used = {posixpath.basename(url) for url in shards if _parent(url) == directory}
        listed = [shard for shard in manifest.get("shards", []) if shard["name"] in used]
        sources.append({
            "manifest": job_file_url(directory, MANIFEST_FILE),
            "manifest_sha256": manifest_sha256,
            "config_hash": manifest.get("config_hash"),
            "config": manifest.get("config", {}),
            "shards": {shard["name"]: shard["sha256"] for shard in listed},
            "samples": sum(shard["samples"] for shard in listed),
        })
    if len(sources) > 1:
        return {"sources": sources}
    return sources[0] if sources else {}


# ---------------------------------------------------------------------------------------------
# Pipeline stages


def _log_shard_error(exc: Exception) -> bool:
    """webdataset handler for shard-level failures (unreachable URL, truncated tar): warn and go on
    with the next shard, as open_clip's ``log_and_continue``: a flaky store must not end a run."""
    log.warning("shard skipped or cut short: %s: %s", type(exc).__name__, exc)
    return True


def _open_shards(shards: Iterable[dict]) -> Iterator[dict]:
    """Open each shard URL as a byte stream.

    Local paths and ``pipe:`` go through webdataset's ``gopen``; every other URL (s3://, gs://,
    https://, file://, ...) through fsspec, which reaches far more stores than gopen's CLI tools.
    """
    for shard in shards:
        url = shard["url"]
        try:
            stream = open_url(url) if "://" in url else wds.gopen(url)
        except Exception as exc:  # noqa: BLE001 - whatever the store raises, reported per shard
            _log_shard_error(DataError(f"cannot open {url}: {exc}"))
            continue
        try:
            yield {**shard, "stream": stream}
        finally:  # the tar reader has consumed the stream when it asks for the next shard
            stream.close()


class _Purpose(enum.IntEnum):
    """What a worker's random stream is for: each gets its own, so that changing how one is used
    (more draws, another order) leaves the others' draws as they were."""

    SAMPLE_SHUFFLE = 1
    SENTENCE_DRAW = 2
    BATCH_ORDER = 3
    SOURCE_MIX = 4


def _worker_rng(seed: int, purpose: _Purpose, epoch: int) -> random.Random:
    """Reproducible from ``seed``, yet distinct per purpose, rank, DataLoader worker and pass."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return random.Random(wds.utils.make_seed(seed, int(purpose), rank, worker, epoch))


class _SampleShuffle(wds.PipelineStage):
    """``wds.shuffle`` seeded per rank, worker and pass: a plain seed would repeat the same
    permutation in every worker and every epoch, and no seed would make runs unrepeatable."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, 0

    def run(self, samples: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        return wds.shuffle(self.bufsize, rng=_worker_rng(self.seed, _Purpose.SAMPLE_SHUFFLE, self.epoch))(samples)


def _tag_source(samples: Iterable[dict], names: dict[str, str]) -> Iterator[dict]:
    """Mark each sample with the source it is read for (``names``: by shard URL, the source's name in
    that shard's manifest): the decoder keeps that source's refs only."""
    for sample in samples:
        sample["__source__"] = names[sample["__url__"]]
        yield sample


class _Mixture(torch.utils.data.IterableDataset):
    """The samples of several sources' streams. Training: each next sample comes from a source drawn
    with probability proportional to its weight (seeded per rank, worker and pass), and a pass ends
    when a source runs out, so that every pass follows the weights. Evaluation: each source's
    samples in turn."""

    def __init__(self, streams: Sequence[wds.DataPipeline], weights: Sequence[float], seed: int,
                 train: bool) -> None:
        self.streams, self.weights, self.seed, self.train = list(streams), list(weights), seed, train
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        self.epoch += 1
        iterators = [iter(stream) for stream in self.streams]
        if not self.train:
            return itertools.chain.from_iterable(iterators)
        return self._draw(iterators, _worker_rng(self.seed, _Purpose.SOURCE_MIX, self.epoch))

    def _draw(self, iterators: list[Iterator[dict]], rng: random.Random) -> Iterator[dict]:
        indices = range(len(iterators))
        while (sample := next(iterators[rng.choices(indices, self.weights)[0]], None)) is not None:
            yield sample


def item_length(item: dict) -> int:
    """What an item adds to its batch's padded LLM sequence: its visual tokens (one per superpixel
    for svp) and its sentence's words; the prompt around them is the same for every item."""
    return int(item["num_superpixels"]) + len(item["sentence"].split())


class _LengthGroupedBatches(wds.PipelineStage):
    """Training batches of items of similar length, so that the tokens svp saves are not spent
    again as padding: a batch is as long as its longest item.

    Each window of ``group × batch_size`` items (after the sample shuffle) is sorted by
    :func:`item_length` and cut into batches, which leave in a shuffled order (seeded per rank,
    worker and pass), so the step sees no long-to-short trend. As in ``wds.batched(partial=False)``,
    a last batch that is not full is dropped. ``group == 1`` is plain batching in arrival order.
    """

    def __init__(self, batch_size: int, group: int, seed: int, collate: Any) -> None:
        self.batch_size, self.group, self.seed, self.collate = batch_size, group, seed, collate
        self.epoch = 0

    def run(self, items: Iterable[dict]) -> Iterator[dict]:
        """While a window's batches leave, the next window is read ``batch_size`` items per batch.

        Reading a whole window only once the last one is gone would have the DataLoader worker
        decode ``group × batch_size`` items in one burst every ``group`` batches, while the step
        has only the DataLoader's prefetched batches left, so the step would wait on it. Reading in
        step keeps the worker's decoding as even as plain batching (BENCHMARKS.md has what it
        saved); the windows, and so the batches, are the same.
        """
        self.epoch += 1
        rng = _worker_rng(self.seed, _Purpose.BATCH_ORDER, self.epoch)
        source = iter(items)
        size = self.batch_size * self.group
        window = list(itertools.islice(source, size))
        while len(window) == size:
            batches, window = self._batches(window, rng), []
            for batch in batches:
                window += itertools.islice(source, self.batch_size)
                yield self.collate(batch)
        for batch in self._batches(window[: len(window) - len(window) % self.batch_size], rng):
            yield self.collate(batch)

    def _batches(self, window: list[dict], rng: random.Random) -> list[list[dict]]:
        if self.group > 1:
            window = sorted(window, key=item_length)
        batches = [window[start : start + self.batch_size] for start in range(0, len(window), self.batch_size)]
        if self.group > 1:
            rng.shuffle(batches)
        return batches


class _Decoder(wds.PipelineStage):
    """Shard samples → items: every (ref, sentence) of an image in order (eval), or one drawn
    uniformly from them per pass (train), so each sentence is equally likely over epochs.

    It counts the corrupt samples it skips, and its :meth:`collate` gives that count to the next
    batch. Both run in the same DataLoader worker, which holds its own copy of this object, so
    ``batch["skipped"]`` is what that worker lost since its previous batch.
    """

    def __init__(self, config: DataConfig, train: bool) -> None:
        self.config, self.train = config, train
        self.epoch = 0
        self.skipped = 0  # since the last batch
        self.skipped_total = 0  # for rate-limited logging
        self.warned_shapes: set[str] = set()  # stored members of a shape not asked for, warned about once

    def run(self, samples: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        rng = _worker_rng(self.config.seed, _Purpose.SENTENCE_DRAW, self.epoch)
        for sample in samples:
            try:
                image, masks, pairs = self._decode(sample)
            except _CORRUPT_SAMPLE_ERRORS as exc:
                self._skip(sample, exc)
                continue
            targets: dict[int, torch.Tensor] = {}  # each ref's mask target is computed once
            others: dict[int, torch.Tensor] = {}
            # Evaluation: where a prediction that picked a wrong object lands, which cIoU alone cannot tell
            # from a loose mask around the right one. The image's referred objects, once; per ref, those
            # pixels outside its own mask (another ref of the same object has the same mask, so adds nothing).
            objects = None if self.train else np.logical_or.reduce([mask.astype(bool) for mask in masks])
            for ref_index, ref, sentence in [rng.choice(pairs)] if self.train else pairs:
                if ref_index not in targets:
                    targets[ref_index] = sam_mask_target(masks[ref_index], image["input_size"], self.config)
                    if objects is not None:
                        others[ref_index] = torch.from_numpy(objects & ~masks[ref_index].astype(bool))
                yield {
                    **image,
                    "sentence": sentence["sent"],
                    "ref_id": int(ref["ref_id"]),
                    "sent_id": int(sentence["sent_id"]),
                    "dataset": str(ref.get("dataset", "")),
                    "split": str(ref["split"]),
                    "gt_mask": targets[ref_index],
                    "full_mask": torch.from_numpy(masks[ref_index]),
                    **({"other_objects": others[ref_index]} if not self.train else {}),
                }

    def _decode(self, sample: dict) -> tuple[dict, list[np.ndarray], list[tuple[int, dict, dict]]]:
        """Decode and check one image; raise one of ``_CORRUPT_SAMPLE_ERRORS`` if it is unusable."""
        missing = [name for name in REQUIRED_MEMBERS if name not in sample]
        if missing:
            raise ValueError(f"missing member(s): {', '.join(missing)}")
        rgb = decode_image(sample["jpg"]).rgb
        height, width = rgb.shape[:2]
        meta = json.loads(sample["meta.json"])
        if (meta["height"], meta["width"]) != (height, width):
            raise ValueError(f"meta.json says {meta['width']}x{meta['height']} but the image is {width}x{height}")
        labels = decode_label_map(sample["spx.png"])
        refs = json.loads(sample["refs.json"])
        if "__source__" in sample:  # read for one source: the other sources' refs are not its targets
            refs = [ref for ref in refs if source_name(ref["dataset"], ref["split"]) == sample["__source__"]]
        masks = [ref_mask(ref["segmentation"], height, width) for ref in refs]
        pairs = [(index, ref, sentence) for index, ref in enumerate(refs) for sentence in ref["sentences"]]
        if not pairs:
            raise ValueError(f"no referring sentence of {sample['__source__']}" if "__source__" in sample
                             else "no referring sentence")
        blank = [sentence["sent_id"] for _, _, sentence in pairs if not str(sentence["sent"]).strip()]
        if blank:  # nothing to refer to: as a target it would teach the model to segment without a text
            pairs = [pair for pair in pairs if str(pair[2]["sent"]).strip()]
            if not pairs:
                raise ValueError("every referring sentence is empty")
            self._skip(sample, ValueError(f"empty sentence(s) left out: sent_id {', '.join(map(str, blank))}"),
                       count=len(blank))
        superpixels, num_superpixels = superpixel_inputs(labels, rgb.shape[:2], self.config)
        features = self._stored(sample, "vision.npy", self.config.vision_features_shape)
        pixel_values = None if features is not None else self._pixel_values(rgb)  # else computed in collate if mixed
        embedding = self._stored(sample, "sam.npy", self.config.sam_embedding_shape
                                 if self.config.use_sam_embeddings else None)
        if embedding is None:
            sam_pixels, input_size = sam_inputs(rgb, self.config)
        else:  # computed in collate only if the batch is mixed
            sam_pixels = None
            input_size = ResizeLongestSide.get_preprocess_shape(height, width, self.config.sam_size)
        image = {
            "key": sample["__key__"], "rgb": rgb, "pixel_values": pixel_values, "vision_features": features,
            "superpixels": superpixels,
            "num_superpixels": num_superpixels, "sam_pixels": sam_pixels, "sam_embedding": embedding,
            "input_size": input_size, "original_size": (height, width),
        }
        return image, masks, pairs

    def _stored(self, sample: dict, member: str, shape: tuple[int, ...] | None) -> torch.Tensor | None:
        """A stored array (``sam.npy``, ``vision.npy``) as float32, when asked for (``shape``) and of
        that shape; None otherwise, and then the encoder runs on the image instead."""
        if shape is None or member not in sample:
            return None
        array = decode_stored_array(sample[member])
        if array.shape != tuple(shape):
            if member not in self.warned_shapes:
                self.warned_shapes.add(member)
                log.warning("ignoring %s of shape %s in %s (and any other such): this trainer's encoder gives %s, "
                            "so it comes from another one; encoding images instead",
                            member, array.shape, sample["__key__"], tuple(shape))
            return None
        return torch.from_numpy(array.astype(np.float32))

    def _pixel_values(self, rgb: np.ndarray) -> torch.Tensor:
        return vision_pixels(rgb, self.config.vision_size, self.config.vision_mean, self.config.vision_std)

    def _skip(self, sample: dict, exc: Exception, count: int = 1) -> None:
        """Count ``count`` items of ``sample`` as skipped (its unusable sentences, or the whole image)."""
        self.skipped += count
        self.skipped_total += 1
        if self.skipped_total <= LOGGED_SKIPS:
            log.warning("skipping corrupt sample %s from %s: %s: %s", sample.get("__key__"), sample.get("__url__"),
                        type(exc).__name__, exc)
            if self.skipped_total == LOGGED_SKIPS:
                log.warning("any further corrupt samples in this worker are counted in batch['skipped'], not logged")

    def collate(self, items: list[dict]) -> dict[str, Any]:
        """Items → one batch (the contract is in the module docstring)."""
        batch = {
            "keys": [item["key"] for item in items],
            "sentences": [item["sentence"] for item in items],
            "ref_ids": [item["ref_id"] for item in items],
            "sent_ids": [item["sent_id"] for item in items],
            "datasets": [item["dataset"] for item in items],
            "splits": [item["split"] for item in items],
            "superpixels": torch.stack([item["superpixels"] for item in items]),
            "num_superpixels": torch.tensor([item["num_superpixels"] for item in items], dtype=torch.int64),
            "gt_masks": torch.stack([item["gt_mask"] for item in items]),
            "input_sizes": torch.tensor([item["input_size"] for item in items], dtype=torch.int64),
            "original_sizes": torch.tensor([item["original_size"] for item in items], dtype=torch.int64),
            "full_masks": [item["full_mask"] for item in items],
            "skipped": self.skipped,
        }
        if "other_objects" in items[0]:
            batch["other_objects"] = [item["other_objects"] for item in items]
        self.skipped = 0
        if all(item["vision_features"] is not None for item in items):
            batch["vision_features"] = torch.stack([item["vision_features"] for item in items])
        else:
            batch["pixel_values"] = torch.stack([
                item["pixel_values"] if item["pixel_values"] is not None else self._pixel_values(item["rgb"])
                for item in items
            ])
        if all(item["sam_embedding"] is not None for item in items):
            batch["sam_embeddings"] = torch.stack([item["sam_embedding"] for item in items])
        else:
            batch["sam_pixels"] = torch.stack([
                item["sam_pixels"] if item["sam_pixels"] is not None else sam_inputs(item["rgb"], self.config)[0]
                for item in items
            ])
        return batch


# ---------------------------------------------------------------------------------------------
# The loader


class ShardLoader(wds.WebLoader):
    """A ``wds.WebLoader`` that fails loudly when a pass over its shards yields nothing: an empty
    split, or one whose samples are all corrupt, is a configuration error, not an empty epoch."""

    def __init__(self, pipeline: wds.DataPipeline, *, num_workers: int, source: str, expect_batches: bool) -> None:
        super().__init__(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                         persistent_workers=num_workers > 0)
        self.source, self.expect_batches = source, expect_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        empty = True
        for batch in super().__iter__():
            empty = False
            yield batch
        if empty and self.expect_batches:
            raise DataError(f"{self.source} yielded no batch: no usable sample (training drops a last "
                            f"batch that is not full, so it also needs at least batch_size samples)")

    def close(self) -> None:
        """Stop the DataLoader's worker processes now.

        They are persistent (kept between passes) and forked from this process: left to the
        garbage collector, they outlive a finished training or evaluation for as long as anything
        holds the loader, and hold copies of every file and socket the parent had open at the fork.
        Torch keeps the live workers in the DataLoader's cached iterator and offers no public call
        to end them early, hence the private ``_shutdown_workers``. Safe to call more than once.
        """
        loader = self.pipeline[0]
        iterator, loader._iterator = loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def make_loader(
    urls: str | Sequence[str],
    config: DataConfig,
    *,
    train: bool,
    batch_size: int,
    num_workers: int = 0,
    resampled: bool | None = None,
    epoch_samples: int | None = None,
    sources: Sequence[str] | None = None,
) -> ShardLoader:
    """An iterable of batches (dicts, described in the module docstring) over the shards in ``urls``.

    Training (``resampled`` defaults to ``train``): every rank and worker draws shards with
    replacement from its own seeded stream, so the loader is infinite unless ``epoch_samples`` is
    given; that is the number of items per epoch *over all ranks* (like open_clip's
    ``--train-num-samples``), rounded up to whole batches per worker. Without resampling, the shard
    order is shuffled identically on every rank (seed + pass), then split by node and by worker.
    Training batches group items of similar length (``config.length_group``, see
    :class:`_LengthGroupedBatches`). Evaluation: no shuffle, shards split by node then by worker,
    every (ref, sentence) once, and the last partial batch kept. The rank and world size come from
    ``RANK``/``WORLD_SIZE`` or an initialised ``torch.distributed`` (webdataset's
    ``pytorch_worker_info``), so do not also shard this loader with ``accelerator.prepare``.

    ``sources`` (``dataset/split[:weight]``, :func:`parse_sources`): only the refs of these (dataset,
    split)s are items. Each source reads the shards among ``urls`` that hold its images (the
    manifest beside them says which) as a stream of its own, as above; training draws each next
    sample from a source with probability proportional to its weight (:class:`_Mixture`, a pass
    ending when a source runs out), evaluation reads the sources one after the other, a sample that
    two of them share once for each. Without resampling, each process and DataLoader worker of a
    training run needs a shard of every source.
    """
    shards = expand_urls(urls)
    resampled = train if resampled is None else resampled
    if epoch_samples is not None and not train:
        raise ValueError("epoch_samples is for training: evaluation reads every (ref, sentence) exactly once")
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    decoder = _Decoder(config, train)
    if sources is None:
        stages: list[Any] = _read_stages(shards, config.seed, train, resampled)
        expect_batches = resampled or len(shards) > rank
    else:
        weights = dict(parse_sources(sources))
        by_source = _source_shards(shards, list(weights))
        readers = world_size * max(1, num_workers)
        short = [name for name, held in by_source.items() if len(held) < readers]
        if train and not resampled and short:
            raise DataError(f"{', '.join(short)}: fewer shards than the {readers} readers (processes x DataLoader "
                            f"workers), each of which needs a shard of every source; use fewer workers")
        streams = [wds.DataPipeline(*_read_stages([url for url, _ in held], wds.utils.make_seed(config.seed, index),
                                                  train, resampled),
                                    functools.partial(_tag_source, names=dict(held)))
                   for index, held in enumerate(by_source.values())]
        stages = [_Mixture(streams, list(weights.values()), config.seed, train)]
        expect_batches = resampled or any(len(held) > rank for held in by_source.values())
    if train:
        stages += [_SampleShuffle(config.shuffle_buffer, config.seed), decoder,
                   _LengthGroupedBatches(batch_size, config.length_group, config.seed, decoder.collate)]
    else:
        stages += [decoder, wds.batched(batch_size, collation_fn=decoder.collate, partial=True)]
    pipeline = wds.DataPipeline(*stages)
    if epoch_samples is not None:
        per_worker = math.ceil(epoch_samples / (batch_size * world_size * max(1, num_workers)))
        pipeline = pipeline.with_epoch(per_worker)
    source = urls if isinstance(urls, str) else f"{len(shards)} shards from {shards[0]}"
    if sources is not None:
        source += f" ({', '.join(sources)})"
    return ShardLoader(pipeline, num_workers=num_workers, source=source, expect_batches=expect_batches)


def _read_stages(shards: list[str], seed: int, train: bool, resampled: bool) -> list[Any]:
    """Shard URLs → samples: which shards this rank and worker read, in which order, and their
    samples as dicts of raw members."""
    if resampled:
        stages: list[Any] = [wds.ResampledShards(shards, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(shards)]
        if train:
            stages.append(wds.detshuffle(len(shards), initial=len(shards), seed=seed))
        stages += [wds.split_by_node, wds.split_by_worker]
    return stages + [
        _open_shards,
        functools.partial(tar_file_expander, handler=_log_shard_error),
        functools.partial(group_by_keys, handler=_log_shard_error),
    ]
