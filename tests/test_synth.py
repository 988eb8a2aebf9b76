"""Synthetic REFER dataset: determinism, unambiguous sentences, splits, sizes, upstream compatibility."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from jobs.synth import main as synth_main
from pipeline.refer import load_refer, ref_mask
from pipeline.synth import COLOURS, PROBES, SHAPES, SPLITS, _shape, _stripes, synthesize

OUTPUTS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
IMAGE_DIR = Path("images/mscoco/images/train2014")


@pytest.fixture(scope="module")
def root40(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth40")
    synthesize(root, images=40, seed=5)
    return root


def _refs(root: Path, dataset: str) -> list[dict]:
    with open(root / dataset / f"refs({OUTPUTS[dataset]}).p", "rb") as file:
        return pickle.load(file)


def _instances(root: Path, dataset: str = "refcoco") -> dict:
    return json.loads((root / dataset / "instances.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    first, again, other = (synthesize(tmp_path / name, images=6, seed=seed) for name, seed in
                           (("a", 3), ("b", 3), ("c", 4)))
    files = _files(first.root)
    assert len(files) == 6 + 2 * len(OUTPUTS)
    assert files == _files(again.root)
    different = _files(other.root)
    assert different.keys() == files.keys()
    assert all(different[name] != files[name] for name in files if name.endswith((".p", ".jpg")))


def test_files_follow_the_refer_conventions(root40):
    instances = _instances(root40)
    assert instances["categories"] == [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
    assert [i["id"] for i in instances["images"]] == list(range(1, 41))
    for image in instances["images"]:
        assert set(image) == {"id", "file_name", "height", "width"}
        assert image["file_name"] == f"COCO_train2014_{image['id']:012d}.jpg"
        with Image.open(root40 / IMAGE_DIR / image["file_name"]) as jpg:
            assert jpg.format == "JPEG" and jpg.size == (image["width"], image["height"])
        assert 192 <= image["width"] <= 320 and 192 <= image["height"] <= 320
    per_image = np.bincount([a["image_id"] for a in instances["annotations"]], minlength=41)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 5 and per_image.mean() >= 2.5
    for ann in instances["annotations"]:
        assert set(ann) == {"id", "image_id", "category_id", "segmentation", "bbox", "area", "iscrowd"}
        assert ann["iscrowd"] == 0 and len(ann["segmentation"]) == 1
        assert len(ann["segmentation"][0]) in (8, 6, 64)  # square, triangle, 32-gon circle
    for dataset in OUTPUTS:
        assert _instances(root40, dataset) == instances  # same images and instances everywhere
        refs = _refs(root40, dataset)
        assert sorted(r["ann_id"] for r in refs) == [a["id"] for a in instances["annotations"]]  # one ref per object
        assert len({r["ref_id"] for r in refs}) == len(refs)
        for ref in refs:
            assert set(ref) == {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids",
                                "sentences"}
            assert ref["file_name"] == f"COCO_train2014_{ref['image_id']:012d}_{ref['ann_id']}.jpg"
            assert 1 <= len(ref["sentences"]) <= 3
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            for sentence in ref["sentences"]:
                assert set(sentence) == {"sent_id", "sent", "raw", "tokens"}
                assert sentence["tokens"] == sentence["sent"].split()


class UpstreamRefer:
    """What the upstream REFER class (LISA's utils/refer.py) does with a root, restated for the test:
    plain ``pickle.load`` and ``json.load``, its createIndex lookups, getRefIds' split rule and
    getMask's polygon branch. Any missing field or id raises here exactly as it would there."""

    def __init__(self, root: Path, dataset: str, split_by: str) -> None:
        self.image_dir = root / "images/mscoco/images/train2014"
        with open(root / dataset / f"refs({split_by}).p", "rb") as file:
            self.refs = pickle.load(file)
        with open(root / dataset / "instances.json", "rb") as file:
            instances = json.load(file)
        self.anns = {ann["id"]: ann for ann in instances["annotations"]}
        self.imgs = {img["id"]: img for img in instances["images"]}
        self.cats = {cat["id"]: cat["name"] for cat in instances["categories"]}
        self.ref_to_ann = {ref["ref_id"]: self.anns[ref["ann_id"]] for ref in self.refs}
        self.sents = {sent["sent_id"]: sent for ref in self.refs for sent in ref["sentences"]}
        self.sent_to_tokens = {sent["sent_id"]: sent["tokens"] for ref in self.refs for sent in ref["sentences"]}
        self.img_to_refs: dict[int, list[dict]] = {}
        for ref in self.refs:
            self.img_to_refs.setdefault(ref["image_id"], []).append(ref)

    def ref_ids(self, split: str) -> list[int]:
        if split in ("testA", "testB", "testC"):
            return [r["ref_id"] for r in self.refs if split[-1] in r["split"]]
        if split == "test":
            return [r["ref_id"] for r in self.refs if "test" in r["split"]]
        return [r["ref_id"] for r in self.refs if r["split"] == split]

    def mask(self, ref: dict) -> tuple[np.ndarray, float]:
        ann, image = self.ref_to_ann[ref["ref_id"]], self.imgs[ref["image_id"]]
        assert type(ann["segmentation"][0]) is list  # upstream's polygon test
        rle = coco_mask.frPyObjects(ann["segmentation"], image["height"], image["width"])
        return np.sum(coco_mask.decode(rle), axis=2).astype(np.uint8), sum(coco_mask.area(rle))


@pytest.mark.parametrize("dataset", list(OUTPUTS))
def test_the_upstream_refer_api_loads_every_dataset(root40, dataset):
    upstream = UpstreamRefer(root40, dataset, OUTPUTS[dataset])
    ours = {ref.ref_id: (sample.image, ref) for sample in load_refer(root40, dataset, OUTPUTS[dataset]).samples
            for ref in sample.refs}
    by_split = {split: upstream.ref_ids(split) for split in SPLITS[OUTPUTS[dataset]]}
    assert all(by_split.values())
    assert sorted(sum(by_split.values(), [])) == sorted(r["ref_id"] for r in upstream.refs)
    assert len(upstream.sents) == len(upstream.sent_to_tokens) == sum(len(r["sentences"]) for r in upstream.refs)
    assert set(upstream.cats.values()) == set(SHAPES)
    for ref in upstream.refs:
        mask, area = upstream.mask(ref)
        image, record = ours[ref["ref_id"]]
        assert mask.max() == 1 and area == mask.sum() == upstream.ref_to_ann[ref["ref_id"]]["area"]
        np.testing.assert_array_equal(mask, ref_mask(record.segmentation, image.height, image.width))
        assert (upstream.image_dir / upstream.imgs[ref["image_id"]]["file_name"]).is_file()
        assert upstream.cats[ref["category_id"]] == upstream.cats[upstream.ref_to_ann[ref["ref_id"]]["category_id"]]


def _objects(root: Path, image_id: int) -> dict[int, dict]:
    """Each object of an image as the *pixels* show it: shape, colour, centre, area."""
    instances = _instances(root)
    image = next(i for i in instances["images"] if i["id"] == image_id)
    pixels = np.asarray(Image.open(root / IMAGE_DIR / image["file_name"]).convert("RGB"), dtype=np.int32)
    names, palette = list(COLOURS), np.array(list(COLOURS.values()))
    objects = {}
    for ann in instances["annotations"]:
        if ann["image_id"] == image_id:
            mask = ref_mask(ann["segmentation"], image["height"], image["width"]).astype(bool)
            mean = pixels[mask].mean(0)
            rows, cols = np.nonzero(mask)
            objects[ann["id"]] = {"shape": SHAPES[ann["category_id"] - 1], "area": mask.sum(),
                                  "colour": names[int(np.abs(palette - mean).sum(1).argmin())],
                                  "x": cols.mean(), "y": rows.mean()}
    return objects


def _referents(tokens: list[str], objects: dict[int, dict]) -> list[int]:
    """Which objects a short sentence ("the largest red circle", "the square on the left") can
    mean, read independently of the generator: a relation must pick a strict extreme."""
    words = tokens[1:]  # "the"
    size = words.pop(0) if words[0] in ("largest", "smallest") else None
    colour = words.pop(0) if words[0] in COLOURS else None
    shape, place = words[0], (words[3] if len(words) == 4 else None)
    assert shape in SHAPES and len(words) in (1, 4), tokens
    candidates = [k for k, o in objects.items() if o["shape"] == shape and colour in (None, o["colour"])]
    if size is None and place is None:
        return candidates
    key, sign = {"largest": ("area", -1), "smallest": ("area", 1), "left": ("x", 1), "right": ("x", -1),
                 "top": ("y", 1), "bottom": ("y", -1)}[size or place]
    scores = sorted((sign * objects[k][key], k) for k in candidates)
    return [scores[0][1]] if len(scores) >= 2 and scores[0][0] < scores[1][0] else []


@pytest.mark.parametrize("dataset", ["refcoco", "refcoco+"])
def test_every_sentence_singles_out_its_own_object(root40, dataset):
    refs = _refs(root40, dataset)
    relations = set()
    for image_id in sorted({r["image_id"] for r in refs}):
        objects = _objects(root40, image_id)
        for ref in (r for r in refs if r["image_id"] == image_id):
            for sentence in ref["sentences"]:
                assert _referents(sentence["tokens"], objects) == [ref["ann_id"]], sentence["sent"]
                relations |= set(sentence["tokens"]) & {"largest", "smallest", "left", "right", "top", "bottom"}
    assert relations & {"largest", "smallest"}  # the size and position words really get exercised
    assert bool(relations & {"left", "right", "top", "bottom"}) == (dataset == "refcoco")


@pytest.mark.parametrize("dataset", list(OUTPUTS))
def test_no_two_refs_of_an_image_share_a_sentence(root40, dataset):
    seen: dict[tuple[int, str], int] = {}
    for ref in _refs(root40, dataset):
        for sentence in ref["sentences"]:
            assert seen.setdefault((ref["image_id"], sentence["sent"]), ref["ref_id"]) == ref["ref_id"], sentence


def test_refcocog_sentences_are_longer(root40):
    def mean_tokens(dataset: str) -> float:
        return float(np.mean([len(s["tokens"]) for r in _refs(root40, dataset) for s in r["sentences"]]))

    assert mean_tokens("refcocog") >= mean_tokens("refcoco") + 4


@pytest.mark.parametrize("images, train_unc", [(1, 1), (4, 1), (8, 5), (40, 28)])
def test_splits_are_by_image_and_none_is_empty_when_images_allow(tmp_path, images, train_unc):
    summary = synthesize(tmp_path, images=images, seed=0, sizes=[(24, 24)] * images)
    assert summary.images_per_split["refcoco"]["train"] == train_unc
    for dataset, split_by in OUTPUTS.items():
        counts = summary.images_per_split[dataset]
        assert sum(counts.values()) == images
        if images >= len(SPLITS[split_by]):
            assert min(counts.values()) >= 1
        split_of: dict[int, set[str]] = {}
        for ref in _refs(tmp_path, dataset):
            split_of.setdefault(ref["image_id"], set()).add(ref["split"])
        assert all(len(splits) == 1 for splits in split_of.values())
        assert {s: sum(v == {s} for v in split_of.values()) for s in SPLITS[split_by]} == counts
    assert summary.images_per_split["refcoco"] == summary.images_per_split["refcoco+"]


def test_custom_sizes_scale_the_objects(tmp_path):
    summary = synthesize(tmp_path, images=3, seed=1, sizes=[(17, 11), (1200, 800)])
    instances = _instances(tmp_path)
    assert [(i["width"], i["height"]) for i in instances["images"][:2]] == [(17, 11), (1200, 800)]
    assert summary.objects == len(instances["annotations"])
    boxes = {i: [a["bbox"] for a in instances["annotations"] if a["image_id"] == i] for i in (1, 2)}
    assert boxes[1] and all(w * h >= 4 and w <= 17 and h <= 11 for _, _, w, h in boxes[1])
    assert boxes[2] and min(max(w, h) for _, _, w, h in boxes[2]) >= 100
    tiny = np.asarray(Image.open(tmp_path / IMAGE_DIR / instances["images"][0]["file_name"]))
    assert tiny.shape == (11, 17, 3) and tiny.min() < 150  # a shape is painted, not only background


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"images": 0}, "images must be an integer >= 1"),
        ({"images": 2.5}, "images must be an integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"images": 1, "sizes": [(20, 20), (20, 20)]}, "2 sizes for 1 images"),
        ({"images": 1, "sizes": [(7, 20)]}, "width, height"),
        ({"images": 1, "sizes": [(20,)]}, "width, height"),
    ],
)
def test_invalid_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_dataset_and_reports_bad_arguments(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "d"), "--images", "5", "--seed", "2"]) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert load_refer(tmp_path / "d", "refcoco", "unc").problems == []
    assert synth_main(["--out", str(tmp_path / "e"), "--images", "0"]) == 2
    assert "images must be an integer >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ probes

# sha256 over every file of synthesize(images=6, seed=3) (a JPEG by its decoded pixels, which do not depend on
# the encoder's build) as the generator wrote it before the probes existed (commit b22097e).
PLAIN_DATASET_SHA256 = "97ed473f50ffd614f04bcd9d5e46a30573aff424a8d9c3afab1b7ca850e77d70"
PLACE_WORDS = {"largest", "smallest", "left", "right", "top", "bottom"}


def test_without_a_probe_the_dataset_is_what_it_was_before_probes(tmp_path):
    synthesize(tmp_path, images=6, seed=3)
    digest = hashlib.sha256()
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(tmp_path)).encode())
        digest.update(np.asarray(Image.open(path)).tobytes() if path.suffix == ".jpg" else path.read_bytes())
    assert digest.hexdigest() == PLAIN_DATASET_SHA256


@pytest.fixture(scope="module")
def probe_roots(tmp_path_factory) -> dict[str, Path]:
    """Each probe's dataset: 30 images, seed 7."""
    roots = {probe: tmp_path_factory.mktemp(f"probe_{probe}") for probe in PROBES}
    for probe, root in roots.items():
        synthesize(root, images=30, seed=7, probe=probe)
    return roots


def _twins(objects: dict[int, dict], key: int) -> list[int]:
    """The other objects of the same colour and shape, as the pixels show them."""
    return [k for k, o in objects.items() if k != key and (o["shape"], o["colour"]) ==
            (objects[key]["shape"], objects[key]["colour"])]


@pytest.mark.parametrize("probe", PROBES)
def test_a_probe_keeps_the_refer_layout_and_is_deterministic(probe_roots, probe, tmp_path):
    root = probe_roots[probe]
    synthesize(tmp_path, images=30, seed=7, probe=probe)
    assert _files(tmp_path) == _files(root)
    assert _files(synthesize(tmp_path / "plain", images=30, seed=7).root) != _files(root)
    for dataset, split_by in OUTPUTS.items():
        assert load_refer(root, dataset, split_by).problems == []
        upstream = UpstreamRefer(root, dataset, split_by)
        for ref in upstream.refs:
            mask, area = upstream.mask(ref)
            assert mask.max() == 1 and area == upstream.ref_to_ann[ref["ref_id"]]["area"]
        assert len(upstream.refs) >= 45  # 30 images, 2-5 objects each, few images left short


def test_place_probe_twins_differ_only_in_place_and_size_and_the_sentences_say_which(probe_roots):
    root = probe_roots["place"]
    refs = _refs(root, "refcoco") + _refs(root, "refcoco+")
    for image_id in sorted({r["image_id"] for r in refs}):
        objects = _objects(root, image_id)
        for ref in (r for r in refs if r["image_id"] == image_id):
            (twin,) = _twins(objects, ref["ann_id"])  # one twin: colour and shape never single it out
            ratio = objects[ref["ann_id"]]["area"] / objects[twin]["area"]
            assert max(ratio, 1 / ratio) >= 1.5
            for sentence in ref["sentences"]:
                assert set(sentence["tokens"]) & PLACE_WORDS, sentence["sent"]
                assert _referents(sentence["tokens"], objects) == [ref["ann_id"]], sentence["sent"]


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def _gap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return float(np.hypot(max(0, b[0] - a[2], a[0] - b[2]), max(0, b[1] - a[3], a[1] - b[3])))


def test_inside_probe_twins_differ_only_inside_or_around_and_the_sentences_say_which(probe_roots):
    root = probe_roots["inside"]
    instances = _instances(root)
    refs = _refs(root, "refcoco")
    claims = {"striped": 0, "plain": 0, "next": 0, "alone": 0}
    for image in instances["images"]:
        pixels = np.asarray(Image.open(root / IMAGE_DIR / image["file_name"]).convert("RGB"), dtype=np.float64)
        objects = _objects(root, image["id"])
        masks = {a["id"]: ref_mask(a["segmentation"], image["height"], image["width"]).astype(bool)
                 for a in instances["annotations"] if a["image_id"] == image["id"]}
        boxes = {k: _box(m) for k, m in masks.items()}
        size = {k: max(b[2] - b[0], b[3] - b[1]) for k, b in boxes.items()}
        for ref in (r for r in refs if r["image_id"] == image["id"]):
            key = ref["ann_id"]
            for sentence in ref["sentences"]:
                words = sentence["tokens"]
                assert not set(words) & PLACE_WORDS, sentence["sent"]
                if words[1] in ("striped", "plain"):  # of a twin; or a neighbour's name, which is plain too
                    inner = {k: masks[k] & ~np.pad(~masks[k], 3, constant_values=True)[3:-3, 3:-3]
                             for k in masks}  # away from the edge, where JPEG mixes in the background
                    # Stripes vary by tens of levels; a plain object by JPEG's chroma noise alone.
                    spread = {k: pixels[inner[k]].std(0).mean() for k in masks}
                    assert spread[key] > 15 if words[1] == "striped" else spread[key] < 10, sentence["sent"]
                    twins = _twins(objects, key)
                    if words[1] == "striped" or twins:
                        (twin,) = twins
                        assert spread[twin] < 10 if words[1] == "striped" else spread[twin] > 15
                        # The same mean colour: a few levels apart after JPEG, against stripes up to ±48 levels apart.
                        assert np.abs(pixels[inner[key]].mean(0) - pixels[inner[twin]].mean(0)).max() < 6
                        assert abs(objects[key]["area"] / objects[twin]["area"] - 1) < 0.1
                        claims[words[1]] += 1
                elif "next" in words:  # "the red circle next to the blue triangle"
                    colour, shape = words[-2], words[-1]
                    neighbours = [k for k, o in objects.items() if (o["colour"], o["shape"]) == (colour, shape)
                                  and k != key and _gap(boxes[key], boxes[k]) <= 0.3 * min(size[key], size[k])]
                    assert neighbours, sentence["sent"]
                    claims["next"] += 1
                elif words[-1] == "alone":
                    (twin,) = _twins(objects, key)
                    assert abs(objects[key]["area"] / objects[twin]["area"] - 1) < 0.1
                    assert all(_gap(boxes[key], boxes[k]) >= 0.45 * max(size[key], size[k]) for k in boxes if k != key)
                    claims["alone"] += 1
                else:  # a plain name: an object with no twin (the neighbour)
                    assert words[-1] in SHAPES and not _twins(objects, key), sentence["sent"]
    assert min(claims.values()) >= 5, claims  # every kind of claim is made, and checked, several times


def test_stripes_average_to_the_objects_colour():
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        for shape in SHAPES:
            obj = _shape(shape, colour, float(rng.uniform(10, 90)), rng, 100, 100, texture="striped")
            stripes = _stripes(obj, obj.mask()).astype(np.float64)
            assert np.abs(stripes.mean(0) - COLOURS[colour]).max() <= 0.5  # the rounding, no more
            assert stripes.std(0).max() > 30


def test_cli_writes_a_probe_and_refuses_an_unknown_one(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "d"), "--images", "4", "--probe", "inside"]) == 0
    sentences = [s["sent"] for r in _refs(tmp_path / "d", "refcoco") for s in r["sentences"]]
    assert sentences and all(not set(s.split()) & PLACE_WORDS for s in sentences)
    with pytest.raises(SystemExit) as exit:
        synth_main(["--out", str(tmp_path / "e"), "--probe", "colour"])
    assert exit.value.code == 2 and "--probe" in capsys.readouterr().err
