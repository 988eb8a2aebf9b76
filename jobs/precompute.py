"""``svp precompute`` / ``python -m jobs.precompute``: REFER root → superpixel WebDataset shards on Ray.

Everything that can be checked is checked on the driver before any worker starts (dataset and
split names, SAM checkpoint, GPUs, an OUT that belongs to another config). Each shard is one
task on an actor that holds one model; actors are restarted and their task retried if a worker
dies. A rerun with the same options skips the shards that are complete and finishes the rest.
OUT may be a local directory or an object-store URL (s3://bucket/prefix, any fsspec URL); a shard
that cannot be stored there, even after retries, is reported as failed and redone by a rerun.

``--limit`` and ``--only-split`` process part of the input (a dry run) without changing the
output's config: a later run into the same OUT without them keeps what is complete and does the
rest. The job ends by saying where this run's worker time went, per stage and per worker;
OUT/timing.json keeps the same for every shard in OUT, and manifest.json holds nothing that
differs between two runs that wrote the same shards.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

from jobs import entry, ray_cluster
from pipeline.partition import PartitionConfig
from pipeline.precompute import (
    OutputSpec,
    ShardProcessor,
    ShardTask,
    covers,
    plan_shards,
    problem_rows,
    select,
)
from pipeline.refer import DATASETS, ReferError, load_refer
from pipeline.shards import (
    OutputConfigMismatch,
    ShardRecord,
    claim_output_dir,
    index_row,
    load_complete_records,
    sample_key,
    save_record,
    stage_timing,
    write_job_outputs,
)
from pipeline.storage import OutputStore, StorageError, storage_env
from pipeline.superpixels.base import (
    BACKENDS,
    BackendConfigError,
    BackendSpec,
    SamOptions,
    file_sha256,
)
from pipeline.superpixels.sam import SAM_MODEL_TYPES
from pipeline.timing import STAGES

ACTOR_MAX_RESTARTS = -1  # a dead worker is always replaced ...
TASK_MAX_RETRIES = 2  # ... but a shard that kills its worker three times is recorded as failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("input")
    data.add_argument("--refer-root", required=True, type=Path,
                      help="REFER root: holds {dataset}/refs({split_by}).p, {dataset}/instances.json and "
                           "images/mscoco/images/train2014/")
    data.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="which REFER dataset to read")
    data.add_argument("--split-by", required=True,
                      help="REFER split: unc or google for refcoco, unc for refcoco+, umd or google for refcocog")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True,
                     help="output directory or object-store prefix (s3://bucket/prefix, or any fsspec URL; "
                          "credentials and endpoint from AWS_* variables or fsspec's config) for "
                          "{split}-{shard:06d}.tar shards, manifest.json, failures.jsonl, index.parquet; "
                          "rerunning into the same OUT resumes")
    out.add_argument("--shard-size", type=int, default=64, help="images per shard (one unit of work); default 64")
    sp = parser.add_argument_group("superpixels")
    sp.add_argument("--backend", choices=BACKENDS, default="sam",
                    help="sam: SAM automatic masks (the method; needs --sam-checkpoint). felzenszwalb / slic: "
                         "classical CPU-only colour superpixels for laptops, demos and tests, not the method")
    sp.add_argument("--sam-checkpoint", type=Path, help="official SAM .pth (e.g. sam_vit_h_4b8939.pth), or a tiny one "
                    "from `svp tiny-sam`; never downloaded. Must be readable on every worker node")
    sp.add_argument("--sam-model", choices=SAM_MODEL_TYPES, default="vit_h",
                    help="architecture of --sam-checkpoint (tiny: random small SAM for tests/CPU); default vit_h")
    sp.add_argument("--points-per-side", type=int, default=32, help="SAM point grid per side; default 32")
    sp.add_argument("--pred-iou-thresh", type=float, default=0.88, help="SAM predicted-IoU filter; default 0.88")
    sp.add_argument("--stability-score-thresh", type=float, default=0.95, help="SAM stability filter; default 0.95")
    sp.add_argument("--stability-score-offset", type=float, default=1.0,
                    help="logit offset of SAM's stability score; default 1.0")
    sp.add_argument("--box-nms-thresh", type=float, default=0.7, help="box NMS IoU between SAM masks; default 0.7")
    sp.add_argument("--sam-batch-images", type=int, default=4, help="images per SAM encoder batch; default 4")
    sp.add_argument("--store-sam-embeddings", action="store_true",
                    help="also write sam.npy (float16 256x64x64 SAM image embedding; with --backend sam from the "
                         "same SAM pass, with a classical backend from SAM's encoder alone; needs --sam-checkpoint) "
                         "so that training skips the SAM encoder")
    sp.add_argument("--min-area", type=int, default=100,
                    help="superpixels smaller than this many pixels merge into their largest neighbour; default 100")
    sp.add_argument("--max-superpixels", type=int, default=256,
                    help="upper bound on superpixels (= visual tokens) per image; the smallest merge first; default 256")
    part = parser.add_argument_group("part of the input (dry runs)")
    part.add_argument("--only-split", metavar="NAME",
                      help="process only the images of this split (e.g. val); a name the dataset lacks is refused "
                           "with the list of its splits")
    part.add_argument("--limit", type=int, metavar="N",
                      help="process only the first N images in (split, image_id) order, after --only-split. Neither "
                           "option changes the output's config: rerunning into the same --out without them keeps the "
                           "complete shards and processes the rest; the manifest counts what is left as images_pending")
    run = parser.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=1, help="number of Ray actors, each holding one model; default 1")
    run.add_argument("--gpus-per-worker", type=float, default=None,
                     help="GPUs per actor; default 1 where the cluster has a GPU per worker, an equal share where it "
                          "has fewer (e.g. 0.5 for 2 workers on 1 GPU), 0 (CPU) where it has none")
    run.add_argument("--address", default=None,
                     help="Ray cluster address ('auto' attaches to a running cluster, as under `ray job submit`); "
                          "omitted: start a local Ray")


def backend_spec(args: argparse.Namespace) -> BackendSpec:
    sam = None
    if args.backend == "sam" or args.store_sam_embeddings:
        sam = SamOptions(
            checkpoint=str(args.sam_checkpoint) if args.sam_checkpoint else "",
            model_type=args.sam_model,
            points_per_side=args.points_per_side,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            stability_score_offset=args.stability_score_offset,
            box_nms_thresh=args.box_nms_thresh,
            images_per_batch=args.sam_batch_images,
            store_embeddings=args.store_sam_embeddings,
        )
    return BackendSpec(args.backend, PartitionConfig(args.min_area, args.max_superpixels), sam)


def run(args: argparse.Namespace) -> int:
    try:
        if args.workers < 1:
            raise BackendConfigError(f"--workers must be >= 1, got {args.workers}")
        refer = load_refer(args.refer_root, args.dataset, args.split_by)
        spec = backend_spec(args)
        spec.validate()
        config = {
            "dataset": args.dataset,
            "split_by": args.split_by,
            "refs_sha256": file_sha256(refer.refs_path),
            "instances_sha256": file_sha256(refer.instances_path),
            "shard_size": args.shard_size,
            "store_sam_embeddings": spec.stores_sam_embeddings,
            **spec.config(),
        }
        tasks = plan_shards(refer.samples, args.shard_size)
        selected = select(tasks, args.only_split, args.limit)
        config_hash = claim_output_dir(args.out, config)
        finished = load_complete_records(args.out, [t.name for t in tasks])
        todo = [t for t in selected if not covers(finished.get(t.name), t)]
        gpus = _connect_ray(args) if todo else 0.0
    except (ReferError, BackendConfigError, OutputConfigMismatch, StorageError, ValueError) as exc:
        print(f"svp precompute: error: {exc}", file=sys.stderr)
        return 2

    skipped = len(selected) - len(todo)
    if skipped:
        print(f"resume: {skipped} of {len(selected)} shards already complete in {args.out}, skipping them",
              file=sys.stderr)
    output = OutputSpec(args.out, refer.image_dir, args.dataset, refer.categories, config_hash)

    started = time.perf_counter()
    new_records = _run_on_ray(todo, spec, output, args.workers, gpus) if todo else []
    elapsed = time.perf_counter() - started

    records = {**finished, **{record.name: record for record in new_records}}
    pending = sum(len(t.items) for t in tasks) - sum(len(r.rows) for r in records.values())
    try:
        manifest = write_job_outputs(args.out, list(records.values()), problem_rows(args.dataset, refer.problems),
                                     config, config_hash, pending)
    except StorageError as exc:  # the shards' records are stored: a rerun resumes and writes these again
        print(f"svp precompute: error: {exc}", file=sys.stderr)
        return 1
    processed = sum(len(r.rows) for r in new_records)
    print(
        f"precompute: {manifest['images_written']} images written, {manifest['images_failed']} failed"
        f"{f', {pending} pending' if pending else ''} (of {manifest['images_total']}); {len(manifest['shards'])} "
        f"shards ({skipped} skipped as complete); "
        f"{processed / elapsed if processed and elapsed else 0.0:.1f} images/s; out: {args.out}"
    )
    if pending:
        print(f"pending: {pending} images are not processed yet (--limit / --only-split); "
              f"rerun into the same --out without those options to finish")
    for line in _timing_lines(stage_timing(new_records)):
        print(line)
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


def _connect_ray(args: argparse.Namespace) -> float:
    """Attach to (or start) Ray and return the GPUs per worker, refusing a request the cluster cannot meet.

    Workers may share a GPU (each holds one model and runs one shard at a time), so by default
    fewer GPUs than workers are shared rather than refused.
    """
    ray_cluster.connect(args.address)
    return ray_cluster.gpus_per_worker(args.gpus_per_worker, args.workers, "--workers", share=True)


def _worker_device() -> str:
    """CUDA where Ray gave this worker a GPU that torch can use, else the CPU.

    Ray's GPUs are declared resources: a node started with ``--num-gpus`` (or ``ray.init(num_gpus=)``)
    may advertise GPUs that torch cannot see (no driver, a test's declared GPU). Such a worker
    says so and runs on the CPU instead of failing every shard on CUDA.
    """
    import ray
    import torch

    assigned = ray.get_gpu_ids()
    if not assigned:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs: cuda:0 is this worker's
    print(f"precompute worker: Ray assigned GPU {assigned} but torch sees no CUDA device here; running on the CPU",
          file=sys.stderr)
    return "cpu"


def _run_on_ray(tasks: list[ShardTask], spec: BackendSpec, output: OutputSpec, n_workers: int, gpus: float) -> list[ShardRecord]:
    import ray
    from tqdm import tqdm

    @ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=TASK_MAX_RETRIES)
    class ShardWorker:
        def __init__(self) -> None:
            self.processor = ShardProcessor(spec, output, device=_worker_device())

        def process(self, task: ShardTask) -> ShardRecord:
            try:
                record = self.processor(task)
                save_record(output.out_dir, record)  # recorded by the worker: a driver crash loses nothing done
            except StorageError as exc:  # not recorded, so a rerun writes this shard again
                return _failed_shard(task, output.dataset, "write", str(exc))
            return record

    # Workers of a running cluster do not inherit the driver's environment: give them its storage settings.
    env = {} if OutputStore(output.out_dir).local else storage_env()
    options = {"runtime_env": {"env_vars": env}} if env else {}
    workers = [ShardWorker.options(**options).remote() for _ in range(min(n_workers, len(tasks)))]
    pending, in_flight, records = deque(tasks), {}, []

    def submit(worker) -> None:
        if pending:
            task = pending.popleft()
            in_flight[worker.process.remote(task)] = (worker, task)

    for worker in workers:
        submit(worker)
    with tqdm(total=len(tasks), unit="shard", desc="precompute", file=sys.stderr) as progress:
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            worker, task = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                reason = (f"worker failed {TASK_MAX_RETRIES + 1} times on this shard: "
                          f"{type(exc).__name__}: {str(exc)[:300]}")
                record = _failed_shard(task, output.dataset, "worker", reason)
            records.append(record)
            progress.set_postfix(written=sum(r.written for r in records), failed=sum(r.failed for r in records))
            progress.update()
            submit(worker)
    for worker in workers:
        ray.kill(worker)
    return records


def _failed_shard(task: ShardTask, dataset: str, stage: str, reason: str) -> ShardRecord:
    """A shard that could not be finished (its worker kept dying, or it could not be stored): every
    image is reported with the reason, and the record is not saved, so a rerun retries the shard."""
    rows = [
        index_row(key=sample_key(dataset, item.image.image_id), image_id=item.image.image_id,
                  file_name=item.image.file_name, split=task.split, shard=task.name, stage=stage, error=reason)
        for item in task.items
    ]
    return ShardRecord(name=task.name, split=task.split, file=None, rows=rows)


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
