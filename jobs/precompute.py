"""``svp precompute`` / ``python -m jobs.precompute``: REFER root → superpixel WebDataset shards on Ray.

Everything that can be checked is checked on the driver before any worker starts (dataset and
split names, SAM checkpoint, GPUs, an OUT that belongs to another config). Each shard is one
task on an actor that holds one model; actors are restarted and their task retried if a worker
dies. A rerun with the same options skips the shards that are complete and finishes the rest.
OUT may be a local directory or an object-store URL (s3://bucket/prefix, any fsspec URL); a shard
that cannot be stored there, even after retries, is reported as failed and redone by a rerun.

``--dataset refcoco,refcoco+,refcocog`` makes one output of several datasets: they annotate the
same COCO images, and each image is decoded, segmented (and its SAM embedding stored) once, its
sample holding the refs of every (dataset, split) that refers to it (see :mod:`pipeline.shards`).

``--limit`` and ``--only-split`` process part of the input (a dry run) without changing the
output's config: a later run into the same OUT without them keeps what is complete and does the
rest. The job ends by saying where this run's worker time went, per stage and per worker;
OUT/timing.json keeps the same for every shard in OUT, and manifest.json holds nothing that
differs between two runs that wrote the same shards.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from jobs import entry, options, ray_cluster
from jobs.options import OptionError
from pipeline.hashing import file_sha256
from pipeline.partition import PartitionConfig
from pipeline.precompute import (
    OutputSpec,
    ShardProcessor,
    ShardTask,
    covers,
    failed_shard,
    plan_shards,
    problem_rows,
    select,
)
from pipeline.refer import DATASETS, load_refer, refer_images
from pipeline.shards import (
    ShardRecord,
    claim_output_dir,
    load_complete_records,
    save_record,
    stage_timing,
    write_job_outputs,
)
from pipeline.storage import OutputStore, StorageError, StorageSettings, StoreNotAnswering, storage_env
from pipeline.superpixels import BACKENDS
from pipeline.superpixels.base import BackendConfigError, SamOptions
from pipeline.superpixels.spec import BackendSpec
from pipeline.timing import STAGES, throughput
from pipeline.vision_model import VisionOptions


@dataclass(frozen=True)
class PrecomputeOptions:
    """What to read, where the shards go, which backend makes the superpixels, and how much of the
    input one run does (--only-split and --limit: dry runs)."""

    refer_root: Path = field(metadata={"help": (
        "REFER root: holds {dataset}/refs({split_by}).p, {dataset}/instances.json and "
        "images/mscoco/images/train2014/")})
    dataset: str = field(metadata={"help": (
        f"which REFER dataset to read ({', '.join(DATASETS)}), or several comma-separated "
        "(refcoco,refcoco+,refcocog): one output in which each image is segmented and written once, with the refs "
        "of every dataset")})
    out: str = field(metadata={"help": (
        "output directory or object-store prefix (s3://bucket/prefix, or any fsspec URL; credentials and endpoint "
        "from AWS_* variables or fsspec's config) for {split}-{shard:06d}.tar shards, manifest.json, "
        "failures.jsonl, index.parquet; rerunning into the same OUT resumes")})
    split_by: str | None = field(default=None, metadata={"help": (
        "REFER split of each --dataset, comma-separated in the same order: unc or google for refcoco, unc for "
        "refcoco+, umd or google for refcocog; omitted: " + ", ".join(
            f"{split_bys[0]} for {dataset}" for dataset, split_bys in DATASETS.items()))})
    shard_size: int = field(default=64, metadata={"help": "images per shard (one unit of work)"})
    backend: str = field(default="sam", metadata={"choices": tuple(BACKENDS), "help": (
        "sam: SAM automatic masks (the method; needs --sam-checkpoint). felzenszwalb / slic: classical CPU-only "
        "colour superpixels for laptops, demos and tests, not the method")})
    only_split: str | None = field(default=None, metadata={"metavar": "NAME", "help": (
        "process only the shards holding images of this split (e.g. val; dataset/split, e.g. refcocog/val, with "
        "several --dataset); a name the output lacks is refused with the list of its splits")})
    limit: int | None = field(default=None, metadata={"metavar": "N", "help": (
        "process only the first N images in (shard group, image_id) order, after --only-split. Neither option changes "
        "the output's config: rerunning into the same --out without them keeps the complete shards and processes "
        "the rest; the manifest counts what is left as images_pending")})
    workers: int = field(default=1, metadata={"help": "number of Ray actors, each holding one model"})


OPTIONS = (PrecomputeOptions, PartitionConfig, SamOptions, VisionOptions, ray_cluster.RayOptions)
RECIPES = True


def backend_spec(args: argparse.Namespace) -> BackendSpec:
    """The backend the options name, with SAM's options where SAM runs (as the backend, or for the
    embeddings stored beside another one), and the vision encoder's where its features are stored."""
    backend, sam, vision = args.backend, options.build(SamOptions, args), options.build(VisionOptions, args)
    uses_sam = backend == "sam" or sam.store_sam_embeddings
    return BackendSpec(backend, options.build(PartitionConfig, args), sam if uses_sam else None,
                       vision if vision != VisionOptions() else None)


def inputs(given: PrecomputeOptions) -> list[tuple[str, str]]:
    """The (dataset, split_by) pairs that --dataset and --split-by name, sorted by dataset, so that the
    order they are given in changes neither the output nor its config."""
    datasets = [name.strip() for name in given.dataset.split(",")]
    for name in datasets:
        if name not in DATASETS:
            raise OptionError(f"argument --dataset: invalid choice: {name!r} (choose from {', '.join(DATASETS)})")
    if len(set(datasets)) < len(datasets):
        raise OptionError(f"--dataset names a dataset twice: {given.dataset}")
    if given.split_by is None:
        split_bys = [DATASETS[name][0] for name in datasets]
    else:
        split_bys = [name.strip() for name in given.split_by.split(",")]
        if len(split_bys) != len(datasets):
            raise OptionError(f"--split-by {given.split_by} names {len(split_bys)} splits for {len(datasets)} "
                              f"datasets; give one per --dataset, in its order, or none for the defaults")
    return sorted(zip(datasets, split_bys, strict=True))


def run(args: argparse.Namespace) -> int:
    given = options.build(PrecomputeOptions, args)
    if given.workers < 1:
        raise BackendConfigError(f"--workers must be >= 1, got {given.workers}")
    refers = [load_refer(given.refer_root, dataset, split_by) for dataset, split_by in inputs(given)]
    datasets = tuple(refer.dataset for refer in refers)
    spec = backend_spec(args)
    spec.validate()
    config = {
        "dataset": ",".join(datasets),
        "split_by": ",".join(refer.split_by for refer in refers),
        "refs_sha256": {refer.dataset: file_sha256(refer.refs_path) for refer in refers},
        "instances_sha256": {refer.dataset: file_sha256(refer.instances_path) for refer in refers},
        "shard_size": given.shard_size,
        "store_sam_embeddings": spec.stores_sam_embeddings,
        **spec.config(),
    }
    images, problems = refer_images(refers)
    tasks = plan_shards(images, given.shard_size, datasets)
    selected = select(tasks, given.only_split, given.limit)
    config_hash = claim_output_dir(given.out, config)
    finished = load_complete_records(given.out, [t.name for t in tasks])
    todo = [t for t in selected if not covers(finished.get(t.name), t)]
    gpus = _connect_ray(given.workers, options.build(ray_cluster.RayOptions, args)) if todo else 0.0

    skipped = len(selected) - len(todo)
    if skipped:
        print(f"resume: {skipped} of {len(selected)} shards already complete in {given.out}, skipping them",
              file=sys.stderr)
    output = OutputSpec(given.out, refers[0].image_dir, datasets, {r.dataset: r.categories for r in refers},
                        config_hash)

    started = time.perf_counter()
    new_records, stopped = _run_on_ray(todo, spec, output, given.workers, gpus) if todo else ([], None)
    elapsed = time.perf_counter() - started

    records = {**finished, **{record.name: record for record in new_records}}
    pending = sum(len(t.items) for t in tasks) - sum(len(r.rows) for r in records.values())
    try:
        manifest = write_job_outputs(given.out, list(records.values()), problem_rows(datasets, problems),
                                     config, config_hash, pending)
    except StorageError as exc:  # the shards' records are stored: a rerun resumes and writes these again
        if stopped is not None:
            raise StoreNotAnswering(f"{stopped}; the job's records could not be written either: {exc}") from exc
        print(f"svp precompute: error: {exc}", file=sys.stderr)
        return 1
    processed = sum(len(r.rows) for r in new_records)
    print(
        f"precompute: {manifest['images_written']} images written, {manifest['images_failed']} failed"
        f"{f', {pending} pending' if pending else ''} (of {manifest['images_total']}); {len(manifest['shards'])} "
        f"shards ({skipped} skipped as complete); "
        f"{throughput(processed, elapsed)}; out: {given.out}"
    )
    if pending:
        print(f"pending: {pending} images are not processed yet (--limit / --only-split); "
              f"rerun into the same --out without those options to finish")
    if manifest["overlaps"]:
        print(f"{manifest['images_in_several_sources']} images serve more than one (dataset, split): "
              + ", ".join(f"{pair} {count}" for pair, count in manifest["overlaps"].items()))
    for line in _timing_lines(stage_timing(new_records)):
        print(line)
    if stopped is not None:
        raise StoreNotAnswering(f"{stopped}; failures.jsonl lists their images: a rerun into the same --out "
                                f"stores them")
    return 0


def _timing_lines(timing: dict) -> list[str]:
    """Where this run's worker time went: each stage's seconds and share, then each worker's."""
    total = timing["total"]
    spent = sum(total["seconds"].values())
    if not spent:
        return []
    shares = ", ".join(f"{stage} {s:.2f}s ({100 * s / spent:.0f}%)" for stage, s in _in_stage_order(total["seconds"]))
    lines = [f"time by stage (seconds, all workers together): {shares}"]
    for worker, record in timing["per_worker"].items():
        stages = ", ".join(f"{stage} {s:.2f}s" for stage, s in _in_stage_order(record["seconds"]))
        lines.append(f"  worker {worker}: {record['shards']} shards, {record['images']} images: {stages}")
    return lines


def _in_stage_order(seconds: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(seconds.items(), key=lambda item: STAGES.index(item[0]) if item[0] in STAGES else len(STAGES))


def _connect_ray(workers: int, cluster: ray_cluster.RayOptions) -> float:
    """Attach to (or start) Ray and return the GPUs per worker, refusing a request the cluster cannot meet.

    Workers may share a GPU (each holds one model and runs one shard at a time), so by default
    fewer GPUs than workers are shared rather than refused.
    """
    ray_cluster.connect(cluster.address)
    return ray_cluster.gpus_per_worker(cluster.gpus_per_worker, workers, "--workers", share=True)


class ShardOutcome(NamedTuple):
    """What a worker hands back for one shard: its record, and why its upload failed if the store
    gave no answer in time (what the driver counts to tell a store that stopped answering)."""

    record: ShardRecord
    unanswered: str | None = None


def _run_on_ray(tasks: list[ShardTask], spec: BackendSpec, output: OutputSpec, n_workers: int,
                gpus: float) -> tuple[list[ShardRecord], str | None]:
    """The records of ``tasks``, and why the job stopped early, if it did (None: it did not).

    It stops when ``SVP_STORAGE_STALLED_SHARDS`` shards in a row could not be stored because the
    store gave no answer in time: a store that has stopped answering would cost every remaining shard
    its attempts' deadlines, hours for a large job, where it is down to those few shards. No shard is
    sent after that, the ones in flight are abandoned with their workers, and every shard not stored
    gets a failed record (kept out of ``_shards/`` like any failed shard, so that a rerun does it).
    """
    from tqdm import tqdm

    class ShardWorker:
        def __init__(self) -> None:
            self.processor = ShardProcessor(spec, output, device=ray_cluster.worker_device("precompute"))

        def process(self, task: ShardTask) -> ShardOutcome:
            try:
                record = self.processor(task)
                save_record(output.out_dir, record)  # recorded by the worker: a driver crash loses nothing done
            except StorageError as exc:  # not recorded, so a rerun writes this shard again
                return ShardOutcome(failed_shard(task, output.key_prefix, "write", str(exc)),
                                    str(exc) if exc.timed_out else None)
            return ShardOutcome(record)

    env = {} if OutputStore(output.out_dir).local else storage_env()
    limit = StorageSettings.from_env().stalled_shards
    records, unanswered = [], []
    results = ray_cluster.on_actors(
        ShardWorker, "process", tasks, n_workers, gpus, env,
        lambda task, reason: ShardOutcome(failed_shard(task, output.key_prefix, "worker", reason)))
    with contextlib.closing(results), tqdm(total=len(tasks), unit="shard", desc="precompute",
                                           file=sys.stderr) as progress:
        for outcome in results:
            records.append(outcome.record)
            unanswered = [*unanswered, outcome.unanswered] if outcome.unanswered else []
            progress.set_postfix(written=sum(r.written for r in records), failed=sum(r.failed for r in records))
            progress.update()
            if len(unanswered) >= limit:
                break
        else:
            return records, None
    done = {record.name for record in records}
    missing = [task for task in tasks if task.name not in done]
    stopped = (f"the store {output.out_dir} is not answering: {len(unanswered)} shards in a row could not be stored "
               f"in time (SVP_STORAGE_STALLED_SHARDS; the last: {unanswered[-1]}); the job stopped there, leaving "
               f"{len(missing)} more of its {len(tasks)} shards undone")
    reason = f"not stored: the job stopped, the store {output.out_dir} not answering"
    return records + [failed_shard(task, output.key_prefix, "write", reason) for task in missing], stopped


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
