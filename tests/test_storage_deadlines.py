"""A store that stops answering ends in bounded time with a clear error, for each of svp's uses of
one: the precompute job's uploads, a streamed training read, and the timeouts handed to each backend.

The store here is :mod:`stalled_store` (in memory, async like s3fs, gcsfs and adlfs), with deadlines
of a fraction of a second; the S3 tests (``test_s3.py``) do the same against an S3 server.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from stalled_store import StallingStore

from jobs import precompute
from pipeline.shards import write_shard
from pipeline.storage import STREAM_CHUNK_BYTES, StorageError, StorageSettings, open_url
from trainer.data import DataConfig, DataError, make_loader

DEADLINE_S = 0.3


@pytest.fixture
def store(monkeypatch):
    """The stalling store, empty, with short deadlines and one attempt per upload."""
    StallingStore.reset()
    for name, value in {"SVP_STORAGE_ATTEMPT_TIMEOUT": DEADLINE_S, "SVP_STORAGE_MIN_THROUGHPUT": 1000,
                        "SVP_STORAGE_ATTEMPTS": 1, "SVP_STORAGE_STALLED_SHARDS": 2}.items():
        monkeypatch.setenv(name, str(value))
    yield StallingStore
    StallingStore.reset()


# ------------------------------------------------------------------------------------------- (a)


def _in_process(worker, method, items, workers, gpus, env, failed):
    """``ray_cluster.on_actors`` in this process, one item after another: the stalling store is
    registered here only, not in Ray's workers."""
    instance = worker()
    for item in items:
        yield getattr(instance, method)(item)


def test_precompute_stops_when_the_store_stops_answering_and_records_what_is_missing(synth_root, store,
                                                                                      monkeypatch, capsys):
    monkeypatch.setattr(precompute.ray_cluster, "on_actors", _in_process)
    monkeypatch.setattr(precompute.ray_cluster, "worker_device", lambda job: "cpu")
    monkeypatch.setattr(precompute, "_connect_ray", lambda workers, cluster: 0.0)
    store.stall("PUT", r"\.tar$")  # the config and the records are stored; no shard is
    out = "stalling://bucket/out"
    started = time.monotonic()
    status = precompute.main(["--refer-root", str(synth_root), "--dataset", "refcoco", "--out", out,
                              "--backend", "slic", "--shard-size", "1"])
    elapsed = time.monotonic() - started
    error = capsys.readouterr().err
    assert status == 2
    assert f"svp precompute: error: the store {out} is not answering: 2 shards in a row" in error, error
    assert "Traceback" not in error
    assert len(store.stalled) == 2, "no shard is sent once two in a row got no answer"
    failures = [json.loads(line) for line in store.files["bucket/out/failures.jsonl"].decode().splitlines()]
    assert len(failures) == 12 and {row["stage"] for row in failures} == {"write"}, "every image is recorded"
    assert sum("not answering" in row["error"] for row in failures) == 10
    assert not [name for name in store.files if name.startswith("bucket/out/_shards/")], "a rerun redoes them"
    assert elapsed < 30, f"{elapsed:.1f} s: bounded by two deadlines, not one per shard"


# ------------------------------------------------------------------------------------------- (c)


def _stored_shard(tmp_path: Path, store, samples: int) -> str:
    from test_data import _sample

    write_shard(tmp_path, "train-000000.tar", "train", [_sample(i) for i in range(1, samples + 1)])
    store.files["bucket/train-000000.tar"] = (tmp_path / "train-000000.tar").read_bytes()
    return "stalling://bucket/train-000000.tar"


def test_a_streamed_read_reads_the_whole_file_and_a_stall_mid_file_ends_it_within_the_deadline(store):
    data = bytes(range(256)) * (STREAM_CHUNK_BYTES // 256 + 100)  # two requests' worth
    store.files["bucket/big.bin"] = data
    with open_url("stalling://bucket/big.bin") as stream:
        assert stream.read() == data
    with open_url("stalling://bucket/big.bin") as stream:
        assert stream.read(1000) == data[:1000]
        store.stall("GET", "big.bin")
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"cannot read stalling://bucket/big\.bin \(at byte 8388608") as caught:
            stream.read()
    assert caught.value.timed_out
    assert time.monotonic() - started < DEADLINE_S + 2


def test_a_training_read_from_a_stalled_store_skips_the_shard_with_its_url_in_bounded_time(tmp_path, store, caplog):
    url = _stored_shard(tmp_path, store, samples=2)
    config = DataConfig(vision_size=32, sam_size=64)
    assert len(list(make_loader(url, config, train=False, batch_size=8))) == 1  # read whole while it answers
    store.stall("GET", "train-000000")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trainer.data"), pytest.raises(DataError, match="no batch"):
        list(make_loader(url, config, train=False, batch_size=8))
    assert time.monotonic() - started < DEADLINE_S + 5
    assert "shard skipped or cut short: StorageError" in caplog.text and f"cannot read {url} (at byte 0" in caplog.text


# ------------------------------------------------------------------------------------------- (b)


def test_each_object_store_gets_the_connect_and_read_timeouts_in_its_own_terms():
    settings = StorageSettings(connect_timeout_s=4.0, read_timeout_s=7.5)
    s3 = settings.backend_options("s3")["config_kwargs"]
    assert (s3["connect_timeout"], s3["read_timeout"]) == (4.0, 7.5)
    for protocol in ("gs", "gcs"):
        timeout = settings.backend_options(protocol)["requests_timeout"]
        assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (4.0, 7.5, None)
    for protocol in ("az", "abfs", "abfss"):
        assert settings.backend_options(protocol) == {"connection_timeout": 4, "read_timeout": 8}
    assert settings.backend_options("file") == settings.backend_options("memory") == {}
