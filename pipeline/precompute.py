"""One unit of work of the precompute job: a shard's images → superpixels → one WebDataset shard.

An image is one sample however many (dataset, split)s refer to it (:func:`pipeline.refer.refer_images`):
its refs of every one go into its ``refs.json``, each naming its dataset and split, and the backend
runs on it once.

No Ray here: :class:`ShardProcessor` is what a Ray actor holds (one backend, one model), and it is
equally usable in a plain loop or a test. Every image either lands in the shard or becomes an
index row with the stage it failed at and why; one bad image never costs its shard. Each shard's
record also says how long its stages took on which worker (decode, superpixels, partition, SAM
embeddings if stored, write), which the job sums up in ``timing.json``.
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pycocotools import mask as mask_utils

from pipeline.batches import one_by_one
from pipeline.errors import SvpError
from pipeline.images import DecodedImage, ImageDecodeError, decode_image, to_displayed_frame
from pipeline.refer import (
    UNKNOWN_IMAGE_ID,
    AnnotationProblem,
    ReferError,
    ReferImage,
    RefRecord,
    SplitRefs,
    encode_mask,
    ref_mask,
)
from pipeline.shards import (
    ShardRecord,
    describe_sources,
    encode_sample,
    failed_row,
    group_name,
    index_row,
    key_prefix,
    resolve_source,
    sample_key,
    shard_name,
    source_name,
    write_shard,
)
from pipeline.superpixels.base import SuperpixelResult
from pipeline.superpixels.spec import BackendSpec
from pipeline.timing import StageTimer


@dataclass(frozen=True)
class ShardTask:
    """The images of one shard: fixed by the plan, so a rerun recomputes exactly the same shard."""

    name: str
    split: str  # the shard group (pipeline.shards.group_name): the split, in an output of one dataset
    items: tuple[ReferImage, ...]
    sources: tuple[str, ...]  # the (dataset, split)s its images serve: every image serves all of them


@dataclass(frozen=True)
class OutputSpec:
    """Where and how a worker writes: the same for every shard of a job."""

    out_dir: str  # a local directory or an fsspec URL (s3://bucket/prefix)
    image_dir: Path
    datasets: tuple[str, ...]  # sorted
    categories: dict[str, dict[int, str]]  # per dataset
    config_hash: str

    @property
    def key_prefix(self) -> str:
        return key_prefix(self.datasets)


class SelectionError(SvpError, ValueError):
    """A shard size, split or image limit that cannot select the work of a run."""


def plan_shards(samples: Sequence[ReferImage], shard_size: int, datasets: Sequence[str]) -> list[ShardTask]:
    """Group the samples of an output over ``datasets`` into fixed-size shards per shard group (the
    set of (dataset, split)s an image serves, :func:`pipeline.shards.group_name`), in (group, image_id)
    order."""
    if shard_size < 1:
        raise SelectionError(f"--shard-size must be >= 1, got {shard_size}")
    by_group: dict[tuple[str, tuple[str, ...]], list[ReferImage]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.image.image_id):
        pairs = [(part.dataset, part.split) for part in sample.parts]
        group = group_name(pairs, several_datasets=len(datasets) > 1)
        by_group[group, tuple(source_name(*pair) for pair in pairs)].append(sample)
    return [
        ShardTask(shard_name(group, i // shard_size), group, tuple(items[i : i + shard_size]), sources)
        for (group, sources), items in sorted(by_group.items())
        for i in range(0, len(items), shard_size)
    ]


def select(tasks: Sequence[ShardTask], only_split: str | None = None, limit: int | None = None) -> list[ShardTask]:
    """The part of the plan one run processes: the shards holding images of ``only_split`` (a split,
    or dataset/split where the output has several datasets; every shard if None), cut after the
    first ``limit`` images in plan order (every image if None).

    The plan itself never changes (it belongs to the output's config), so a later run without
    these options finds the same shards: the whole ones complete, the one cut short to redo.
    """
    if only_split is not None:
        sources = {source for task in tasks for source in task.sources}
        wanted = resolve_source(only_split, sources)
        if wanted is None:
            raise SelectionError(f"--only-split {only_split!r} is not a split of this output; "
                                 f"splits: {describe_sources(sources)}")
        tasks = [task for task in tasks if wanted in task.sources]
    if limit is None:
        return list(tasks)
    if limit < 1:
        raise SelectionError(f"--limit must be >= 1, got {limit}")
    selected, left = [], limit
    for task in tasks:
        if left == 0:
            break
        selected.append(replace(task, items=task.items[:left]))
        left -= len(selected[-1].items)
    return selected


def covers(record: ShardRecord | None, task: ShardTask) -> bool:
    """Whether a finished shard's record accounts for every image of ``task`` (a shard written
    by a ``--limit`` run may hold only the first images of its task)."""
    if record is None:
        return False
    return {item.image.image_id for item in task.items} <= {row["image_id"] for row in record.rows}


def problem_rows(datasets: Sequence[str], problems: Sequence[AnnotationProblem]) -> list[dict]:
    """Index rows for images whose annotations were unusable before any shard was planned: one per
    image (its problems in several datasets joined, each error naming its dataset), and one per
    problem that names no image."""
    several = len(datasets) > 1
    by_image: dict[int, list[AnnotationProblem]] = defaultdict(list)
    rows = []
    for problem in problems:
        if problem.image_id == UNKNOWN_IMAGE_ID:
            rows.append(_problem_row(datasets, [problem], several))
        else:
            by_image[problem.image_id].append(problem)
    return rows + [_problem_row(datasets, image_problems, several) for _, image_problems in sorted(by_image.items())]


def _problem_row(datasets: Sequence[str], problems: list[AnnotationProblem], several: bool) -> dict:
    pairs = sorted({(p.dataset, p.split) for p in problems if p.split})
    error = "; ".join(f"{p.dataset}: {p.error}" if several else p.error for p in problems)
    return failed_row(prefix=key_prefix(datasets), image_id=problems[0].image_id, file_name=problems[0].file_name,
                      split=group_name(pairs, several), stage="annotations", error=error,
                      sources=[source_name(*pair) for pair in pairs])


def failed_shard(task: ShardTask, prefix: str, stage: str, reason: str) -> ShardRecord:
    """A shard that could not be finished (its worker kept dying, or it could not be stored): every
    image is reported with the reason, and the record is not saved, so a rerun retries the shard.
    ``prefix``: its keys' (:attr:`OutputSpec.key_prefix`)."""
    rows = [_failed_item_row(prefix, task, item, stage, reason) for item in task.items]
    return ShardRecord(name=task.name, split=task.split, file=None, rows=rows)


def _failed_item_row(prefix: str, task: ShardTask, item: ReferImage, stage: str, error: str) -> dict:
    return failed_row(prefix=prefix, image_id=item.image.image_id, file_name=item.image.file_name,
                      split=task.split, stage=stage, error=error, sources=task.sources)


class _ImageFailed(Exception):
    def __init__(self, stage: str, error: str) -> None:
        super().__init__(error)
        self.stage, self.error = stage, error


@dataclass
class _Prepared:
    data: bytes
    image: DecodedImage
    refs: list[dict]


class ShardProcessor:
    """Holds one superpixel backend and turns :class:`ShardTask` s into shards on disk."""

    def __init__(self, spec: BackendSpec, output: OutputSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.output = output
        self.device = device
        self.timer = StageTimer()
        self.backend = spec.build(device, self.timer)
        self.segmented = 0  # images handed to the backend since the last shard's record

    def __call__(self, task: ShardTask) -> ShardRecord:
        """The shard's images, decoded, segmented and written; its record says where the time went."""
        self.timer.take()  # a shard that raised (and is retried) may have left time behind
        self.segmented = 0
        failures: dict[int, tuple[str, str]] = {}
        prepared: dict[int, _Prepared] = {}
        with self.timer.stage("decode"):
            for item in task.items:
                try:
                    prepared[item.image.image_id] = self._prepare(item)
                except _ImageFailed as failure:
                    failures[item.image.image_id] = (failure.stage, failure.error)
        results = self._superpixels(prepared, failures)  # the backend times its own stages
        with self.timer.stage("write"):
            samples, rows = self._encode(task, prepared, results, failures)
            file = write_shard(self.output.out_dir, task.name, task.split, samples) if samples else None
        return ShardRecord(name=task.name, split=task.split, file=file, rows=rows, seconds=self.timer.take(),
                           worker={"host": socket.gethostname(), "pid": os.getpid(), "device": self.device},
                           segmented=self.segmented)

    def _encode(self, task: ShardTask, prepared: dict[int, _Prepared], results: dict[int, SuperpixelResult],
                failures: dict[int, tuple[str, str]]) -> tuple[list[dict], list[dict]]:
        """The shard's samples, and one index row per image of the task, written or failed."""
        samples, rows = [], []
        for item in task.items:
            if item.image.image_id in failures:
                stage, error = failures[item.image.image_id]
                rows.append(_failed_item_row(self.output.key_prefix, task, item, stage, error))
                continue
            key = sample_key(self.output.key_prefix, item.image.image_id)
            done = prepared[item.image.image_id]
            result = results[item.image.image_id]
            meta = {"image_id": item.image.image_id, "file_name": item.image.file_name,
                    "dataset": ",".join(self.output.datasets), "split": task.split, "sources": list(task.sources),
                    "height": done.image.height, "width": done.image.width,
                    "num_superpixels": result.num_superpixels, "backend": self.spec.name,
                    "config_hash": self.output.config_hash}
            samples.append(encode_sample(key, done.data, result.labels, done.refs, meta, result.sam_embedding,
                                         result.vision_features))
            sources = [{"source": source, "refs": len(refs), "sentences": sum(len(r["sentences"]) for r in refs)}
                       for source, refs in _by_source(done.refs).items()]
            rows.append(index_row(key=key, image_id=item.image.image_id, file_name=item.image.file_name,
                                  split=task.split, shard=task.name, height=done.image.height,
                                  width=done.image.width, num_superpixels=result.num_superpixels,
                                  num_refs=len(done.refs), num_sentences=sum(len(r["sentences"]) for r in done.refs),
                                  sources=sources))
        return samples, rows

    def _prepare(self, item: ReferImage) -> _Prepared:
        path = self.output.image_dir / item.image.file_name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _ImageFailed("read", f"missing file: {path}") from None
        except OSError as exc:
            raise _ImageFailed("read", f"cannot read {path}: {exc}") from None
        try:
            image = decode_image(data)
        except ImageDecodeError as exc:
            raise _ImageFailed("decode", str(exc)) from None
        try:
            refs = [self._ref_json(ref, part, item, image) for part in item.parts for ref in part.refs]
        except (ReferError, ValueError) as exc:
            raise _ImageFailed("annotations", str(exc)) from None
        return _Prepared(data=data, image=image, refs=refs)

    def _ref_json(self, ref: RefRecord, part: SplitRefs, item: ReferImage, image: DecodedImage) -> dict:
        """A ref with its dataset and split, and its mask as compressed RLE in the *displayed* image's frame."""
        annotated = (item.image.height, item.image.width)
        mask = ref_mask(ref.segmentation, *annotated)
        if annotated != image.rgb.shape[:2]:
            if annotated != image.stored_size or image.orientation == 1:
                raise ReferError(
                    f"instances.json says {annotated[1]}x{annotated[0]} (WxH) but the image is "
                    f"{image.width}x{image.height}"
                )
            mask = to_displayed_frame(mask, image.orientation)
        rle = encode_mask(mask)
        return {
            "ref_id": ref.ref_id, "ann_id": ref.ann_id, "category_id": ref.category_id,
            "category": self.output.categories[part.dataset].get(ref.category_id, ""), "dataset": part.dataset,
            "split_by": part.split_by, "split": ref.split, "sentences": ref.sentences,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "segmentation": rle,
        }

    def _superpixels(self, prepared: dict[int, _Prepared],
                     failures: dict[int, tuple[str, str]]) -> dict[int, SuperpixelResult]:
        """Run the backend on the whole batch; if it fails, retry image by image to isolate the culprit,
        whose failure is recorded: the rest of the shard is still written."""
        results = {}
        outputs = one_by_one(self._segment, [p.image.rgb for p in prepared.values()])
        for image_id, output in zip(prepared, outputs, strict=True):
            if isinstance(output, Exception):
                failures[image_id] = ("superpixels", f"{type(output).__name__}: {output}")
            else:
                results[image_id] = output
        return results

    def _segment(self, images: list) -> list[SuperpixelResult]:
        """The backend on ``images``, counted: the record says how many images the backend ran on, so
        that an image shared by several datasets can be seen to be segmented once."""
        self.segmented += len(images)
        return self.backend(images)


def _by_source(refs: list[dict]) -> dict[str, list[dict]]:
    """A sample's refs (as written) per source, in the order they are written: sorted by source."""
    by_source: dict[str, list[dict]] = {}
    for ref in refs:
        by_source.setdefault(source_name(ref["dataset"], ref["split"]), []).append(ref)
    return by_source
