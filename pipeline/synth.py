"""Synthetic dataset in the exact REFER layout (DESIGN §3): coloured shapes, unambiguous refs.

Tests, the demo and CI need a REFER root that both our reader and the upstream REFER API load
unchanged, with ground truth we know exactly, built in seconds without downloading COCO. So every
object is painted from the mask pycocotools decodes from *its own stored polygon* (image and
annotation agree pixel for pixel), and every sentence is checked to single out exactly one object
of its image before it is written.

The same images and instances serve refcoco (unc: short sentences), refcoco+ (unc: no location
words, as in the real refcoco+) and refcocog (umd: longer sentences). Output is a pure function of
the arguments: each image draws from its own generator seeded by (seed, image_id), files carry no
timestamps, JSON keys are sorted, and refs are pickled at protocol 2 like the originals.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

SHAPES = ("circle", "square", "triangle")  # category ids 1, 2, 3
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 205),
    "yellow": (225, 185, 20),
    "purple": (130, 45, 160),
}
SPLITS: dict[str, tuple[str, ...]] = {"unc": ("train", "val", "testA", "testB"), "umd": ("train", "val", "test")}
# (dataset, split_by, sentence style)
OUTPUTS = (("refcoco", "unc", "short"), ("refcoco+", "unc", "no_location"), ("refcocog", "umd", "long"))
IMAGE_SUBDIR = Path("images/mscoco/images/train2014")

DEFAULT_SIDE = (192, 320)  # random width and height range: small, so the test suite stays fast
MIN_SIDE = 8  # smallest width/height that still holds one object of a few pixels
MAX_SIDE = 65500  # JPEG's limit
MIN_OBJECT_PIXELS = 4
HELD_OUT_FRACTION = 0.1  # of the images, for each split other than train
TWIN_PROBABILITY = 0.35  # an object repeats an earlier (colour, shape): needs position or size words
SIZE_RATIO = 1.5  # "largest"/"smallest" only when the area differs by at least this factor
LOCATIONS = ("left", "right", "top", "bottom")
RELATIONS = LOCATIONS + ("largest", "smallest")


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    image_dir: Path
    images: int
    objects: int
    images_per_split: dict[str, dict[str, int]]  # dataset -> split -> images
    refs_files: dict[str, Path]  # dataset -> refs(split_by).p


@dataclass(frozen=True, eq=False)
class _Object:
    shape: str
    colour: str
    size: float  # side, diameter or triangle base, in pixels
    polygon: list[float]
    rle: dict  # the polygon as pycocotools rasterises it; compact, unlike a decoded mask
    area: int
    bbox: list[float]  # [x, y, w, h], tight around the mask

    def mask(self) -> np.ndarray:
        return coco_mask.decode(self.rle).astype(bool)


@dataclass(frozen=True)
class _Description:
    colour: str | None  # None: the shape alone
    shape: str
    relation: str | None  # one of RELATIONS, or None


def synthesize(
    out: Path, images: int = 40, seed: int = 0, sizes: Sequence[tuple[int, int]] | None = None
) -> SynthSummary:
    """Write the synthetic REFER root under ``out`` and return what was written.

    ``sizes[i]`` is the (width, height) of image ``i + 1``; later images get random sizes in
    ``DEFAULT_SIDE``. Objects scale with the image, so a 17×11 image holds shapes of a few pixels
    and a 3000×2000 one shapes of hundreds.
    """
    sizes = list(sizes or [])
    _validate(images, seed, sizes)
    out = Path(out)
    image_dir = out / IMAGE_SUBDIR
    image_dir.mkdir(parents=True, exist_ok=True)

    instances: dict[str, list] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)],
    }
    layouts: list[tuple[int, list[_Object]]] = []
    for image_id in range(1, images + 1):
        rng = np.random.default_rng([seed, image_id])
        if image_id <= len(sizes):
            width, height = (int(v) for v in sizes[image_id - 1])
        else:
            width, height = (int(v) for v in rng.integers(*DEFAULT_SIDE, endpoint=True, size=2))
        objects = _describable(_place_objects(rng, width, height))
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        _paint(rng, width, height, objects).save(image_dir / file_name, format="JPEG", quality=95)
        instances["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            instances["annotations"].append({
                "id": len(instances["annotations"]) + 1,
                "image_id": image_id,
                "category_id": SHAPES.index(obj.shape) + 1,
                "segmentation": [obj.polygon],
                "bbox": obj.bbox,
                "area": obj.area,
                "iscrowd": 0,
            })
        layouts.append((image_id, objects))

    instances_bytes = json.dumps(instances, sort_keys=True, separators=(",", ":")).encode()
    split_order = np.random.default_rng([seed, 0]).permutation(np.arange(1, images + 1))
    images_per_split: dict[str, dict[str, int]] = {}
    refs_files: dict[str, Path] = {}
    for stream, (dataset, split_by, style) in enumerate(OUTPUTS, start=1):
        split_of = _assign_splits(split_order, SPLITS[split_by])
        refs = _refs(layouts, split_of, style, np.random.default_rng([seed, 0, stream]))
        (out / dataset).mkdir(parents=True, exist_ok=True)
        (out / dataset / "instances.json").write_bytes(instances_bytes)
        refs_files[dataset] = out / dataset / f"refs({split_by}).p"
        refs_files[dataset].write_bytes(pickle.dumps(refs, protocol=2))
        images_per_split[dataset] = {split: list(split_of.values()).count(split) for split in SPLITS[split_by]}
    return SynthSummary(out, image_dir, images, len(instances["annotations"]), images_per_split, refs_files)


def _validate(images: int, seed: int, sizes: list[tuple[int, int]]) -> None:
    if not _is_int(images) or images < 1:
        raise ValueError(f"images must be an integer >= 1, got {images!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if len(sizes) > images:
        raise ValueError(f"got {len(sizes)} sizes for {images} images")
    for size in sizes:
        if not (len(size) == 2 and all(_is_int(v) and MIN_SIDE <= v <= MAX_SIDE for v in size)):
            raise ValueError(f"each size must be (width, height) with integers in {MIN_SIDE}..{MAX_SIDE}, got {size!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _assign_splits(order: np.ndarray, splits: tuple[str, ...]) -> dict[int, str]:
    """Split by image: ~10% for each held-out split, at least one image each while there are
    images to spare, and train keeps at least one."""
    held_out = max(1, round(HELD_OUT_FRACTION * len(order)))
    counts = {}
    spare = len(order) - 1
    for split in splits[1:]:
        counts[split] = min(held_out, spare)
        spare -= counts[split]
    counts[splits[0]] = len(order) - sum(counts.values())
    names = [split for split in splits for _ in range(counts[split])]
    return {int(image_id): split for image_id, split in zip(order, names, strict=True)}


def _place_objects(rng: np.random.Generator, width: int, height: int) -> list[_Object]:
    """2-5 shapes at random places (fewer when there is no room), none touching another: a gap
    keeps JPEG bleed of one shape off the next."""
    side = min(width, height)
    low, high = max(4.0, 0.15 * side), max(4.0, 0.4 * side)
    gap = max(1, round(0.02 * side))
    occupied = np.zeros((height, width), dtype=bool)
    objects: list[_Object] = []
    for _ in range(rng.integers(2, 6)):
        twin = objects[rng.integers(len(objects))] if objects and rng.random() < TWIN_PROBABILITY else None
        if twin is None:
            shape, colour, size = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))], None
        else:  # clearly bigger or smaller than its twin, so size words can tell them apart
            shape, colour = twin.shape, twin.colour
            bigger = twin.size < (low + high) / 2
            size = min(high, twin.size * SIZE_RATIO) if bigger else max(low, twin.size / SIZE_RATIO)
        for _attempt in range(30):
            obj = _shape(shape, colour, rng.uniform(low, high) if size is None else size, rng, width, height)
            if obj.area >= MIN_OBJECT_PIXELS and not (obj.mask() & occupied).any():
                x, y, w, h = (int(v) for v in obj.bbox)
                occupied[max(0, y - gap): y + h + gap, max(0, x - gap): x + w + gap] = True
                objects.append(obj)
                break
    return objects


def _shape(shape: str, colour: str, size: float, rng: np.random.Generator, width: int, height: int) -> _Object:
    x, y = rng.uniform(0, width - size), rng.uniform(0, height - size)
    if shape == "square":
        points = [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
    elif shape == "triangle":
        points = [(x + size / 2, y), (x + size, y + size), (x, y + size)]
    else:  # circle: a 32-gon
        r = size / 2
        angles = [2 * math.pi * k / 32 for k in range(32)]
        points = [(x + r + r * math.cos(a), y + r + r * math.sin(a)) for a in angles]
    polygon = [round(float(v), 2) for point in points for v in point]
    rle = coco_mask.merge(coco_mask.frPyObjects([polygon], height, width))
    bbox = [float(v) for v in coco_mask.toBbox(rle)]
    return _Object(shape, colour, size, polygon, rle, int(coco_mask.area(rle)), bbox)


def _paint(rng: np.random.Generator, width: int, height: int, objects: list[_Object]) -> Image.Image:
    """A light background, plain or with a mild gradient and grain, then each object's mask."""
    base = rng.integers(215, 251, size=3).astype(np.float32)
    pixels = np.broadcast_to(base, (height, width, 3)).copy()
    if rng.random() < 0.5:
        horizontal = rng.random() < 0.5
        ramp = np.linspace(-6.0, 6.0, width if horizontal else height, dtype=np.float32)
        ramp = ramp[None, :, None] if horizontal else ramp[:, None, None]
        pixels += ramp + rng.normal(0.0, 3.0, size=(height, width, 1)).astype(np.float32)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    for obj in objects:
        image[obj.mask()] = COLOURS[obj.colour]
    return Image.fromarray(image)


def _selects(description: _Description, objects: list[_Object]) -> list[int]:
    """Indices of the objects a description refers to; a relation needs at least two candidates
    and picks only an object that *clearly* beats every other candidate."""
    candidates = [
        i for i, obj in enumerate(objects)
        if obj.shape == description.shape and description.colour in (None, obj.colour)
    ]
    if description.relation is None:
        return candidates
    if len(candidates) < 2:
        return []
    return [
        i for i in candidates
        if all(_beats(objects[i], objects[j], description.relation) for j in candidates if j != i)
    ]


def _beats(a: _Object, b: _Object, relation: str) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.bbox, b.bbox
    return {
        "left": ax + aw <= bx,
        "right": ax >= bx + bw,
        "top": ay + ah <= by,
        "bottom": ay >= by + bh,
        "largest": a.area >= SIZE_RATIO * b.area,
        "smallest": a.area * SIZE_RATIO <= b.area,
    }[relation]


def _descriptions(index: int, objects: list[_Object], location_words: bool) -> list[_Description]:
    """Every description that singles out ``objects[index]``, plainest first."""
    obj = objects[index]
    relations = (None,) + (RELATIONS if location_words else tuple(r for r in RELATIONS if r not in LOCATIONS))
    candidates = [_Description(colour, obj.shape, relation) for relation in relations for colour in (obj.colour, None)]
    return [d for d in candidates if _selects(d, objects) == [index]]


def _describable(objects: list[_Object]) -> list[_Object]:
    """Drop objects that cannot be described without location words (refcoco+ has none), one
    at a time, since each removal can make the others describable."""
    while True:
        for index in range(len(objects)):
            if not _descriptions(index, objects, location_words=False):
                objects = objects[:index] + objects[index + 1:]
                break
        else:
            return objects


def _sentence(description: _Description, style: str) -> str:
    noun = f"{description.colour} {description.shape}" if description.colour else description.shape
    relation = description.relation
    if style == "long":
        return {
            None: f"the {noun} that can be seen in the picture",
            "left": f"the {noun} that is on the left side of the picture",
            "right": f"the {noun} that is on the right side of the picture",
            "top": f"the {noun} that is near the top of the picture",
            "bottom": f"the {noun} that is near the bottom of the picture",
            "largest": f"the largest of the {noun}s in the picture",
            "smallest": f"the smallest of the {noun}s in the picture",
        }[relation]
    return {
        None: f"the {noun}",
        "left": f"the {noun} on the left",
        "right": f"the {noun} on the right",
        "top": f"the {noun} at the top",
        "bottom": f"the {noun} at the bottom",
        "largest": f"the largest {noun}",
        "smallest": f"the smallest {noun}",
    }[relation]


def _refs(
    layouts: list[tuple[int, list[_Object]]], split_of: dict[int, str], style: str, rng: np.random.Generator
) -> list[dict]:
    """One REFER ref per object, with 1-3 sentences and REFER's field names and id conventions."""
    refs: list[dict] = []
    sent_id = 0
    ann_id = 0
    for image_id, objects in layouts:
        for index, obj in enumerate(objects):
            ann_id += 1
            descriptions = _descriptions(index, objects, location_words=style != "no_location")
            sentences = []
            for description in descriptions[: rng.integers(1, 4)]:
                sent = _sentence(description, style)
                sentences.append({"sent_id": sent_id, "sent": sent, "raw": sent.capitalize(), "tokens": sent.split()})
                sent_id += 1
            refs.append({
                "ref_id": len(refs),
                "ann_id": ann_id,
                "image_id": image_id,
                "category_id": SHAPES.index(obj.shape) + 1,
                "split": split_of[image_id],
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences,
            })
    return refs
