"""One unit of work of the precompute job: a shard's images → superpixels → one WebDataset shard.

No Ray here: :class:`ShardProcessor` is what a Ray actor holds (one backend, one model), and it is
equally usable in a plain loop or a test. Every image either lands in the shard or becomes an
index row with the stage it failed at and why; one bad image never costs its shard. Each shard's
record also says how long its stages took on which worker (decode, superpixels, partition, SAM
embeddings if stored, write), which the job sums up in ``timing.json``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pycocotools import mask as mask_utils

from pipeline.errors import SvpError
from pipeline.images import DecodedImage, ImageDecodeError, decode_image, to_displayed_frame
from pipeline.refer import AnnotationProblem, ImageRefs, ReferError, encode_mask, ref_mask
from pipeline.shards import ShardRecord, encode_sample, failed_row, index_row, sample_key, shard_name, write_shard
from pipeline.superpixels.base import SuperpixelResult
from pipeline.superpixels.spec import BackendSpec
from pipeline.timing import StageTimer


@dataclass(frozen=True)
class ShardTask:
    """The images of one shard: fixed by the plan, so a rerun recomputes exactly the same shard."""

    name: str
    split: str
    items: tuple[ImageRefs, ...]


@dataclass(frozen=True)
class OutputSpec:
    """Where and how a worker writes: the same for every shard of a job."""

    out_dir: str  # a local directory or an fsspec URL (s3://bucket/prefix)
    image_dir: Path
    dataset: str
    categories: dict[int, str]
    config_hash: str


class SelectionError(SvpError, ValueError):
    """A shard size, split or image limit that cannot select the work of a run."""


def plan_shards(samples: Sequence[ImageRefs], shard_size: int) -> list[ShardTask]:
    """Group samples into fixed-size shards per split, in (split, image_id) order."""
    if shard_size < 1:
        raise SelectionError(f"--shard-size must be >= 1, got {shard_size}")
    by_split: dict[str, list[ImageRefs]] = {}
    for sample in sorted(samples, key=lambda s: (s.split, s.image.image_id)):
        by_split.setdefault(sample.split, []).append(sample)
    return [
        ShardTask(shard_name(split, i // shard_size), split, tuple(items[i : i + shard_size]))
        for split, items in by_split.items()
        for i in range(0, len(items), shard_size)
    ]


def select(tasks: Sequence[ShardTask], only_split: str | None = None, limit: int | None = None) -> list[ShardTask]:
    """The part of the plan one run processes: the shards of ``only_split`` (every split if None),
    cut after the first ``limit`` images in plan order (every image if None).

    The plan itself never changes (it belongs to the output's config), so a later run without
    these options finds the same shards: the whole ones complete, the one cut short to redo.
    """
    if only_split is not None:
        splits = sorted({task.split for task in tasks})
        if only_split not in splits:
            raise SelectionError(f"--only-split {only_split!r} is not a split of this dataset; "
                                 f"splits: {', '.join(splits)}")
        tasks = [task for task in tasks if task.split == only_split]
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


def problem_rows(dataset: str, problems: Sequence[AnnotationProblem]) -> list[dict]:
    """Index rows for images whose annotations were unusable before any shard was planned."""
    return [
        failed_row(dataset=dataset, image_id=p.image_id, file_name=p.file_name, split=p.split,
                   stage="annotations", error=p.error)
        for p in problems
    ]


def failed_shard(task: ShardTask, dataset: str, stage: str, reason: str) -> ShardRecord:
    """A shard that could not be finished (its worker kept dying, or it could not be stored): every
    image is reported with the reason, and the record is not saved, so a rerun retries the shard."""
    rows = [_failed_item_row(dataset, task, item, stage, reason) for item in task.items]
    return ShardRecord(name=task.name, split=task.split, file=None, rows=rows)


def _failed_item_row(dataset: str, task: ShardTask, item: ImageRefs, stage: str, error: str) -> dict:
    return failed_row(dataset=dataset, image_id=item.image.image_id, file_name=item.image.file_name,
                      split=task.split, stage=stage, error=error)


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

    def __call__(self, task: ShardTask) -> ShardRecord:
        """The shard's images, decoded, segmented and written; its record says where the time went."""
        self.timer.take()  # a shard that raised (and is retried) may have left time behind
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
                           worker={"host": socket.gethostname(), "pid": os.getpid(), "device": self.device})

    def _encode(self, task: ShardTask, prepared: dict[int, _Prepared], results: dict[int, SuperpixelResult],
                failures: dict[int, tuple[str, str]]) -> tuple[list[dict], list[dict]]:
        """The shard's samples, and one index row per image of the task, written or failed."""
        samples, rows = [], []
        for item in task.items:
            if item.image.image_id in failures:
                stage, error = failures[item.image.image_id]
                rows.append(_failed_item_row(self.output.dataset, task, item, stage, error))
                continue
            key = sample_key(self.output.dataset, item.image.image_id)
            done = prepared[item.image.image_id]
            result = results[item.image.image_id]
            meta = {"image_id": item.image.image_id, "file_name": item.image.file_name, "dataset": self.output.dataset,
                    "split": task.split, "height": done.image.height, "width": done.image.width,
                    "num_superpixels": result.num_superpixels, "backend": self.spec.name,
                    "config_hash": self.output.config_hash}
            samples.append(encode_sample(key, done.data, result.labels, done.refs, meta, result.sam_embedding))
            rows.append(index_row(key=key, image_id=item.image.image_id, file_name=item.image.file_name,
                                  split=task.split, shard=task.name, height=done.image.height,
                                  width=done.image.width, num_superpixels=result.num_superpixels,
                                  num_refs=len(done.refs), num_sentences=sum(len(r["sentences"]) for r in done.refs)))
        return samples, rows

    def _prepare(self, item: ImageRefs) -> _Prepared:
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
            refs = [self._ref_json(ref, item, image) for ref in item.refs]
        except (ReferError, ValueError) as exc:
            raise _ImageFailed("annotations", str(exc)) from None
        return _Prepared(data=data, image=image, refs=refs)

    def _ref_json(self, ref, item: ImageRefs, image: DecodedImage) -> dict:
        """A ref with its mask as compressed RLE in the *displayed* image's frame."""
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
            "category": self.output.categories.get(ref.category_id, ""), "split": ref.split,
            "sentences": ref.sentences, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "segmentation": rle,
        }

    def _superpixels(self, prepared: dict[int, _Prepared],
                     failures: dict[int, tuple[str, str]]) -> dict[int, SuperpixelResult]:
        """Run the backend on the whole batch; if it fails, retry image by image to isolate the culprit."""
        try:
            outputs = self.backend([p.image.rgb for p in prepared.values()]) if prepared else []
            return dict(zip(prepared, outputs, strict=True))
        except Exception:  # noqa: BLE001 - isolated below, image by image
            pass
        results = {}
        for image_id, p in prepared.items():
            try:
                results[image_id] = self.backend([p.image.rgb])[0]
            except Exception as exc:  # recorded per image: the rest of the shard is still written
                failures[image_id] = ("superpixels", f"{type(exc).__name__}: {exc}")
        return results
