"""trainer.data: batches from shards, eval/train expansion, node/worker splits, corrupt samples, URLs."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.refer import encode_mask
from pipeline.shards import encode_label_map, encode_sample, write_shard
from trainer.data import (
    DataConfig,
    DataError,
    _LengthGroupedBatches,
    describe_shards,
    expand_urls,
    item_length,
    make_loader,
)

SMALL = DataConfig(vision_size=32, sam_size=64)  # V=32, S=64: low-res masks 16×16, embeddings 4×4
GREY, RED = (128, 128, 128), (255, 0, 0)
HEIGHT, WIDTH = 40, 60  # not square, so a transposed or unscaled frame shows
SQUARE = (slice(8, 24), slice(20, 36))  # rows, cols of the red square and of ref 1's mask


def _png(rgb: np.ndarray) -> bytes:
    """Lossless bytes under the ``jpg`` member (decode_image reads PNG-as-JPEG), so colours are exact."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(image_id: int, refs: int = 2, sentences: int = 2, sam: np.ndarray | None = None,
            vision: np.ndarray | None = None) -> dict:
    """A grey image with a red square; ref 1 is the square, the others a strip along the top."""
    rgb = np.full((HEIGHT, WIDTH, 3), GREY, np.uint8)
    rgb[SQUARE] = RED
    labels = np.zeros((HEIGHT, WIDTH), np.uint16)
    labels[SQUARE] = 1
    labels[2, 1] = 2  # a one-pixel superpixel between the pixels that NEAREST samples at 32×32
    labels[HEIGHT // 2:, WIDTH // 2 + 10:] = 3
    square = np.zeros((HEIGHT, WIDTH), np.uint8)
    square[SQUARE] = 1
    strip = np.zeros((HEIGHT, WIDTH), np.uint8)
    strip[:4] = 1
    ref_list = [
        {"ref_id": image_id * 100 + r, "split": "train", "segmentation": encode_mask(square if r == 1 else strip),
         "sentences": [{"sent_id": image_id * 1000 + r * 10 + s, "sent": f"ref {r} sentence {s}"}
                       for s in range(sentences)]}
        for r in range(refs)
    ]
    meta = {"image_id": image_id, "height": HEIGHT, "width": WIDTH}
    return encode_sample(f"refcoco-{image_id:012d}", _png(rgb), labels, ref_list, meta, sam, vision)


def _shards(directory: Path, samples: list[dict], per_shard: int, split: str = "train") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(0, len(samples), per_shard):
        name = f"{split}-{index // per_shard:06d}.tar"
        write_shard(directory, name, split, samples[index:index + per_shard])
        names.append(str(directory / name))
    return names


def _items(loader) -> list[tuple[str, int, int]]:
    return [item for batch in loader for item in zip(batch["keys"], batch["ref_ids"], batch["sent_ids"])]


def _all_pairs(image_ids, refs: int = 2, sentences: int = 2) -> list[tuple[str, int, int]]:
    return [(f"refcoco-{i:012d}", i * 100 + r, i * 1000 + r * 10 + s)
            for i in image_ids for r in range(refs) for s in range(sentences)]


def test_batch_shapes_values_and_mask_alignment(tmp_path):
    shards = _shards(tmp_path, [_sample(i) for i in range(1, 4)], per_shard=2)
    batch = next(iter(make_loader(shards, SMALL, train=False, batch_size=4)))
    assert batch["keys"] == ["refcoco-000000000001"] * 4 and batch["skipped"] == 0
    assert batch["sentences"][:2] == ["ref 0 sentence 0", "ref 0 sentence 1"] and batch["splits"] == ["train"] * 4

    pixels = batch["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.float32
    mean, std = torch.tensor(SMALL.vision_mean), torch.tensor(SMALL.vision_std)
    torch.testing.assert_close(pixels[0, :, 0, 0], (torch.tensor(GREY) / 255 - mean) / std)
    torch.testing.assert_close(pixels[0, :, 12, 15], (torch.tensor(RED) / 255 - mean) / std)

    superpixels, counts = batch["superpixels"], batch["num_superpixels"]
    assert superpixels.shape == (4, 32, 32) and superpixels.dtype == torch.int64 and counts.dtype == torch.int64
    for labels, count in zip(superpixels, counts):
        assert torch.equal(labels.unique(), torch.arange(int(count)))
    assert counts.tolist() == [3] * 4  # 4 labels written, the one-pixel superpixel vanished at 32×32

    # The ref-1 mask is the red square in every frame: V×V superpixels, S/4 target, full resolution.
    red_in_vision = pixels[2, 0] > 1.0
    square_label = superpixels[2][red_in_vision].unique()
    assert square_label.numel() == 1 and torch.equal(superpixels[2] == square_label, red_in_vision)
    masks, sizes = batch["gt_masks"], batch["input_sizes"]
    assert masks.shape == (4, 16, 16) and masks.dtype == torch.float32 and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert sizes.tolist() == [[43, 64]] * 4 and batch["original_sizes"].tolist() == [[40, 60]] * 4
    sam = batch["sam_pixels"]
    assert sam.shape == (4, 3, 64, 64) and "sam_embeddings" not in batch
    assert torch.all(sam[:, :, 43:] == 0)  # zero padding below the resized image
    # rows 8..24 × 64/60 → 8.5..25.6 → cells 2..5 (cell 6 is 40% covered); cols 21.3..38.4 → cells 5..9
    expected = torch.zeros(16, 16)
    expected[2:6, 5:10] = 1
    assert batch["ref_ids"][2] == 101 and torch.equal(masks[2], expected)
    grey, red = ((torch.tensor([GREY[0], RED[0]]) - 123.675) / 58.395).tolist()
    red_share = torch.nn.functional.avg_pool2d((sam[2:3, 0] - grey) / (red - grey), 4)[0]
    assert torch.all(masks[2][red_share > 0.75] == 1) and torch.all(masks[2][red_share < 0.25] == 0)
    assert masks[2].sum() > 0 and masks[0].sum() > 0 and not torch.equal(masks[0], masks[2])
    full = batch["full_masks"][2]
    assert full.dtype == torch.uint8 and full.shape == (40, 60) and full[SQUARE].all() and full.sum() == 16 * 16
    # Each item's other referred objects: ref 1's is ref 0's strip, ref 0's the square (its own strip left out).
    others = batch["other_objects"]
    assert [o.dtype for o in others] == [torch.bool] * 4 and others[2].shape == (40, 60)
    assert torch.equal(others[2], batch["full_masks"][0].bool()) and torch.equal(others[0], full.bool())


def test_only_evaluation_carries_the_other_objects(tmp_path):
    """A one-ref image has none to pick by mistake; training batches carry none at all."""
    shards = _shards(tmp_path, [_sample(1, refs=1), _sample(2, refs=3)], per_shard=2)
    batch = next(iter(make_loader(shards, SMALL, train=False, batch_size=8)))
    assert [int(o.sum()) for o in batch["other_objects"]] == [0, 0, 16 * 16, 16 * 16, 4 * 60, 4 * 60, 16 * 16,
                                                                16 * 16]
    trained = next(iter(make_loader(shards, SMALL, train=True, batch_size=2, resampled=False)))
    assert "other_objects" not in trained


def test_eval_yields_every_pair_once_in_order(tmp_path):
    shards = _shards(tmp_path, [_sample(i, refs=i, sentences=3) for i in range(1, 5)], per_shard=3)
    expected = [p for i in range(1, 5) for p in _all_pairs([i], refs=i, sentences=3)]
    loader = make_loader(shards, SMALL, train=False, batch_size=4)
    assert _items(loader) == expected
    assert _items(loader) == expected  # a second pass, same order


def _train_pass(shards, seed: int) -> list[tuple[str, int, int]]:
    config = DataConfig(vision_size=32, sam_size=64, shuffle_buffer=8, seed=seed)
    return _items(make_loader(shards, config, train=True, batch_size=1, resampled=False))


def test_train_draws_one_pair_per_image_per_pass_and_follows_the_seed(tmp_path):
    images = range(1, 9)
    shards = _shards(tmp_path, [_sample(i, refs=3, sentences=3) for i in images], per_shard=2)
    pairs = set(_all_pairs(images, refs=3, sentences=3))
    first = _train_pass(shards, seed=0)
    assert sorted(key for key, _, _ in first) == [f"refcoco-{i:012d}" for i in images]
    assert set(first) <= pairs
    assert _train_pass(shards, seed=0) == first
    assert _train_pass(shards, seed=1) != first


def _grouped(lengths: list[int], batch_size: int, group: int, seed: int = 0) -> list[list[int]]:
    """Batches (as lists of item lengths) from items of the given lengths (visual tokens, no words)."""
    stage = _LengthGroupedBatches(batch_size, group, seed, collate=lambda items: [item_length(i) for i in items])
    return list(stage.run({"num_superpixels": n, "sentence": ""} for n in lengths))


def _padding(batches: list[list[int]]) -> int:
    return sum(len(batch) * max(batch) - sum(batch) for batch in batches)


def test_length_grouped_batches_keep_every_item_and_cut_the_padding() -> None:
    lengths = [int(n) for n in np.random.default_rng(0).integers(3, 60, size=64)]
    plain, grouped = _grouped(lengths, 4, group=1), _grouped(lengths, 4, group=8)
    assert plain == [lengths[i:i + 4] for i in range(0, 64, 4)]  # group 1: arrival order
    assert sorted(n for b in grouped for n in b) == sorted(lengths) and all(len(b) == 4 for b in grouped)
    assert _padding(grouped) < 0.25 * _padding(plain), (_padding(grouped), _padding(plain))
    for window in range(0, 16, 8):  # each window of 8 batches holds exactly its own 32 items
        assert sorted(n for b in grouped[window:window + 8] for n in b) == sorted(lengths[window * 4:window * 4 + 32])
    order = [max(b) for b in grouped[:8]]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # batches leave shuffled
    assert _grouped(lengths, 4, group=8) == grouped and _grouped(lengths, 4, group=8, seed=1) != grouped


def test_length_grouped_batches_read_the_next_window_a_batch_at_a_time() -> None:
    """After the first window, each batch leaves having read one batch of items more, never a
    whole window at once (which stalled the training step every ``group`` batches)."""
    read = 0

    def items():
        nonlocal read
        for n in range(1, 41):
            read += 1
            yield {"num_superpixels": n, "sentence": ""}

    stage = _LengthGroupedBatches(4, 4, 0, collate=lambda batch: read)  # windows of 16 items
    assert list(stage.run(items())) == [20, 24, 28, 32, 36, 40, 40, 40, 40, 40]


def test_length_grouped_training_drops_only_a_last_partial_batch() -> None:
    batches = _grouped(list(range(1, 12)), 4, group=2)  # 11 items: a window of 8, then 3 left
    assert len(batches) == 2 and sorted(n for b in batches for n in b) == list(range(1, 9))


def test_length_grouping_counts_words_and_keeps_the_draws_of_a_train_pass(tmp_path):
    assert item_length({"num_superpixels": 5, "sentence": "the red circle"}) == 8
    shards = _shards(tmp_path, [_sample(i, refs=3, sentences=3) for i in range(1, 9)], per_shard=2)
    passes = {group: _items(make_loader(shards, DataConfig(vision_size=32, sam_size=64, length_group=group),
                                        train=True, batch_size=2, resampled=False)) for group in (1, 4)}
    assert sorted(passes[1]) == sorted(passes[4])  # the same draws, batched in another order
    with pytest.raises(ValueError, match="length_group"):
        DataConfig(length_group=0)


def test_resampled_training_is_infinite_unless_epoch_samples(tmp_path):
    shards = _shards(tmp_path, [_sample(i) for i in range(1, 4)], per_shard=1)
    assert len(list(make_loader(shards, SMALL, train=True, batch_size=2, epoch_samples=9))) == 5
    stream = iter(make_loader(shards, SMALL, train=True, batch_size=2))
    assert all(len(next(stream)["keys"]) == 2 for _ in range(12))  # 24 items from 3 images: no end


def test_split_by_node_gives_disjoint_ranks_that_cover_everything(tmp_path, monkeypatch):
    shards = _shards(tmp_path, [_sample(i) for i in range(1, 6)], per_shard=1)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(_items(make_loader(shards, SMALL, train=False, batch_size=3)))
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_all_pairs(range(1, 6)))


def test_two_workers_yield_each_pair_once(tmp_path):
    shards = _shards(tmp_path, [_sample(i) for i in range(1, 6)], per_shard=2)
    items = _items(make_loader(shards, SMALL, train=False, batch_size=3, num_workers=2))
    assert sorted(items) == sorted(_all_pairs(range(1, 6)))


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    truncated = _sample(2)
    jpeg = io.BytesIO()
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(jpeg, format="JPEG")
    truncated["jpg"] = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    bad_json = _sample(3)
    bad_json["refs.json"] = b'[{"ref_id": 1,'
    missing = _sample(4)
    del missing["spx.png"]
    wrong_size = _sample(5)
    wrong_size["spx.png"] = encode_label_map(np.zeros((10, 10), np.uint16))
    bad_rle = _sample(6)
    refs = json.loads(bad_rle["refs.json"])
    refs[0]["segmentation"]["counts"] = "0"
    bad_rle["refs.json"] = json.dumps(refs).encode()
    samples = [_sample(1), truncated, bad_json, missing, wrong_size, bad_rle, _sample(7)]
    shards = _shards(tmp_path, samples, per_shard=4)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        batches = list(make_loader(shards, SMALL, train=False, batch_size=3))
    assert sum(batch["skipped"] for batch in batches) == 5
    assert _items(batches) == _all_pairs([1, 7])
    logged = caplog.text
    assert "refcoco-000000000002" in logged and "truncated" in logged and "refcoco-000000000003" in logged
    assert "missing member(s): spx.png" in logged


def _with_sentences(sample: dict, texts: dict[int, str]) -> dict:
    """``sample`` with the sentences of ``texts`` ({sent_id: text}) replaced."""
    refs = json.loads(sample["refs.json"])
    for ref in refs:
        for sentence in ref["sentences"]:
            sentence["sent"] = texts.get(sentence["sent_id"], sentence["sent"])
    return {**sample, "refs.json": json.dumps(refs).encode()}


def test_empty_sentences_are_skipped_and_counted_in_evaluation_and_training(tmp_path, caplog):
    partly = _with_sentences(_sample(1), {1000: "", 1011: "  \t"})  # two of image 1's four sentences are blank
    wholly = _with_sentences(_sample(2, refs=1, sentences=1), {2000: " "})
    shards = _shards(tmp_path, [partly, wholly, _sample(3)], per_shard=3)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        batches = list(make_loader(shards, SMALL, train=False, batch_size=4))
    assert sorted(_items(batches)) == sorted(set(_all_pairs([1, 3])) - {("refcoco-000000000001", 100, 1000),
                                                                        ("refcoco-000000000001", 101, 1011)})
    assert sum(batch["skipped"] for batch in batches) == 3  # two blank sentences, one image with no other
    assert "sent_id 1000, 1011" in caplog.text and "every referring sentence is empty" in caplog.text
    drawn = [item for seed in range(8) for item in _items(make_loader(shards, replace(SMALL, seed=seed), train=True,
                                                                       batch_size=1, resampled=False))]
    assert drawn and all(sent_id not in (1000, 1011, 2000) for _, _, sent_id in drawn)


def test_all_corrupt_split_is_a_data_error(tmp_path):
    broken = _sample(1)
    broken["meta.json"] = b"not json"
    _shards(tmp_path, [broken], per_shard=1, split="val")
    with pytest.raises(DataError, match=r"val-\*\.tar yielded no batch"):
        list(make_loader(str(tmp_path / "val-*.tar"), SMALL, train=False, batch_size=2))


def test_missing_shards_and_patterns_are_named(tmp_path):
    shards = _shards(tmp_path, [_sample(1)], per_shard=1)
    missing = str(tmp_path / "train-000007.tar")
    with pytest.raises(DataError, match="train-000007.tar"):
        make_loader([shards[0], missing], SMALL, train=False, batch_size=1)
    with pytest.raises(DataError, match=r"testC-\*\.tar"):
        expand_urls(str(tmp_path / "testC-*.tar"))


def test_url_expansion(tmp_path):
    names = _shards(tmp_path, [_sample(i) for i in range(1, 4)], per_shard=1)
    assert expand_urls(f"{tmp_path}/train-{{000000..000002}}.tar") == names
    assert expand_urls(f"{tmp_path}/train-{{000000,000002}}.tar,{tmp_path}/train-000001.tar") == [
        names[0], names[2], names[1]]
    assert expand_urls(f"{tmp_path}/train-000002.tar::{tmp_path}/train-*.tar") == [names[2], *names]
    remote = ["s3://bucket/train-{000000..000001}.tar", "pipe:curl -s https://host/a.tar"]
    assert expand_urls(remote) == ["s3://bucket/train-000000.tar", "s3://bucket/train-000001.tar", remote[1]]
    assert describe_shards(remote[1]) == {} and describe_shards(names) == {}  # no manifest.json here


def test_fsspec_urls_stream(tmp_path):
    local = _shards(tmp_path, [_sample(1)], per_shard=1)
    with fsspec.open("memory://svp-test/train-000000.tar", "wb") as stream:
        stream.write(Path(local[0]).read_bytes())
    assert _items(make_loader("memory://svp-test/train-000000.tar", SMALL, train=False, batch_size=8)) == \
        _all_pairs([1])


def test_sam_embeddings_replace_sam_pixels_when_every_sample_has_one(tmp_path, caplog):
    config = DataConfig(vision_size=32, sam_size=1024)  # the stored embedding is SAM-1024's 256×64×64
    embedding = np.random.default_rng(0).standard_normal((256, 64, 64)).astype(np.float16)
    with_sam = _shards(tmp_path / "sam", [_sample(1, sam=embedding), _sample(2, sam=embedding)], per_shard=2)
    batch = next(iter(make_loader(with_sam, config, train=False, batch_size=8)))
    assert "sam_pixels" not in batch and batch["sam_embeddings"].shape == (8, 256, 64, 64)
    assert batch["sam_embeddings"].dtype == torch.float32 and batch["gt_masks"].shape == (8, 256, 256)
    torch.testing.assert_close(batch["sam_embeddings"][0], torch.from_numpy(embedding.astype(np.float32)))

    other_sam = _sample(3)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((256, 4, 4), np.float16))
    other_sam["sam.npy"] = buffer.getvalue()
    mixed = _shards(tmp_path / "mixed", [_sample(1, sam=embedding), other_sam], per_shard=2)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        batch = next(iter(make_loader(mixed, config, train=False, batch_size=8)))
    assert "sam_embeddings" not in batch and batch["sam_pixels"].shape == (8, 3, 1024, 1024)
    assert caplog.text.count("ignoring sam.npy") == 1


def test_vision_features_replace_pixel_values_only_when_asked_for_and_of_that_shape(tmp_path, caplog):
    features = np.random.default_rng(0).standard_normal((4, 48)).astype(np.float16)
    stored = _shards(tmp_path / "stored", [_sample(1, vision=features), _sample(2, vision=features)], per_shard=2)
    asked = replace(SMALL, vision_features_shape=(4, 48))
    batch = next(iter(make_loader(stored, asked, train=False, batch_size=8)))
    assert "pixel_values" not in batch and batch["vision_features"].shape == (8, 4, 48)
    torch.testing.assert_close(batch["vision_features"][0], torch.from_numpy(features.astype(np.float32)))
    assert batch["superpixels"].shape == (8, 32, 32)  # the superpixel map is still on the encoder's grid

    not_asked = next(iter(make_loader(stored, SMALL, train=False, batch_size=8)))
    assert "vision_features" not in not_asked and not_asked["pixel_values"].shape == (8, 3, 32, 32)

    mixed = _shards(tmp_path / "mixed", [_sample(1, vision=features), _sample(2, vision=features[:, :16])],
                    per_shard=2)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        batch = next(iter(make_loader(mixed, asked, train=False, batch_size=8)))
    assert "vision_features" not in batch
    torch.testing.assert_close(batch["pixel_values"], not_asked["pixel_values"])  # the same pixels either way
    assert caplog.text.count("ignoring vision.npy") == 1


def test_reads_shards_written_by_the_precompute_job(synth_root, tmp_path, ray_local):
    from jobs.precompute import main as precompute
    from pipeline.refer import load_refer

    out = tmp_path / "shards"
    args = ["--refer-root", str(synth_root), "--dataset", "refcoco", "--split-by", "unc", "--out", str(out),
            "--backend", "felzenszwalb", "--shard-size", "4"]
    assert precompute(args) == 0
    refer = load_refer(synth_root, "refcoco", "unc")
    expected = sorted((f"refcoco-{item.image.image_id:012d}", ref.ref_id, sentence["sent_id"])
                      for item in refer.samples for ref in item.refs for sentence in ref.sentences)
    batches = list(make_loader(str(out / "*.tar"), SMALL, train=False, batch_size=16))
    assert sorted(_items(batches)) == expected and sum(b["skipped"] for b in batches) == 0
    for batch in batches:
        for labels, count in zip(batch["superpixels"], batch["num_superpixels"]):
            assert torch.equal(labels.unique(), torch.arange(int(count)))
        assert all(mask.shape == tuple(size) for mask, size in zip(batch["full_masks"], batch["original_sizes"]))
    manifest = json.loads((out / "manifest.json").read_text())
    record = describe_shards(str(out / "*.tar"))
    assert record["config_hash"] == manifest["config_hash"]
    assert record["shards"] == {shard["name"]: shard["sha256"] for shard in manifest["shards"]}
