"""Stage timing: what a worker charges to which stage, and how the manifest sums it up."""

from __future__ import annotations

import time

import pytest

from pipeline.shards import ShardRecord, index_row, stage_timing
from pipeline.timing import StageTimer, throughput


def test_stage_adds_up_and_take_starts_again():
    timer = StageTimer()
    for _ in range(2):
        with timer.stage("decode"):
            time.sleep(0.02)
    with pytest.raises(RuntimeError), timer.stage("write"):
        raise RuntimeError("a failing stage is still charged")
    seconds = timer.take()
    assert set(seconds) == {"decode", "write"}
    assert seconds["decode"] >= 0.04
    assert timer.take() == {}


def test_timed_charges_producing_items_not_consuming_them():
    def produce():
        for i in range(2):
            time.sleep(0.05)
            yield i

    timer = StageTimer()
    consumed = []
    for item in timer.timed("superpixels", produce()):
        time.sleep(0.1)  # the consumer's time belongs to another stage
        consumed.append(item)
    assert consumed == [0, 1]
    assert 0.1 <= timer.take()["superpixels"] < 0.2


def _record(name: str, worker: dict, images: int, seconds: dict[str, float]) -> ShardRecord:
    rows = [index_row(key=f"d-{i}", image_id=i, file_name=f"{i}.jpg", split="train", shard=name) for i in range(images)]
    # one image of each shard segmented twice (a retry): the count is of backend runs, not of images
    return ShardRecord(name, "train", None, rows, seconds=seconds, worker=worker, segmented=images + 1)


def test_manifest_timing_sums_per_worker_and_in_total():
    a, b = {"host": "n1", "pid": 7}, {"host": "n2", "pid": 7}
    records = [
        _record("train-000000.tar", a, 2, {"decode": 1.0, "superpixels": 4.0, "write": 0.5}),
        _record("train-000001.tar", a, 3, {"decode": 2.0, "superpixels": 6.0, "embeddings": 1.25}),
        _record("train-000002.tar", b, 1, {"decode": 0.5, "superpixels": 1.0}),
        _record("train-000003.tar", {}, 4, {}),  # its worker kept dying: no times to report
    ]
    timing = stage_timing(records)
    assert timing["per_worker"] == {
        "n1:7": {"shards": 2, "images": 5, "segmented": 7,
                 "seconds": {"decode": 3.0, "embeddings": 1.25, "superpixels": 10.0, "write": 0.5}},
        "n2:7": {"shards": 1, "images": 1, "segmented": 2, "seconds": {"decode": 0.5, "superpixels": 1.0}},
    }
    assert timing["total"] == {"shards": 3, "images": 6, "segmented": 9,
                               "seconds": {"decode": 3.5, "embeddings": 1.25, "superpixels": 11.0, "write": 0.5}}


@pytest.mark.parametrize(("images", "seconds", "said"), [
    (12, 0.5, "24 images/s"),
    (3, 1.5, "2 images/s"),
    (1000, 0.8, "1250 images/s"),
    (7, 100.0, "14.3 s/image"),  # 0.07 images/s: what "0.1f images/s" printed as 0.1, and 0.04 as 0.0
    (1, 3000.0, "3000 s/image"),
    (0, 2.0, "no images processed"),
])
def test_throughput_never_reads_zero(images, seconds, said):
    assert throughput(images, seconds) == said
