"""The precompute job end to end on local Ray: output format, bad input, resume, killed workers."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from jobs.precompute import main as precompute
from pipeline.precompute import plan_shards, select
from pipeline.refer import load_refer, load_refs_pickle, ref_mask, refer_images
from pipeline.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"__key__", "jpg", "spx.png", "refs.json", "meta.json"}


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--refer-root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--out", str(out), *extra]


def _samples(out: Path) -> dict[str, dict]:
    shards = sorted(str(p) for p in out.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def _check_partition(labels: np.ndarray, height: int, width: int, min_area: int = 100, max_regions: int = 256):
    assert labels.dtype == np.uint16 and labels.shape == (height, width)
    areas = np.bincount(labels.ravel())
    assert areas.min() > 0, "labels must be 0..K-1 contiguous"
    assert len(areas) <= max_regions
    if labels.size >= min_area:
        assert areas.min() >= min_area


def _refcoco_plan(root: Path, shard_size: int):
    return plan_shards(refer_images([load_refer(root, "refcoco", "unc")])[0], shard_size, ["refcoco"])


def _sha256s(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _check_timing(out: Path, stages: set[str], max_workers: int) -> None:
    """Every shard record says where its time went, and timing.json sums exactly those records."""
    manifest = _manifest(out)
    records = [json.loads(p.read_text()) for p in (out / "_shards").glob("*.json")]
    assert records and all(set(r["seconds"]) == stages and min(r["seconds"].values()) >= 0 for r in records)
    assert "timing" not in manifest, "the manifest holds nothing that differs between identical runs"
    timing = json.loads((out / "timing.json").read_text())
    assert timing["total"]["shards"] == len(records) and timing["total"]["images"] == manifest["images_total"]
    assert 1 <= len(timing["per_worker"]) <= max_workers
    for stage in stages:
        per_worker = sum(w["seconds"][stage] for w in timing["per_worker"].values())
        rounding = 1e-3 * len(timing["per_worker"])  # timing.json rounds each sum to milliseconds
        assert per_worker == pytest.approx(timing["total"]["seconds"][stage], abs=rounding)
        assert timing["total"]["seconds"][stage] == pytest.approx(sum(r["seconds"][stage] for r in records), abs=1e-3)


def test_shards_hold_every_field_of_the_format(synth_root, tmp_path, ray_local):
    out = tmp_path / "shards"
    assert precompute(_args(synth_root, out, "--backend", "felzenszwalb", "--workers", "2", "--shard-size", "2")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    refer = load_refer(synth_root, "refcoco", "unc")
    assert manifest["images_total"] == manifest["images_written"] == len(refer.samples) == 12
    assert manifest["samples_by_split"] == {s: sum(x.split == s for x in refer.samples) for s in refer.splits}
    assert {s["name"] for s in manifest["shards"]} == {p.name for p in out.glob("*.tar")}
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    samples = _samples(out)
    assert len(samples) == 12
    by_id = {s.image.image_id: s for s in refer.samples}
    for key, sample in samples.items():
        assert FIELDS <= set(sample), key
        meta = json.loads(sample["meta.json"])
        item = by_id[meta["image_id"]]
        assert key == f"refcoco-{meta['image_id']:012d}"
        assert sample["jpg"] == (refer.image_dir / item.image.file_name).read_bytes()  # untouched bytes
        labels = np.asarray(Image.open(io.BytesIO(sample["spx.png"])))
        _check_partition(labels, meta["height"], meta["width"])
        assert meta["num_superpixels"] == labels.max() + 1 and meta["backend"] == "felzenszwalb"
        assert meta["config_hash"] == manifest["config_hash"]
        refs = json.loads(sample["refs.json"])
        assert [r["ref_id"] for r in refs] == [r.ref_id for r in item.refs]
        for ref, original in zip(refs, item.refs):
            assert set(ref) >= {"ref_id", "ann_id", "category_id", "split", "sentences", "bbox", "segmentation"}
            assert ref["sentences"] == original.sentences
            np.testing.assert_array_equal(mask_utils.decode(ref["segmentation"]),
                                          ref_mask(original.segmentation, meta["height"], meta["width"]))
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == 12 and {r["status"] for r in index} == {"written"}
    assert (out / "failures.jsonl").read_text() == ""
    assert manifest["images_pending"] == 0
    _check_timing(out, {"decode", "superpixels", "partition", "write"}, max_workers=2)


def test_runs_that_write_the_same_shards_write_the_same_manifest_byte_for_byte(synth_root, tmp_path, ray_local):
    # Other worker counts, other pids, other seconds: nothing of that may reach manifest.json.
    first, second = tmp_path / "first", tmp_path / "second"
    assert precompute(_args(synth_root, first, "--backend", "slic", "--shard-size", "3", "--workers", "2")) == 0
    assert precompute(_args(synth_root, second, "--backend", "slic", "--shard-size", "3", "--workers", "1")) == 0
    assert _sha256s(first) and _sha256s(first) == _sha256s(second)
    for name in ("manifest.json", "index.parquet", "failures.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for out in (first, second):
        timing = json.loads((out / "timing.json").read_text())
        assert timing["total"]["images"] == 12 and timing["per_worker"], "the run-specific part is kept, elsewhere"


def test_sam_backend_job_writes_partitions_and_embeddings_from_a_saved_checkpoint(tiny_sam_checkpoint, tmp_path,
                                                                                ray_local):
    root, out = tmp_path / "refer", tmp_path / "shards"
    synthesize(root, images=5, seed=3)
    # A random tiny SAM predicts IoUs of ~0-0.3: thresholds low enough to let its masks through.
    sam_flags = ["--backend", "sam", "--sam-checkpoint", str(tiny_sam_checkpoint), "--sam-model", "tiny",
                 "--points-per-side", "2", "--pred-iou-thresh", "0.1", "--stability-score-thresh", "0.5",
                 "--stability-score-offset", "0.01", "--store-sam-embeddings", "--workers", "2"]
    assert precompute(_args(root, out, *sam_flags)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images_written"] == manifest["images_total"] == 5
    assert manifest["config"]["backend"] == "sam" and manifest["config"]["store_sam_embeddings"]
    assert len(manifest["config"]["sam"]["checkpoint_sha256"]) == 64
    samples = _samples(out)
    assert len(samples) == 5
    for sample in samples.values():
        assert FIELDS | {"sam.npy"} <= set(sample)
        meta = json.loads(sample["meta.json"])
        assert meta["backend"] == "sam"
        _check_partition(np.asarray(Image.open(io.BytesIO(sample["spx.png"]))), meta["height"], meta["width"])
        embedding = np.load(io.BytesIO(sample["sam.npy"]), allow_pickle=False)
        assert embedding.dtype == np.float16 and embedding.shape == (64, 32, 32) and np.isfinite(embedding).all()
    _check_timing(out, {"decode", "superpixels", "partition", "embeddings", "write"}, max_workers=2)


def test_classical_backend_can_store_sam_embeddings_for_the_trainer(tiny_sam_checkpoint, tmp_path, ray_local):
    root, out = tmp_path / "refer", tmp_path / "shards"
    synthesize(root, images=4, seed=5)
    flags = ["--backend", "felzenszwalb", "--store-sam-embeddings", "--sam-checkpoint", str(tiny_sam_checkpoint),
             "--sam-model", "tiny"]
    assert precompute(_args(root, out, *flags)) == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["backend"] == "felzenszwalb" and config["store_sam_embeddings"]
    assert len(config["sam"]["checkpoint_sha256"]) == 64
    for sample in _samples(out).values():
        assert json.loads(sample["meta.json"])["backend"] == "felzenszwalb"
        assert np.load(io.BytesIO(sample["sam.npy"]), allow_pickle=False).shape == (64, 32, 32)
    _check_timing(out, {"decode", "superpixels", "partition", "embeddings", "write"}, max_workers=1)


# ------------------------------------------------------------------------------------------------
# Bad and awkward input: one job over a dataset holding every case, then one test per case.

BROKEN = {1: ("truncated", "decode"), 2: ("zero-byte", "decode"), 3: ("missing", "read"), 4: ("text", "decode"),
          11: ("unknown-ann-id", "annotations")}
AWKWARD = {5: "grayscale", 6: "cmyk", 7: "exif-rotated", 8: "png-as-jpg", 9: "tiny", 10: "large"}
SIZES = {9: (17, 11), 10: (3000, 2000)}


@pytest.fixture(scope="module")
def awkward_job(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("awkward")
    synthesize(root, images=12, seed=7, sizes=[SIZES.get(i, (200, 150)) for i in range(1, 13)])
    image_dir = root / "images/mscoco/images/train2014"
    path = {i: image_dir / f"COCO_train2014_{i:012d}.jpg" for i in range(1, 13)}
    original = {i: np.asarray(Image.open(path[i]).convert("RGB")) for i in (5, 6, 7, 8)}
    data = path[1].read_bytes()
    path[1].write_bytes(data[: len(data) // 2])
    path[2].write_bytes(b"")
    path[3].unlink()
    path[4].write_text("this is a text file with a .jpg name\n")
    Image.fromarray(original[5]).convert("L").save(path[5], "JPEG")
    Image.fromarray(original[6]).convert("CMYK").save(path[6], "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated by 270°: store the pixels rotated by 90°
    Image.fromarray(original[7]).transpose(Image.Transpose.ROTATE_90).save(path[7], "JPEG", exif=exif.tobytes())
    Image.fromarray(original[8]).save(path[8], "PNG")
    refs_file = root / "refcoco" / "refs(unc).p"
    refs = load_refs_pickle(refs_file)
    next(r for r in refs if r["image_id"] == 11)["ann_id"] = 10**9  # a ref pointing at no annotation
    refs_file.write_bytes(pickle.dumps(refs, protocol=2))
    out = tmp_path_factory.mktemp("awkward-out")
    status = precompute(_args(root, out, "--backend", "felzenszwalb", "--workers", "2", "--shard-size", "3"))
    return root, out, status


def test_bad_input_job_still_succeeds_and_counts_everything(awkward_job):
    _, out, status = awkward_job
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images_total"] == 12
    assert manifest["images_failed"] == len(BROKEN)
    assert manifest["images_written"] == 12 - len(BROKEN)
    assert len(_samples(out)) == 12 - len(BROKEN)


@pytest.mark.parametrize("image_id", sorted(BROKEN), ids=[BROKEN[i][0] for i in sorted(BROKEN)])
def test_broken_image_is_recorded_with_stage_and_error(awkward_job, image_id):
    _, out, _ = awkward_job
    failures = {f["image_id"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert failures[image_id]["stage"] == BROKEN[image_id][1]
    assert failures[image_id]["file_name"] == f"COCO_train2014_{image_id:012d}.jpg" and failures[image_id]["error"]
    assert failures[image_id]["split"] in ("train", "val", "testA", "testB")
    row = next(r for r in pq.read_table(out / "index.parquet").to_pylist() if r["image_id"] == image_id)
    assert row["status"] == "failed" and row["error"] == failures[image_id]["error"]


@pytest.mark.parametrize("image_id", sorted(AWKWARD), ids=[AWKWARD[i] for i in sorted(AWKWARD)])
def test_awkward_image_is_written_in_the_displayed_frame(awkward_job, image_id):
    root, out, _ = awkward_job
    sample = _samples(out)[f"refcoco-{image_id:012d}"]
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(sample["jpg"])))
    width, height = displayed.size
    assert (width, height) == SIZES.get(image_id, (200, 150))
    labels = np.asarray(Image.open(io.BytesIO(sample["spx.png"])))
    _check_partition(labels, height, width)
    refer = load_refer(root, "refcoco", "unc")
    item = next(s for s in refer.samples if s.image.image_id == image_id)
    for ref, original in zip(json.loads(sample["refs.json"]), item.refs):
        np.testing.assert_array_equal(mask_utils.decode(ref["segmentation"]),
                                      ref_mask(original.segmentation, height, width))


# ------------------------------------------------------------------------------------------------
# Refused up front


def _refused(capsys, *argv: str) -> str:
    """What ``svp precompute ARGV`` prints on stderr, having exited 2 (run in-process, as the command's own
    ``main``: a traceback would fail the test; ``test_cli`` checks the entry points around it)."""
    capsys.readouterr()
    try:
        status = precompute(list(argv))
    except SystemExit as exit:  # argparse's refusals of a bad flag value
        status = exit.code
    error = capsys.readouterr().err
    assert status == 2, error
    return error


def test_malicious_refs_pickle_is_refused_before_anything_runs(synth_root, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "instances.json").write_bytes((synth_root / "refcoco" / "instances.json").read_bytes())
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Exploit()]))
    error = _refused(capsys, *_args(root, tmp_path / "out", "--backend", "slic"))
    assert "refs(unc).p" in error and "system" in error
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "sam"], "--sam-checkpoint"),
        (["--backend", "sam", "--sam-checkpoint", "{ckpt}", "--sam-model", "vit_b"], "vit_b"),
        (["--backend", "sam", "--sam-checkpoint", "/nonexistent/sam.pth", "--sam-model", "tiny"],
         "/nonexistent/sam.pth"),
        (["--backend", "slic", "--store-sam-embeddings"], "--sam-checkpoint"),
    ],
    ids=["sam-without-checkpoint", "wrong-model-type", "missing-checkpoint", "embeddings-without-sam"],
)
def test_backend_misconfiguration_is_refused_before_work(synth_root, tiny_sam_checkpoint, tmp_path, capsys, extra,
                                                        message):
    extra = [e.replace("{ckpt}", str(tiny_sam_checkpoint)) for e in extra]
    assert message in _refused(capsys, *_args(synth_root, tmp_path / "out", *extra))
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "refclef", "--split-by", "unc"], "invalid choice: 'refclef'"),
        (["--dataset", "refcoco+", "--split-by", "google"], "google"),
        (["--dataset", "refcocog", "--split-by", "unc"], "umd"),
    ],
)
def test_unknown_dataset_or_split_is_refused(synth_root, tmp_path, capsys, argv, message):
    assert message in _refused(capsys, "--refer-root", str(synth_root), "--out", str(tmp_path / "o"), "--backend",
                               "slic", *argv)


def test_an_out_dir_of_another_config_is_refused(synth_root, tmp_path, ray_local, capsys):
    out = tmp_path / "out"
    assert precompute(_args(synth_root, out, "--backend", "slic", "--shard-size", "6")) == 0
    assert "must not mix" in _refused(capsys, *_args(synth_root, out, "--backend", "felzenszwalb", "--shard-size", "6"))


# A job of its own Ray, which declares one GPU that this machine need not have (Ray schedules by
# declared resources): the suite's in-process Ray has none.
FAKE_GPU_JOB = """
import sys
import ray
from jobs.precompute import main
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
sys.exit(main(sys.argv[1:]))
"""


def test_more_workers_than_gpus_share_them_by_default(synth_root, tmp_path):
    import torch

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", FAKE_GPU_JOB, *_args(synth_root, out, "--backend", "felzenszwalb",
                                                                        "--workers", "2", "--shard-size", "3")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--workers 2 on a cluster with 1 GPU: the workers share them, 0.5 GPU each (2 per GPU)" in result.stderr
    assert _manifest(out)["images_written"] == 12
    # Each worker holds half of a GPU that torch may not see: it runs where torch can, not on a CUDA that is not there.
    devices = {json.loads(p.read_text())["worker"]["device"] for p in (out / "_shards").glob("*.json")}
    assert devices == {"cuda" if torch.cuda.is_available() else "cpu"}


# ------------------------------------------------------------------------------------------------
# Part of the input: --limit and --only-split (dry runs that a later full run completes)


def test_selection_keeps_plan_order_and_shard_names(synth_root):
    plan = _refcoco_plan(synth_root, 2)
    train = [task for task in plan if task.split == "train"]
    chosen = select(plan, "train", 3)
    assert [t.name for t in chosen] == [t.name for t in train[:2]]
    assert [i.image.image_id for t in chosen for i in t.items] == [i.image.image_id for t in train for i in t.items][:3]
    assert select(plan) == plan


@pytest.mark.parametrize(
    "extra, message",
    [(["--only-split", "training"], "splits: testA, testB, train, val"), (["--limit", "0"], "--limit must be >= 1")],
    ids=["unknown-split", "zero-limit"],
)
def test_bad_selection_is_refused_before_work(synth_root, tmp_path, capsys, extra, message):
    assert precompute(_args(synth_root, tmp_path / "out", "--backend", "slic", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_only_split_processes_that_split_and_leaves_the_rest_pending(synth_root, tmp_path, ray_local):
    out = tmp_path / "out"
    assert precompute(_args(synth_root, out, "--backend", "slic", "--only-split", "train")) == 0
    refer = load_refer(synth_root, "refcoco", "unc")
    train = {f"refcoco-{s.image.image_id:012d}" for s in refer.samples if s.split == "train"}
    manifest = _manifest(out)
    assert manifest["samples_by_split"] == {"train": len(train)}
    assert (manifest["images_written"], manifest["images_pending"]) == (len(train), 12 - len(train))
    assert set(_samples(out)) == train and {p.name.split("-")[0] for p in out.glob("*.tar")} == {"train"}
    assert {r["split"] for r in pq.read_table(out / "index.parquet").to_pylist()} == {"train"}


def test_limit_then_full_run_finishes_the_rest_and_redoes_only_the_cut_shard(synth_root, tmp_path, ray_local, capsys):
    out, flags = tmp_path / "out", ["--backend", "slic", "--shard-size", "2"]
    assert precompute(_args(synth_root, out, *flags, "--limit", "5")) == 0
    assert "5 images written, 0 failed, 7 pending (of 12)" in capsys.readouterr().out
    plan = _refcoco_plan(synth_root, 2)
    first = [item.image.image_id for task in plan for item in task.items][:5]
    assert set(_samples(out)) == {f"refcoco-{i:012d}" for i in first}
    whole = {t.name for t, done in zip(plan, itertools.accumulate(len(t.items) for t in plan)) if done <= 5}
    limited = {p.stem: p.read_bytes() for p in (out / "_shards").glob("*.json")}
    assert len(limited) == len(whole) + 1, "5 images must end inside a shard for this test to mean anything"

    assert precompute(_args(synth_root, out, *flags)) == 0
    manifest = _manifest(out)
    assert (manifest["images_written"], manifest["images_pending"], manifest["images_total"]) == (12, 0, 12)
    assert len(_samples(out)) == 12 and len(manifest["shards"]) == len(plan)
    redone = {name for name, data in limited.items() if (out / "_shards" / f"{name}.json").read_bytes() != data}
    assert redone == set(limited) - whole, "whole shards are kept, the one cut short is redone"

    before = _sha256s(out)
    assert precompute(_args(synth_root, out, *flags, "--limit", "5")) == 0
    captured = capsys.readouterr()
    assert f"{len(whole) + 1} of {len(whole) + 1} shards already complete" in captured.err
    assert "no images processed" in captured.out, "nothing ran: no rate of 0.0 images/s"
    assert _sha256s(out) == before and _manifest(out)["images_pending"] == 0, "a dry run never undoes a full one"


# ------------------------------------------------------------------------------------------------
# Fault tolerance (larger images, so that a kill reliably lands while shards remain)


@pytest.fixture(scope="module")
def slow_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slow")
    synthesize(root, images=16, seed=11, sizes=[(640, 480)] * 16)
    return root


def _wait_for_records(records: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if records.exists() and len(list(records.glob("*.json"))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} shard records in {records} after {timeout}s")


def _worker_pids(records: Path, names=None) -> set[int]:
    return {json.loads(p.read_text())["worker"]["pid"] for p in records.glob("*.json")
            if names is None or p.stem in names}


def test_rerun_skips_complete_shards_and_says_so(synth_root, tmp_path, ray_local, capsys):
    out = tmp_path / "out"
    assert precompute(_args(synth_root, out, "--backend", "slic", "--shard-size", "4")) == 0
    before = _sha256s(out)
    os.remove(out / sorted(before)[0])  # one shard lost
    capsys.readouterr()
    assert precompute(_args(synth_root, out, "--backend", "slic", "--shard-size", "4")) == 0
    captured = capsys.readouterr()
    assert f"{len(before) - 1} of {len(before)} shards already complete" in captured.err
    assert _sha256s(out) == before
    assert "12 images written, 0 failed" in captured.out


def test_killed_job_rerun_recomputes_only_missing_shards_byte_identically(slow_root, tmp_path, ray_local):
    reference, out = tmp_path / "reference", tmp_path / "out"
    args = ["--backend", "felzenszwalb", "--shard-size", "1", "--workers", "1"]
    assert precompute(_args(slow_root, reference, *args)) == 0
    job = subprocess.Popen([sys.executable, "-m", "jobs.precompute", *_args(slow_root, out, *args)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = out / "_shards"
    _wait_for_records(records, 2)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-job
    job.wait()
    finished_before_kill = {p.stem for p in records.glob("*.json")}
    assert 2 <= len(finished_before_kill) < 16, "the kill must land mid-job"
    assert not (out / "manifest.json").exists()
    assert precompute(_args(slow_root, out, *args)) == 0
    assert _sha256s(out) == _sha256s(reference)
    assert not list(out.glob(".*.tmp-*")), "temporaries of the killed run are cleaned up"
    rerun = _worker_pids(records, {p.stem for p in records.glob("*.json")} - finished_before_kill)
    assert rerun and not rerun & _worker_pids(records, finished_before_kill), "complete shards are not recomputed"


def test_worker_killed_mid_job_is_replaced_and_every_image_written(slow_root, tmp_path, ray_local):
    import psutil

    out = tmp_path / "out"
    result: dict = {}
    args = _args(slow_root, out, "--backend", "felzenszwalb", "--shard-size", "1", "--workers", "2")
    thread = threading.Thread(target=lambda: result.setdefault("status", precompute(args)))
    thread.start()
    records = out / "_shards"
    _wait_for_records(records, 1)
    victim = _worker_pids(records).pop()
    psutil.Process(victim).kill()
    thread.join(timeout=300)
    assert result.get("status") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images_written"] == manifest["images_total"] == 16
    assert len(_worker_pids(records) - {victim}) >= 2, "a replacement worker processed shards after the kill"
