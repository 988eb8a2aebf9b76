"""REFER reader: the restricted unpickler, grouping per image, masks, and per-image problems."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.refer import (
    AnnotationProblem,
    ReferError,
    UnsafePickleError,
    encode_mask,
    load_refer,
    load_refs_pickle,
    ref_mask,
)
from pipeline.synth import COLOURS, SPLITS

# ------------------------------------------------------------------------------------------------
# Restricted unpickler


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _Exploit(marker)], protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*(posix|nt)\.system"):
        load_refs_pickle(path)
    assert not marker.exists()


def test_objects_of_any_class_are_refused(tmp_path):
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([Path("x")], protocol=2))
    with pytest.raises(UnsafePickleError, match="pathlib"):
        load_refs_pickle(path)


def test_persistent_ids_are_refused(tmp_path):
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "external" if obj == "hook" else None

    buffer = io.BytesIO()
    WithPersistentIds(buffer, protocol=2).dump([{"a": "hook"}])
    path = tmp_path / "refs.p"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_refs_pickle(path)


PLAIN = [{"ref_id": 0, "sentences": [{"sent": "the red circle", "tokens": ["the", "red"]}],
          "bbox": (1.5, 2, 3, 4), "ok": True, "none": None, "big": 2**70, "neg": -1.25e-3}]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_loads_at_every_protocol(tmp_path, protocol):
    data = PLAIN + ([{"blob": b"\x00\xff"}] if protocol >= 3 else [])  # py3 bytes below 3 need a global
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_refs_pickle(path) == data


def test_a_python2_protocol_2_pickle_loads_with_utf8_text(tmp_path):
    # What Python 2 writes for [{'sent': 'caf\xc3\xa9', 'ref_id': 2**32L, u'raw': u'caf\xe9'}]:
    # byte strings (SHORT_BINSTRING), a long (LONG1) and unicode (BINUNICODE).
    path = tmp_path / "refs.p"
    path.write_bytes(
        b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x05caf\xc3\xa9q\x03U\x06ref_idq\x04\x8a\x05\x00\x00\x00\x00\x01"
        b"X\x03\x00\x00\x00rawq\x05X\x05\x00\x00\x00caf\xc3\xa9q\x06ua."
    )
    assert load_refs_pickle(path) == [{"sent": "café", "ref_id": 2**32, "raw": "café"}]


@pytest.mark.parametrize(
    "payload, message",
    [
        (pickle.dumps({"refs": []}, protocol=2), "expected a list"),
        (pickle.dumps([{"ref_id": 1}, "not a dict"], protocol=2), r"ref #1 is a str"),
        (b"this is not a pickle", "not a readable pickle"),
        (b"", "not a readable pickle"),
    ],
    ids=["dict-top-level", "non-dict-ref", "garbage", "empty"],
)
def test_malformed_refs_file_is_a_refer_error_naming_it(tmp_path, payload, message):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(payload)
    with pytest.raises(ReferError, match=message) as caught:
        load_refs_pickle(path)
    assert not isinstance(caught.value, UnsafePickleError)
    assert str(path) in str(caught.value)


# ------------------------------------------------------------------------------------------------
# load_refer on the synthetic dataset


def _raw_refs(root: Path, dataset: str, split_by: str) -> list[dict]:
    with open(root / dataset / f"refs({split_by}).p", "rb") as file:
        return pickle.load(file)


@pytest.mark.parametrize("dataset, split_by", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")])
def test_refs_are_grouped_per_split_and_image(synth_root, dataset, split_by):
    refer = load_refer(synth_root, dataset, split_by)
    raw = _raw_refs(synth_root, dataset, split_by)
    assert refer.problems == []
    assert refer.splits == sorted(SPLITS[split_by])
    assert [(s.split, s.image.image_id) for s in refer.samples] == sorted({(r["split"], r["image_id"]) for r in raw})
    for sample in refer.samples:
        key = (sample.split, sample.image.image_id)
        expected = sorted(r["ref_id"] for r in raw if (r["split"], r["image_id"]) == key)
        assert [r.ref_id for r in sample.refs] == expected
        assert refer.image_path(sample.image).is_file()
        for ref in sample.refs:
            assert ref.split == sample.split
            assert all(set(s) == {"sent_id", "sent", "raw", "tokens"} for s in ref.sentences)
    assert refer.categories == {1: "circle", 2: "square", 3: "triangle"}
    assert refer.refs_path == synth_root / dataset / f"refs({split_by}).p"
    assert refer.instances_path == synth_root / dataset / "instances.json"


def test_masks_match_the_painted_pixels_and_the_boxes(synth_root):
    refer = load_refer(synth_root, "refcoco", "unc")
    palette = np.array(list(COLOURS.values()), dtype=np.int32)
    for sample in refer.samples:
        pixels = np.asarray(Image.open(refer.image_path(sample.image)).convert("RGB"), dtype=np.int32)
        assert pixels.shape[:2] == (sample.image.height, sample.image.width)
        nearest = np.abs(pixels[:, :, None, :] - palette).sum(-1)
        painted = nearest.min(-1) < 90  # near some shape colour, i.e. not background
        union = np.zeros(painted.shape, dtype=bool)
        for ref in sample.refs:
            mask = ref_mask(ref.segmentation, sample.image.height, sample.image.width).astype(bool)
            assert mask.dtype == bool and mask.any()
            rows, cols = np.nonzero(mask)
            x, y = cols.min(), rows.min()
            assert ref.bbox == [x, y, cols.max() - x + 1, rows.max() - y + 1]
            colours = nearest.argmin(-1)[mask & painted]
            assert np.bincount(colours).max() >= 0.9 * mask.sum()  # one flat colour per object
            union |= mask
        assert (union & painted).sum() >= 0.95 * (union | painted).sum()


@pytest.mark.parametrize(
    "dataset, split_by, valid",
    [
        ("refclef", "unc", "refcoco, refcoco+, refcocog"),
        ("refcoco+", "google", "unc"),
        ("refcocog", "unc", "umd, google"),
    ],
)
def test_bad_dataset_or_split_by_fails_before_touching_files(tmp_path, dataset, split_by, valid):
    missing = tmp_path / "no-such-root"
    with pytest.raises(ReferError, match=re.escape(valid)) as caught:
        load_refer(missing, dataset, split_by)
    assert str(missing) not in str(caught.value)


@pytest.mark.parametrize("name", ["refs(unc).p", "instances.json"])
def test_a_missing_file_is_named(synth_root, tmp_path, name):
    root = _copy_annotations(synth_root, tmp_path, "refcoco")
    (root / "refcoco" / name).unlink()
    with pytest.raises(ReferError, match="not found") as caught:
        load_refer(root, "refcoco", "unc")
    assert str(root / "refcoco" / name) in str(caught.value)


@pytest.mark.parametrize(
    "content, message",
    [(b"{not json", "not valid JSON"), (b"[]", "JSON object"), (b'{"images": [], "categories": []}', "'annotations'"),
     (b'{"images": [], "annotations": [], "categories": [{"id": 1}]}', "malformed category")],
    ids=["not-json", "list", "no-annotations", "bad-category"],
)
def test_a_broken_instances_file_raises_naming_it(synth_root, tmp_path, content, message):
    root = _copy_annotations(synth_root, tmp_path, "refcoco")
    (root / "refcoco" / "instances.json").write_bytes(content)
    with pytest.raises(ReferError, match=message) as caught:
        load_refer(root, "refcoco", "unc")
    assert str(root / "refcoco" / "instances.json") in str(caught.value)


def _copy_annotations(synth_root: Path, tmp_path: Path, dataset: str) -> Path:
    root = tmp_path / "root"
    shutil.copytree(synth_root / dataset, root / dataset)
    return root


def _set_ann_id(refs, instances, image_id):
    next(r for r in refs if r["image_id"] == image_id)["ann_id"] = 999_999


def _drop_sent(refs, instances, image_id):
    del next(r for r in refs if r["image_id"] == image_id)["sentences"][0]["sent"]


def _drop_split(refs, instances, image_id):
    del next(r for r in refs if r["image_id"] == image_id)["split"]


def _drop_segmentation(refs, instances, image_id):
    del next(a for a in instances["annotations"] if a["image_id"] == image_id)["segmentation"]


def _short_polygon(refs, instances, image_id):
    next(a for a in instances["annotations"] if a["image_id"] == image_id)["segmentation"] = [[1, 2, 3, 4]]


def _drop_image(refs, instances, image_id):
    instances["images"] = [i for i in instances["images"] if i["id"] != image_id]


def _escaping_file_name(refs, instances, image_id):
    next(i for i in instances["images"] if i["id"] == image_id)["file_name"] = "../../etc/passwd"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_set_ann_id, "ann_id 999999 is not in instances.json"),
        (_drop_sent, "has no 'sent'"),
        (_drop_split, "has no 'split'"),
        (_drop_segmentation, "has no 'segmentation'"),
        (_short_polygon, "4 coordinates"),
        (_drop_image, "image_id 3 is not in instances.json"),
        (_escaping_file_name, "plain file name"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_a_malformed_image_record_is_a_problem_and_the_rest_loads(
    synth_root, tmp_path, corrupt: Callable, message: str
):
    root = _copy_annotations(synth_root, tmp_path, "refcoco")
    refs = _raw_refs(root, "refcoco", "unc")
    instances = json.loads((root / "refcoco" / "instances.json").read_text())
    corrupt(refs, instances, 3)
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))

    refer = load_refer(root, "refcoco", "unc")
    [problem] = refer.problems
    assert isinstance(problem, AnnotationProblem) and problem.image_id == 3
    assert message in problem.error
    assert problem.file_name == next((i["file_name"] for i in instances["images"] if i["id"] == 3), "")
    assert {s.image.image_id for s in refer.samples} == {r["image_id"] for r in refs} - {3}


def test_a_ref_without_image_id_is_a_problem(synth_root, tmp_path):
    root = _copy_annotations(synth_root, tmp_path, "refcoco")
    refs = _raw_refs(root, "refcoco", "unc")
    del refs[0]["image_id"]
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    refer = load_refer(root, "refcoco", "unc")
    assert [(p.image_id, "ref_id 0" in p.error) for p in refer.problems] == [(-1, True)]
    assert sum(len(s.refs) for s in refer.samples) == len(refs) - 1


# ------------------------------------------------------------------------------------------------
# Masks


def test_polygons_rle_and_compressed_rle_decode_to_the_same_mask():
    polygons = [[1, 1, 8, 1, 8, 8, 1, 8], [10.5, 2, 14, 2, 12, 7]]  # a square and a triangle
    mask = ref_mask(polygons, 10, 16)
    assert mask.dtype == np.uint8 and mask.shape == (10, 16) and set(np.unique(mask)) == {0, 1}
    assert mask[1:8, 1:8].all() and mask[:, :9].sum() == 49 and mask[:, 9:].sum() > 0
    compressed = encode_mask(mask)
    assert isinstance(compressed["counts"], str) and compressed["size"] == [10, 16]
    json.dumps(compressed)
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [10, 16], "counts": ([0] if flat[0] else []) + runs}
    for segmentation in (compressed, uncompressed, {**compressed, "counts": compressed["counts"].encode()}):
        np.testing.assert_array_equal(ref_mask(segmentation, 10, 16), mask)


def test_encode_mask_round_trips_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(1, 40, size=2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        np.testing.assert_array_equal(ref_mask(encode_mask(mask), height, width), mask)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([], "empty polygon list"),
        ([[1, 1, 5, 1]], "4 coordinates"),
        ([[1, 1, 5, 1, 5]], "5 coordinates"),
        ([[1, 1, "x", 1, 5, 5]], "not a list of numbers"),
        ([[1, 1, float("nan"), 1, 5, 5]], "not a list of numbers"),
        ({"size": [10, 11], "counts": [120]}, "does not match"),
        ({"size": [10, 12], "counts": [5, 10]}, "cover 15 pixels"),
        ({"size": [10, 12], "counts": [-5, 125]}, "non-negative"),
        ({"size": [10, 12], "counts": "5:"}, "cover"),
        ({"size": [10, 12], "counts": "zzzz"}, "outside"),
        ({"size": [10, 12], "counts": 7}, "list, str or bytes"),
        ("polygon", "neither"),
    ],
)
def test_unusable_segmentations_raise_with_the_reason(segmentation, message):
    with pytest.raises(ReferError, match=message):
        ref_mask(segmentation, 10, 12)
