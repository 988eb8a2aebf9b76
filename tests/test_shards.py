import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.shards import (
    OutputConfigMismatch,
    ShardRecord,
    claim_output_dir,
    decode_label_map,
    decode_stored_array,
    encode_label_map,
    encode_sam_embedding,
    encode_sample,
    index_row,
    load_complete_records,
    save_record,
    write_job_outputs,
    write_shard,
)


def _sample(key: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 300, (7, 9)).astype(np.uint16)
    return encode_sample(key, b"\xff\xd8jpeg-bytes", labels, [{"ref_id": seed}], {"image_id": seed},
                         rng.standard_normal((256, 64, 64)).astype(np.float16))


def test_label_map_round_trips_beyond_8_bits():
    labels = np.arange(70 * 30, dtype=np.uint16).reshape(70, 30)
    np.testing.assert_array_equal(decode_label_map(encode_label_map(labels)), labels)
    with pytest.raises(ValueError, match="uint16"):
        encode_label_map(labels.astype(np.int32))


def test_sam_embedding_round_trips_and_never_unpickles():
    embedding = np.ones((256, 64, 64), np.float32)
    decoded = decode_stored_array(encode_sam_embedding(embedding))
    assert decoded.dtype == np.float16 and decoded.shape == (256, 64, 64)
    with pytest.raises(ValueError, match="channels, grid, grid"):
        encode_sam_embedding(np.ones((256, 64), np.float32))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        decode_stored_array(buffer.getvalue())


def test_shards_are_deterministic_atomic_and_readable_by_webdataset(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_shard(tmp_path / "a", "val-000000.tar", "val", [_sample("x-1", 1), _sample("x-2", 2)])
    second = write_shard(tmp_path / "b", "val-000000.tar", "val", [_sample("x-1", 1), _sample("x-2", 2)])
    assert first == second and first.samples == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["val-000000.tar"]  # no temporary left
    with tarfile.open(tmp_path / "a" / "val-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
    samples = list(wds.WebDataset(str(tmp_path / "a" / "val-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["x-1", "x-2"]
    assert set(samples[0]) >= {"jpg", "spx.png", "refs.json", "meta.json", "sam.npy"}
    assert json.loads(samples[1]["refs.json"]) == [{"ref_id": 2}]


def test_output_dir_refuses_another_config(tmp_path):
    digest = claim_output_dir(tmp_path, {"backend": "slic"})
    assert claim_output_dir(tmp_path, {"backend": "slic"}) == digest
    with pytest.raises(OutputConfigMismatch, match="must not mix"):
        claim_output_dir(tmp_path, {"backend": "felzenszwalb"})


def test_records_resume_only_complete_shards_and_outputs_account_for_every_image(tmp_path):
    claim_output_dir(tmp_path, {"x": 1})
    file = write_shard(tmp_path, "train-000000.tar", "train", [_sample("d-1", 1)])
    rows = [
        index_row(key="d-1", image_id=1, file_name="1.jpg", split="train", shard=file.name, height=7, width=9,
                  num_superpixels=300, num_refs=1, num_sentences=2),
        index_row(key="d-2", image_id=2, file_name="2.jpg", split="train", shard=file.name, stage="decode",
                  error="empty file (0 bytes)"),
    ]
    save_record(tmp_path, ShardRecord("train-000000.tar", "train", file, rows))
    save_record(tmp_path, ShardRecord("train-000001.tar", "train", None, rows[1:]))  # every image failed: no file
    (tmp_path / "_shards" / "val-000000.tar.json").write_text('{"name": "val-000000.tar"')  # damaged: redo it
    complete = load_complete_records(tmp_path, ["train-000000.tar", "train-000001.tar", "val-000000.tar", "nope"])
    assert sorted(complete) == ["train-000000.tar", "train-000001.tar"]
    record = complete["train-000000.tar"]
    assert record.written == 1 and record.failed == 1 and complete["train-000001.tar"].file is None
    extra = [index_row(key="d-3", image_id=3, file_name="3.jpg", split="val", shard=None, stage="annotations",
                       error="unknown ann_id 9")]
    manifest = write_job_outputs(tmp_path, [record], extra, {"x": 1}, "abc")
    assert (manifest["images_total"], manifest["images_written"], manifest["images_failed"]) == (3, 1, 2)
    assert manifest["samples_by_split"] == {"train": 1}
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [(f["image_id"], f["stage"]) for f in failures] == [(2, "decode"), (3, "annotations")]
    index = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert [(r["image_id"], r["status"], r["shard"]) for r in index] == [
        (1, "written", "train-000000.tar"), (2, "failed", None), (3, "failed", None)]
    # A shard whose file was lost (or cut short) is not complete: it will be recomputed.
    (tmp_path / "train-000000.tar").write_bytes(b"partial")
    assert list(load_complete_records(tmp_path, ["train-000000.tar", "train-000001.tar"])) == ["train-000001.tar"]
    (tmp_path / "train-000000.tar").unlink()
    assert list(load_complete_records(tmp_path, ["train-000000.tar"])) == []


def _row(image_id: int, split: str, shard: str | None, sources: dict[str, tuple[int, int]], error: str | None = None):
    return index_row(key=f"d-{image_id}", image_id=image_id, file_name=f"{image_id}.jpg", split=split, shard=shard,
                     stage="decode" if error else None, error=error,
                     sources=[{"source": name, "refs": None if error else refs, "sentences": None if error else sents}
                              for name, (refs, sents) in sources.items()])


def test_manifest_counts_sources_and_each_image_shared_by_two_of_them_once(tmp_path):
    # refcocog google puts an image in train and val: two rows (a sample in each split's shards), one image.
    train = [_row(1, "train", "train-000000.tar", {"refcocog/train": (2, 3)}),
             _row(2, "train", "train-000000.tar", {"refcocog/train": (1, 1)})]
    val = [_row(1, "val", "val-000000.tar", {"refcocog/val": (1, 2)}),
           _row(3, "val", None, {"refcocog/val": (0, 0)}, error="empty file (0 bytes)")]
    records = [ShardRecord("train-000000.tar", "train", write_shard(tmp_path, "train-000000.tar", "train",
                                                                    [_sample("d-1", 1), _sample("d-2", 2)]), train),
               ShardRecord("val-000000.tar", "val", write_shard(tmp_path, "val-000000.tar", "val",
                                                                [_sample("d-1", 1)]), val)]
    manifest = write_job_outputs(tmp_path, records, [], {"x": 1}, "abc")
    assert manifest["sources"] == {"refcocog/train": {"images": 2, "failed": 0, "refs": 3, "sentences": 4},
                                   "refcocog/val": {"images": 1, "failed": 1, "refs": 1, "sentences": 2}}
    assert manifest["overlaps"] == {"refcocog/train & refcocog/val": 1} and manifest["images_in_several_sources"] == 1
    assert [s["sources"] for s in manifest["shards"]] == [{"refcocog/train": 2}, {"refcocog/val": 1}]
    index = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert [row["sources"] for row in index if row["image_id"] == 3] == [
        [{"source": "refcocog/val", "refs": None, "sentences": None}]]
