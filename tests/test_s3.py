"""Shards in object storage: precompute into s3://, resume, refused, stalled and failed uploads, training from S3.

A moto S3 server on loopback (tests/s3_server.py, in its own process) with IAM enforced: the job
writes as an IAM user whose policy the test can change, so a refused upload is a real HTTP 403 from
the server, not a mocked exception; and the server can stall chosen requests, so a store that never
answers is a real silent socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3
import fsspec
import pyarrow.parquet as pq
import pytest
import requests
import s3fs

from jobs.inspect import main as svp_inspect
from jobs.precompute import main as precompute
from jobs.train import main as svp_train
from pipeline.shards import ShardFile, ShardRecord, dumps_json, index_row, load_complete_records
from pipeline.storage import OutputStore, filesystem
from trainer.data import describe_shards, expand_urls

pytestmark = pytest.mark.s3

BUCKET = "svp-test"
REGION = "us-east-1"
DENIED = "denied"  # the writer may not put val shards under this prefix until a test lifts it
ALLOW_ALL = {"Effect": "Allow", "Action": "*", "Resource": "*"}
DENY_VAL_SHARDS = {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{BUCKET}/{DENIED}/val-*"}
SERVER = Path(__file__).with_name("s3_server.py")
# Short deadlines for the tests of stalled stores; generous enough for a loaded 2-core machine.
ATTEMPT_TIMEOUT_S = 3


def _policy(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


@dataclass
class S3:
    """The running server: the admin's client settings to change the writer's permissions with, and
    the rules file through which the test stalls requests (see tests/s3_server.py)."""

    admin: dict
    rules: Path

    def set_writer_policy(self, *statements: dict) -> None:
        boto3.client("iam", **self.admin).put_user_policy(UserName="writer", PolicyName="svp",
                                                          PolicyDocument=_policy(*statements))

    def stall(self, method: str, path: str) -> None:
        """From now on, ``method`` requests whose path matches the regex ``path`` get no answer."""
        self._log.unlink(missing_ok=True)
        self._write_rules([[method, path]])

    def lift_stalls(self) -> None:
        """Stalled requests are answered 503 (their clients gave up long ago); new ones pass."""
        self._write_rules([])

    def stalled(self) -> list[str]:
        """Every request stalled since the last :meth:`stall`, as ``METHOD PATH``."""
        return self._log.read_text().splitlines() if self._log.exists() else []

    @property
    def _log(self) -> Path:
        return self.rules.with_name(f"{self.rules.name}.log")

    def _write_rules(self, rules: list) -> None:
        staged = self.rules.with_suffix(".staged")
        staged.write_text(json.dumps(rules))
        staged.replace(self.rules)  # whole: the server reads the file at any moment


def _user(iam, name: str, *statements: dict) -> dict:
    """A new IAM user with an inline policy; returns its credentials as boto3 client arguments."""
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="svp", PolicyDocument=_policy(*statements))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def _clear_s3fs_cache() -> None:
    """s3fs caches filesystems (and their botocore settings) per process: start from the env again."""
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def _server(workdir: Path) -> Iterator[str]:
    """tests/s3_server.py in a process of its own, killed on leaving; yields its endpoint once it serves."""
    with (workdir / "server.log").open("wb") as log:
        server = subprocess.Popen([sys.executable, str(SERVER), str(workdir / "stall.json")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        port = server.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"the S3 test server did not start: {(workdir / 'server.log').read_text()}")
        yield f"http://127.0.0.1:{int(port)}"
    finally:
        server.kill()  # its state dies with it
        server.communicate()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with a bucket, an admin and a writer user; the process writes as the writer
    through the standard AWS_* variables, as a user pointing svp at MinIO or any S3 API would."""
    workdir = tmp_path_factory.mktemp("s3-server")
    with _server(workdir) as endpoint, pytest.MonkeyPatch.context() as env:
        setup = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **setup)
        admin = _user(iam, "admin", ALLOW_ALL)
        writer = _user(iam, "writer", ALLOW_ALL, DENY_VAL_SHARDS)
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10)  # from now on, IAM decides
        for name in [name for name in os.environ if name.startswith("AWS_")]:  # a developer's own AWS set-up
            env.delenv(name)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", writer["aws_access_key_id"])
        env.setenv("AWS_SECRET_ACCESS_KEY", writer["aws_secret_access_key"])
        env.setenv("AWS_DEFAULT_REGION", REGION)
        _clear_s3fs_cache()
        yield S3({"endpoint_url": endpoint, "region_name": REGION, **admin}, workdir / "stall.json")
    _clear_s3fs_cache()


def _args(root, out: str, *extra: str) -> list[str]:
    return ["--refer-root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--out", out,
            "--backend", "felzenszwalb", "--shard-size", "4", "--workers", "2", *extra]


def _read(url: str) -> bytes:
    """The object as stored now (a stream of ``fsspec.open`` would check it against a cached listing)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


def _manifest(url: str) -> dict:
    return json.loads(_read(f"{url}/manifest.json"))


def _objects(url: str) -> set[str]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # the workers wrote from other processes
    return {path[len(root) + 1:] for path in fs.find(root)}


@pytest.fixture(scope="module")
def s3_shards(s3, synth_root, ray_local) -> str:
    url = f"s3://{BUCKET}/shards"
    assert precompute(_args(synth_root, url)) == 0
    return url


def test_precompute_writes_shards_records_and_job_outputs_to_s3(s3_shards):
    manifest = _manifest(s3_shards)
    assert manifest["images_total"] == manifest["images_written"] == 12 and manifest["images_failed"] == 0
    names = [shard["name"] for shard in manifest["shards"]]
    assert len(names) == 6  # train 9 images in 3 shards; val, testA and testB 1 each
    for shard in manifest["shards"]:
        data = _read(f"{s3_shards}/{shard['name']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    records = {f"_shards/{name}.json" for name in names}
    assert _objects(s3_shards) == {*names, *records, "config.json", "manifest.json", "failures.jsonl",
                                   "index.parquet", "timing.json"}, "nothing else (no temporaries) lands in the bucket"
    index = pq.read_table(io.BytesIO(_read(f"{s3_shards}/index.parquet"))).to_pylist()
    assert len(index) == 12 and {row["status"] for row in index} == {"written"}
    assert _read(f"{s3_shards}/failures.jsonl") == b""


def test_rerun_into_s3_resumes_and_another_config_is_refused(s3_shards, synth_root, capsys):
    capsys.readouterr()
    assert precompute(_args(synth_root, s3_shards)) == 0
    assert "6 of 6 shards already complete" in capsys.readouterr().err
    assert precompute(_args(synth_root, s3_shards, "--min-area", "50")) == 2
    assert "must not mix" in capsys.readouterr().err


def test_resume_checks_the_records_with_one_listing_and_reads_only_those_that_exist(s3):
    url = f"s3://{BUCKET}/resume"
    fs, root = filesystem(url)  # the instance OutputStore gets: fsspec caches it per settings
    names = [f"train-{i:06d}.tar" for i in range(300)]  # the plan: 250 shards done, 50 to do
    objects = {}
    for i, name in enumerate(names[:250]):
        shard = b"x" * (10 + i % 7)
        rows = [index_row(key=f"d-{i}", image_id=i, file_name=f"{i}.jpg", split="train", shard=name)]
        record = ShardRecord(name, "train", ShardFile(name, "train", 1, len(shard), "0" * 64), rows)
        objects |= {f"{root}/{name}": shard, f"{root}/_shards/{name}.json": dumps_json(asdict(record))}
    objects[f"{root}/train-000007.tar"] = b"cut"  # a shard cut short: its record does not count
    fs.pipe(objects)
    calls: Counter[str] = Counter()
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))

    complete = load_complete_records(url, names)

    assert sorted(complete) == [name for name in names[:250] if name != "train-000007.tar"]
    assert complete["train-000249.tar"].rows[0]["image_id"] == 249
    # One page of a listing (S3 pages 1000 names), one GET per existing record and nothing per missing
    # one; checked shard by shard it was a GET and a HEAD per shard, and a HEAD and a LIST per missing one.
    assert calls == {"ListObjectsV2": 1, "GetObject": 250}, calls


def test_a_missing_bucket_is_refused_before_any_work(s3, synth_root, capsys):
    assert precompute(_args(synth_root, "s3://no-such-bucket/shards")) == 2
    assert "s3://no-such-bucket/shards/config.json" in capsys.readouterr().err
    assert [b["Name"] for b in boto3.client("s3", **s3.admin).list_buckets()["Buckets"]] == [BUCKET], \
        "no bucket is created behind the user's back"


def test_training_streams_the_train_split_from_s3(s3_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert svp_train(["--shards", s3_shards, "--run-dir", str(run_dir), "--batch-size", "2", "--max-steps", "2",
                      "--log-every", "1", "--record-keys", "--num-workers", "2"]) == 0
    index = pq.read_table(io.BytesIO(_read(f"{s3_shards}/index.parquet"))).to_pylist()
    train_keys = {row["key"] for row in index if row["split"] == "train"}
    trained_on = (run_dir / "keys_rank0.txt").read_text().split()
    assert len(trained_on) == 4 and set(trained_on) <= train_keys  # 2 steps x 2 samples, all from S3
    recorded = json.loads((run_dir / "run_config.json").read_text())["data"]["train"]
    assert recorded["manifest"] == f"{s3_shards}/manifest.json"
    assert recorded["manifest_sha256"] == hashlib.sha256(_read(f"{s3_shards}/manifest.json")).hexdigest()
    assert recorded["samples"] == len(train_keys)


def test_inspect_reads_an_s3_output_into_a_local_report(s3_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a remote OUT's report goes to ./inspect-NAME/
    assert svp_inspect([s3_shards, "--samples", "4", "--html"]) == 0
    report_dir = tmp_path / "inspect-shards"
    assert {p.name for p in report_dir.iterdir()} == {"contact_sheet.png", "superpixels_hist.png", "area_hist.png",
                                                      "summary.txt", "inspect.html"}
    manifest = _manifest(s3_shards)
    summary = (report_dir / "summary.txt").read_text()
    assert summary.startswith(f"{s3_shards}: backend felzenszwalb, config {manifest['config_hash']}")
    assert f"images: {manifest['images_written']} written, 0 failed" in summary and summary in capsys.readouterr().out


def test_globs_and_brace_patterns_expand_on_s3(s3_shards):
    train = [f"{s3_shards}/{s['name']}" for s in _manifest(s3_shards)["shards"] if s["split"] == "train"]
    assert expand_urls(f"{s3_shards}/train-*.tar") == train
    assert expand_urls(f"{s3_shards}/train-{{000000..000002}}.tar") == train
    assert describe_shards(f"{s3_shards}/train-*.tar")["shards"].keys() == {url.rsplit("/", 1)[1] for url in train}


def test_refused_upload_is_recorded_and_a_rerun_completes_it(s3, s3_shards, synth_root, capsys):
    out = f"s3://{BUCKET}/{DENIED}"
    assert precompute(_args(synth_root, out)) == 0  # the job ran; the val shard could not be stored
    failure = _only_the_val_shard_failed(out)
    assert f"{out}/val-000000.tar" in failure["error"] and "PermissionError" in failure["error"]
    assert "attempt 1 of" in failure["error"], "a refusal is not retried"

    s3.set_writer_policy(ALLOW_ALL)  # the permission is fixed: the rerun redoes what was missing
    _assert_rerun_completes(out, synth_root, s3_shards, capsys)


def _only_the_val_shard_failed(out: str) -> dict:
    """The failure record of a run that stored every shard but val's, checked to be the only one."""
    manifest = _manifest(out)
    assert (manifest["images_written"], manifest["images_failed"]) == (11, 1)
    [failure] = [json.loads(line) for line in _read(f"{out}/failures.jsonl").splitlines()]
    assert failure["split"] == "val" and failure["stage"] == "write"
    assert not any(name.startswith(("val-", "_shards/val-")) for name in _objects(out))
    return failure


def _assert_rerun_completes(out: str, synth_root, s3_shards: str, capsys) -> None:
    """A rerun into ``out`` writes only the missing val shard, and the output is a never-failed run's."""
    capsys.readouterr()
    assert precompute(_args(synth_root, out)) == 0
    assert "5 of 6 shards already complete" in capsys.readouterr().err
    manifest = _manifest(out)
    assert (manifest["images_written"], manifest["images_failed"]) == (12, 0)
    assert _read(f"{out}/failures.jsonl") == b""
    assert manifest["shards"] == _manifest(s3_shards)["shards"], "byte-identical to a run that never failed"


class _OnRetry(logging.Handler):
    """Calls ``action`` when svp logs that it retries a failed upload."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("storing "):
            self.action()


@contextlib.contextmanager
def _lifted_on_retry(s3: S3) -> Iterator[None]:
    """Within the block, the stall is lifted as soon as svp gives up an attempt and plans another."""
    handler = _OnRetry(s3.lift_stalls)
    logger = logging.getLogger("pipeline.storage")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        s3.lift_stalls()


def test_an_outage_during_an_upload_is_retried(s3, monkeypatch, caplog):
    monkeypatch.setenv("SVP_STORAGE_ATTEMPT_TIMEOUT", str(ATTEMPT_TIMEOUT_S))
    store = OutputStore(f"s3://{BUCKET}/outage")
    # Build the S3 client first (botocore's service models): the first attempt is then all the stall's.
    store.write_bytes("warm-up.bin", b"")
    s3.stall("PUT", f"/{BUCKET}/outage/data\\.bin")
    started = time.monotonic()
    with _lifted_on_retry(s3), caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        store.write_bytes("data.bin", b"x" * 1000)
    assert "attempt 1 of 3" in caplog.text and f"TimeoutError: no answer within {ATTEMPT_TIMEOUT_S} s" in caplog.text
    assert time.monotonic() - started < 30
    assert s3.stalled() == [f"PUT /{BUCKET}/outage/data.bin"]
    assert _read(f"s3://{BUCKET}/outage/data.bin") == b"x" * 1000


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint on loopback that accepts TCP connections and never answers (a black-holed store)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held, done = [], threading.Event()

    def hold() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        for connection in [*held, listener]:
            connection.close()


@pytest.mark.timeout(120)
def test_a_black_holed_store_ends_the_job_in_bounded_time(s3, black_hole, synth_root, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", black_hole)
    monkeypatch.setenv("SVP_STORAGE_ATTEMPT_TIMEOUT", str(ATTEMPT_TIMEOUT_S))
    _clear_s3fs_cache()  # no client of the working server: one for the black hole
    out = f"s3://{BUCKET}/black-hole"
    started = time.monotonic()
    try:
        assert precompute(_args(synth_root, out)) == 2
    finally:
        _clear_s3fs_cache()
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"{out}/config.json" in err and f"TimeoutError: no answer within {ATTEMPT_TIMEOUT_S} s" in err, err


@pytest.mark.timeout(180)
def test_a_stalled_shard_upload_is_recorded_and_a_rerun_completes_it(s3, s3_shards, synth_root, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("SVP_STORAGE_ATTEMPT_TIMEOUT", str(ATTEMPT_TIMEOUT_S))  # the Ray workers get it too
    monkeypatch.setenv("SVP_STORAGE_ATTEMPTS", "2")
    out = f"s3://{BUCKET}/stalled"
    s3.stall("PUT", f"/{BUCKET}/stalled/val-.*")
    try:
        assert precompute(_args(synth_root, out)) == 0  # the job ran; the val shard's store never answered
        assert set(s3.stalled()) == {f"PUT /{BUCKET}/stalled/val-000000.tar"}, "the store saw it, and no other"
    finally:
        s3.lift_stalls()
    failure = _only_the_val_shard_failed(out)
    assert f"{out}/val-000000.tar (attempt 2 of 2): TimeoutError" in failure["error"]

    _assert_rerun_completes(out, synth_root, s3_shards, capsys)
