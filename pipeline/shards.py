"""The shard format (DESIGN §3): sample encoding, the shard writer, and the job's record files.

This module is the one place that knows the bytes on disk, so the trainer decodes through it and
the writer and the reader can never disagree. Shards are byte-deterministic (fixed tar metadata,
sorted JSON, PNG for label maps), written to a temporary name and renamed when complete.

Next to the shards, ``_shards/{name}.json`` records what each finished shard holds (its index
rows, failures and timings): a rerun skips the shards recorded there, and ``manifest.json``,
``failures.jsonl``, ``index.parquet`` and ``timing.json`` are rebuilt from these records at the end
of every run, so they always account for every input image, whichever run wrote which shard.

An output holds one or several REFER datasets. In an output of several, each image is one sample,
written once, holding the refs of every (dataset, split) it serves (a *source*, named
``refcoco/train``; an output of one dataset keeps a sample per split and image, as it always had),
and samples are grouped into shards by the set of sources they serve (:func:`group_name`): one
group per split for one dataset; with several, an image in refcoco train and refcocog val is in a
``refcoco.train_refcocog.val`` shard, so each shard listed for a source holds only images of that
source. The manifest says which sources each shard holds and, per source, how many images,
refs and sentences it has, and how many images serve more than one source.

``manifest.json`` holds only what the bytes of the output depend on, so two runs that wrote the
same shards write the same manifest, byte for byte, and its hash names the dataset. How long the
work took and where (seconds per stage, per worker host and pid) differs on every run, so it goes
to ``timing.json`` instead.

OUT is a local directory or any fsspec URL (``s3://bucket/prefix``): every file goes through
:class:`pipeline.storage.OutputStore`, which makes each one appear whole or not at all.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from pipeline.errors import SvpError
from pipeline.storage import OutputStore, StorageError, read_url

FORMAT_VERSION = 2  # 2: refs name their dataset, shards and index rows their sources
RECORDS_DIR = "_shards"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
TIMING_FILE = "timing.json"
SHARED_KEY_PREFIX = "coco"  # the sample keys of an output of several datasets: the COCO images they share

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("shard", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_superpixels", pa.int32()),
        ("num_refs", pa.int32()),
        ("num_sentences", pa.int32()),
        ("stage", pa.string()),
        ("error", pa.string()),
        # the (dataset, split)s the image serves, with its refs and sentences in each (null if it failed)
        ("sources", pa.list_(pa.struct([("source", pa.string()), ("refs", pa.int32()), ("sentences", pa.int32())]))),
    ]
)


class OutputConfigMismatch(SvpError, RuntimeError):
    """OUT already holds shards made with another configuration; mixing them would corrupt it."""


# ---------------------------------------------------------------------------------------------
# Sample encoding (writer side) and decoding (reader side: the trainer goes through these)


def sample_key(prefix: str, image_id: int) -> str:
    """An image's key: ``prefix`` is :func:`key_prefix` of the output's datasets."""
    return f"{prefix}-{image_id:012d}"


def key_prefix(datasets: Sequence[str]) -> str:
    """The dataset, for an output of one (``refcoco-000000000009``, as ever); ``coco`` for several,
    whose samples are the COCO images they all annotate."""
    return datasets[0] if len(datasets) == 1 else SHARED_KEY_PREFIX


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def source_name(dataset: str, split: str) -> str:
    """How the manifest, the index and the options name one (dataset, split): ``refcoco/train``."""
    return f"{dataset}/{split}"


def group_name(sources: Sequence[tuple[str, str]], several_datasets: bool) -> str:
    """The shard group of a sample serving ``sources`` ((dataset, split) pairs, sorted): what its
    shards' names start with, and its ``split`` in the manifest and the index.

    One dataset: its split (``train``), as ever. Several: ``dataset.split`` of each source joined by
    ``_`` (``refcoco.train_refcoco+.train_refcocog.val``), so that an image is written once and each
    shard that holds a source's images holds no image outside that source (reading a source reads
    nothing else), where grouping by one of the sources would make refcocog val read refcoco train.
    """
    if not several_datasets:
        return "_".join(split for _, split in sources)
    return "_".join(f"{dataset}.{split}" for dataset, split in sources)


def resolve_source(name: str, sources: Collection[str]) -> str | None:
    """``name`` as one of ``sources``, or None: ``dataset/split``, or a bare split where every
    source is of one dataset (``--only-split val`` of a refcoco output is ``refcoco/val``)."""
    if name in sources:
        return name
    datasets = {source.split("/", 1)[0] for source in sources}
    if "/" not in name and len(datasets) == 1:
        full = source_name(next(iter(datasets)), name)
        return full if full in sources else None
    return None


def describe_sources(sources: Collection[str]) -> str:
    """``sources`` for an error message: their splits where they are of one dataset, else their names."""
    datasets = {source.split("/", 1)[0] for source in sources}
    names = [source.split("/", 1)[1] for source in sources] if len(datasets) == 1 else list(sources)
    return ", ".join(sorted(names)) or "none"


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no whitespace): equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_label_map(labels: np.ndarray) -> bytes:
    """uint16 label map → 16-bit grayscale PNG (lossless, and viewable in any image tool)."""
    if labels.dtype != np.uint16 or labels.ndim != 2:
        raise ValueError(f"label map must be 2-D uint16, got {labels.dtype} {labels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_label_map(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.uint16)


def encode_sam_embedding(embedding: np.ndarray) -> bytes:
    """(C, G, G) float16: (256, 64, 64) for SAM; the trainer checks the shape against its own SAM."""
    if embedding.ndim != 3 or embedding.shape[1] != embedding.shape[2]:
        raise ValueError(f"SAM embedding must be (channels, grid, grid), got {embedding.shape}")
    buffer = io.BytesIO()
    np.save(buffer, embedding.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def encode_vision_features(features: np.ndarray) -> bytes:
    """(patches, channels) float16: (256, 768) for DINOv2-base at 224; the manifest says which encoder."""
    if features.ndim != 2:
        raise ValueError(f"vision features must be (patches, channels), got {features.shape}")
    buffer = io.BytesIO()
    np.save(buffer, features.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def decode_stored_array(data: bytes) -> np.ndarray:
    """``sam.npy`` or ``vision.npy``; never unpickles: shards may come from anywhere."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(
    key: str,
    image_bytes: bytes,
    labels: np.ndarray,
    refs: list[dict],
    meta: dict,
    sam_embedding: np.ndarray | None = None,
    vision_features: np.ndarray | None = None,
) -> dict[str, Any]:
    """One image → one WebDataset sample (the original image bytes are kept untouched)."""
    sample = {
        "__key__": key,
        "jpg": image_bytes,
        "spx.png": encode_label_map(labels),
        "refs.json": dumps_json(refs),
        "meta.json": dumps_json(meta),
    }
    if sam_embedding is not None:
        sample["sam.npy"] = encode_sam_embedding(sam_embedding)
    if vision_features is not None:
        sample["vision.npy"] = encode_vision_features(vision_features)
    return sample


# ---------------------------------------------------------------------------------------------
# Shard files


@dataclass(frozen=True)
class ShardFile:
    """A complete shard on disk, as listed in the manifest."""

    name: str
    split: str
    samples: int
    bytes: int
    sha256: str


def write_shard(out_dir: str | Path, name: str, split: str, samples: Iterable[dict[str, Any]]) -> ShardFile:
    """Write samples to ``name`` in OUT (a directory or an fsspec URL): a shard is whole or absent.

    The sha256 is computed on the bytes as they are written, so the shard is never read back.
    Raises :class:`pipeline.storage.StorageError` if the shard cannot be stored.
    """
    count = 0
    with OutputStore(out_dir).create(name) as stream:
        hashing = _HashingWriter(stream)
        writer = wds.TarWriter(hashing, encoder=False, mtime=0.0, user="svp", group="svp")
        for sample in samples:
            writer.write(sample)
            count += 1
        writer.close()
    return ShardFile(name=name, split=split, samples=count, bytes=hashing.size, sha256=hashing.digest.hexdigest())


class _HashingWriter:
    """A write-only stream (all ``tarfile`` needs in stream mode) that hashes what passes through."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.stream.write(data)

    def close(self) -> None:  # the caller's ``with`` closes the file
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Per-shard records, resume, and the job-level outputs


@dataclass
class ShardRecord:
    """What one unit of work produced: the shard file (None if every image failed) and one
    index row per input image, written or failed. Persisted as ``_shards/{name}.json``."""

    name: str
    split: str
    file: ShardFile | None
    rows: list[dict]
    seconds: dict[str, float] = field(default_factory=dict)
    worker: dict = field(default_factory=dict)
    segmented: int = 0  # images handed to the superpixel backend (a retried image counts again)

    @property
    def written(self) -> int:
        return sum(row["status"] == "written" for row in self.rows)

    @property
    def failed(self) -> int:
        return sum(row["status"] == "failed" for row in self.rows)


def index_row(
    *,
    key: str,
    image_id: int,
    file_name: str,
    split: str,
    shard: str | None,
    height: int | None = None,
    width: int | None = None,
    num_superpixels: int | None = None,
    num_refs: int | None = None,
    num_sentences: int | None = None,
    stage: str | None = None,
    error: str | None = None,
    sources: Sequence[dict] = (),
) -> dict:
    """One ``index.parquet`` row; ``error`` set ⇔ the image failed at ``stage``. ``sources``: a
    ``{"source", "refs", "sentences"}`` per (dataset, split) the image serves."""
    return {
        "key": key,
        "image_id": image_id,
        "file_name": file_name,
        "split": split,
        "status": "failed" if error is not None else "written",
        "shard": shard if error is None else None,
        "height": height,
        "width": width,
        "num_superpixels": num_superpixels,
        "num_refs": num_refs,
        "num_sentences": num_sentences,
        "stage": stage,
        "error": error,
        "sources": list(sources),
    }


def failed_row(*, prefix: str, image_id: int, file_name: str, split: str, stage: str, error: str,
               sources: Iterable[str]) -> dict:
    """The index row of an image that is in no shard: it failed at ``stage`` (its annotations, its
    bytes, the backend, or its whole shard), for the reason ``error``. ``prefix``: its key's
    (:func:`key_prefix`); ``sources``: the (dataset, split)s it would have served."""
    return index_row(key=sample_key(prefix, image_id), image_id=image_id, file_name=file_name, split=split,
                     shard=None, stage=stage, error=error,
                     sources=[{"source": source, "refs": None, "sentences": None} for source in sources])


def save_record(out_dir: str | Path, record: ShardRecord) -> None:
    OutputStore(out_dir).write_bytes(f"{RECORDS_DIR}/{record.name}.json", dumps_json(asdict(record)))


def load_complete_records(out_dir: str | Path, names: Iterable[str]) -> dict[str, ShardRecord]:
    """The records of the shards among ``names`` that are complete in OUT (the others: recompute).

    One listing of OUT says which records exist and how large every shard is; only the records
    that exist are read, together. Against an object store that is a few LIST requests and one GET
    per existing record, where checking shard by shard cost a GET and a HEAD per shard (and more
    for each missing one). A record that cannot be read or parsed, or whose shard is absent or of
    another size (cut short), does not count: that shard is recomputed.
    """
    store = OutputStore(out_dir)
    sizes = store.listing()
    wanted = {f"{RECORDS_DIR}/{name}.json": name for name in names}
    present = [path for path in wanted if path in sizes]
    found = store.read_many(present, nbytes=sum(sizes[path] for path in present))
    records = {}
    for path, data in found.items():
        record = _parse_record(data) if data is not None else None
        if record is not None and (record.file is None or sizes.get(record.file.name) == record.file.bytes):
            records[wanted[path]] = record
    return records


def _parse_record(data: bytes) -> ShardRecord | None:
    """A stored ``_shards/{name}.json`` record, or None if it is not one (a damaged file)."""
    try:
        fields = json.loads(data)
        file = ShardFile(**fields["file"]) if fields.get("file") else None
        return ShardRecord(name=fields["name"], split=fields["split"], file=file, rows=fields["rows"],
                           seconds=fields.get("seconds", {}), worker=fields.get("worker", {}),
                           segmented=fields.get("segmented", 0))
    except (ValueError, TypeError, KeyError):
        return None


def claim_output_dir(out_dir: str | Path, config: dict) -> str:
    """Create OUT for ``config`` or check that it already belongs to it; return the config hash.

    Temporaries left by an interrupted run (a shard half-written when the job was killed) are
    removed: their shards have no record, so this run writes them again.
    """
    config_hash = hashlib.sha256(dumps_json({"format": FORMAT_VERSION, **config})).hexdigest()[:16]
    store = OutputStore(out_dir)
    store.makedirs(RECORDS_DIR)
    try:
        existing = json.loads(store.read_bytes(CONFIG_FILE))
    except FileNotFoundError:
        store.write_bytes(CONFIG_FILE, dumps_json({"config": config, "config_hash": config_hash}))
    else:
        if existing.get("config_hash") != config_hash:
            raise OutputConfigMismatch(
                f"{store} holds shards of config {existing.get('config_hash')}, but this run is config "
                f"{config_hash}; shards of two configs must not mix. Use a new --out, or rerun with the "
                f"same options (stored in {store.url_of(CONFIG_FILE)})."
            )
    store.remove_temporaries(RECORDS_DIR)
    return config_hash


def write_job_outputs(out_dir: str | Path, records: list[ShardRecord], extra_rows: list[dict],
                      config: dict, config_hash: str, pending: int = 0) -> dict:
    """Rebuild ``manifest.json``, ``failures.jsonl``, ``index.parquet`` and ``timing.json`` from
    every shard record.

    ``extra_rows`` are images that failed before they reached a shard (malformed annotations);
    ``pending`` counts the input images no run has processed yet (left out by ``--limit`` or
    ``--only-split``), so that ``images_total`` is always the whole input. Returns the manifest:
    ``samples_by_split`` counts the samples of each shard group (each split, for one dataset),
    ``sources`` the images (written and failed), refs and sentences of each (dataset, split), and
    ``overlaps`` the written images that two sources share (``refcoco/train & refcocog/val``), of
    which ``images_in_several_sources`` counts each image once. Each shard lists the images it
    holds per source.
    """
    rows = [row for record in records for row in record.rows] + list(extra_rows)
    rows.sort(key=lambda row: (row["split"], row["image_id"]))
    failed = [row for row in rows if row["status"] == "failed"]
    written = [row for row in rows if row["status"] == "written"]
    samples_by_split = Counter(row["split"] for row in written)
    shards = sorted(({**asdict(r.file), "sources": _source_images(r.rows)} for r in records if r.file is not None),
                    key=lambda s: s["name"])
    served: dict[int, set[str]] = defaultdict(set)  # by image: one image may be two rows (refcocog google)
    for row in written:
        served[row["image_id"]].update(entry["source"] for entry in row["sources"])
    overlaps = Counter(" & ".join(pair) for sources in served.values()
                       for pair in itertools.combinations(sorted(sources), 2))
    manifest = {
        "format_version": FORMAT_VERSION,
        "images_total": len(rows) + pending,
        "images_written": len(written),
        "images_failed": len(failed),
        "images_pending": pending,
        "samples_by_split": dict(sorted(samples_by_split.items())),
        "sources": _source_counts(rows),
        "images_in_several_sources": sum(len(sources) > 1 for sources in served.values()),
        "overlaps": dict(sorted(overlaps.items())),
        "shards": shards,
        "config": config,
        "config_hash": config_hash,
    }
    store = OutputStore(out_dir)
    store.write_bytes(MANIFEST_FILE, _pretty_json(manifest))
    store.write_bytes(TIMING_FILE, _pretty_json(stage_timing(records)))
    failures = "".join(
        json.dumps({k: row[k] for k in ("image_id", "file_name", "split", "stage", "error")}) + "\n"
        for row in failed
    )
    store.write_bytes("failures.jsonl", failures.encode())
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), buffer)
    store.write_bytes("index.parquet", buffer.getvalue())
    return manifest


def _source_images(rows: Iterable[dict]) -> dict[str, int]:
    """Written images per source among ``rows``."""
    counts = Counter(entry["source"] for row in rows if row["status"] == "written" for entry in row["sources"])
    return dict(sorted(counts.items()))


def _source_counts(rows: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Per source: images written and failed, and the refs and sentences of the written ones."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for entry in row["sources"]:
            count = counts.setdefault(entry["source"], {"images": 0, "failed": 0, "refs": 0, "sentences": 0})
            if row["status"] == "written":
                count["images"] += 1
                count["refs"] += entry["refs"]
                count["sentences"] += entry["sentences"]
            else:
                count["failed"] += 1
    return dict(sorted(counts.items()))


def _pretty_json(obj: Any) -> bytes:
    """The job-level files people read: indented, keys sorted (equal content, equal bytes)."""
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def stage_timing(records: Iterable[ShardRecord]) -> dict:
    """Seconds per stage, per worker (``host:pid``) and in total, with the shards and images behind them
    and the images the superpixel backend ran on (``segmented``).

    What ``timing.json`` holds. Built from the records alone (never from this run's clock), so it
    accounts for every shard in OUT, whichever run wrote it; a shard whose worker kept dying has
    no times and is left out.
    """
    per_worker: dict[str, dict] = {}
    total = _timing_entry()
    for record in records:
        if not record.worker:
            continue
        worker = f"{record.worker['host']}:{record.worker['pid']}"
        for entry in (per_worker.setdefault(worker, _timing_entry()), total):
            entry["shards"] += 1
            entry["images"] += len(record.rows)
            entry["segmented"] += record.segmented
            for stage, seconds in record.seconds.items():
                entry["seconds"][stage] = entry["seconds"].get(stage, 0.0) + seconds
    for entry in (*per_worker.values(), total):
        entry["seconds"] = {stage: round(seconds, 3) for stage, seconds in sorted(entry["seconds"].items())}
    return {"per_worker": dict(sorted(per_worker.items())), "total": total}


def _timing_entry() -> dict:
    return {"shards": 0, "images": 0, "segmented": 0, "seconds": {}}


# ---------------------------------------------------------------------------------------------
# Reading a written dataset back (local directory or any fsspec URL prefix)


class ManifestError(SvpError, ValueError):
    """The shard root has no usable manifest, or lacks what was asked of it."""


class ManifestNotFound(ManifestError):
    """The shard root holds no such file: it is not (or not yet) a directory written by ``svp precompute``."""


def read_manifest(root: str | Path) -> dict:
    """``manifest.json`` of a shard root: a local directory or an fsspec URL prefix (s3://...)."""
    return read_manifest_and_sha256(root)[0]


def read_manifest_and_sha256(root: str | Path) -> tuple[dict, str]:
    """The manifest and the sha256 of its bytes as stored: what a training run records to name the
    dataset it read."""
    data = _read_job_file(root, MANIFEST_FILE)
    return _parse_job_file(root, MANIFEST_FILE, data), hashlib.sha256(data).hexdigest()


def read_timing(root: str | Path) -> dict:
    """``timing.json`` of a shard root: seconds per stage, per worker and in total (:func:`stage_timing`)."""
    return _parse_job_file(root, TIMING_FILE, _read_job_file(root, TIMING_FILE))


def job_file_url(root: str | Path, name: str) -> str:
    """Where a job file (``manifest.json``, ...) or a shard of a shard root is: ``root/name``."""
    return f"{str(root).rstrip('/')}/{name}"


def _read_job_file(root: str | Path, name: str) -> bytes:
    url = job_file_url(root, name)
    try:
        return read_url(url)
    except FileNotFoundError:
        raise ManifestNotFound(f"{url} not found: is {root} a directory written by `svp precompute`?") from None
    except StorageError as exc:  # it names the URL and why
        raise ManifestError(str(exc)) from None


def _parse_job_file(root: str | Path, name: str, data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ManifestError(f"cannot read {job_file_url(root, name)}: {exc}") from None


def split_shard_urls(root: str | Path, manifest: dict, split: str) -> list[str]:
    """The shard URLs of one split (shard group), as the manifest lists them (an unknown or empty split
    is an error). The shards of an output of several datasets are read by source: :func:`source_shard_urls`."""
    urls = [job_file_url(root, s["name"]) for s in manifest["shards"] if s["split"] == split]
    if not urls:
        present = sorted(manifest.get("samples_by_split", {}))
        sources = manifest.get("sources", {})
        several = len({source.split("/", 1)[0] for source in sources}) > 1
        hint = f"; it holds several datasets, read by (dataset, split): {', '.join(sources)}" if several else ""
        raise ManifestError(f"split {split!r} has no shards in {root}; splits present: {', '.join(present) or 'none'}"
                            f"{hint}")
    return urls


def source_shard_urls(root: str | Path, manifest: dict, source: str) -> list[str]:
    """The URLs of the shards that hold images of ``source`` (``refcoco/val``, or a bare split in an
    output of one dataset), in manifest order. Their samples may hold other sources' refs too: a
    reader keeps the refs of ``source`` (``trainer.data.make_loader(sources=...)`` does)."""
    name = resolve_source(source, manifest.get("sources", {}))
    if name is None:
        raise ManifestError(f"{root} holds no images of {source!r}; it holds "
                            f"{describe_sources(manifest.get('sources', {}))}")
    urls = [job_file_url(root, s["name"]) for s in manifest["shards"] if name in s.get("sources", {})]
    if not urls:
        raise ManifestError(f"{source!r} has no written image in {root}: every one failed (failures.jsonl says why)")
    return urls
