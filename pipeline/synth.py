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

``probe`` makes data on which colour and shape never single out the referred object, so that a
model must use what one part of the projector adds (``bench.ablation``):

- ``place``: every object has a twin of its colour and shape, clearly larger or smaller, somewhere
  else; only place or size words tell them apart (what SSPE encodes: each token's box, centre and area);
- ``inside``: twins of one colour, shape and size that differ only inside, striped vs plain with
  the same mean colour (what mean pooling erases and SSA's inside attention can read back), or only
  around, next to another object vs standing alone (what SSA's outside attention sees). The
  sentences name no place or size: those would tell the twins apart without the inside or outside.

Without ``probe`` not one byte changes from the plain dataset's.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable, Sequence
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
PROBES = ("place", "inside")
TEXTURES = ("striped", "plain")  # the inside probe's relations of detail; "next to ..." and ALONE are of context
ALONE = "alone"
GROUP_ATTEMPTS = 4  # a probe's group of objects that does not fit is tried again this many times in all
NEXT_TO = "next to the"  # + the colour and shape of the object next to it
NEAR_GAP = 0.25  # boxes at most this far apart, in sides of the smaller object: it is next to the other
ALONE_GAP = 0.5  # ... at least this far from every other, in sides of the larger of each two: it is alone
STRIPE_WIDTH = 0.03  # of the object's size (2 pixels at least): thin enough that felzenszwalb keeps an object whole
STRIPE_CONTRAST = 48  # how far the two stripe colours lie from the object's colour, per channel, at most
STRIPE_MARGIN = 16  # ... and how far from 0 and 255 they stay


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
    texture: str = "plain"  # "striped": the inside probe's twin whose stripes average to its colour

    def mask(self) -> np.ndarray:
        return coco_mask.decode(self.rle).astype(bool)


@dataclass(frozen=True)
class _Description:
    colour: str | None  # None: the shape alone
    shape: str
    relation: str | None  # one of RELATIONS, TEXTURES, ALONE, "next to the <colour> <shape>", or None


def synthesize(
    out: Path, images: int = 40, seed: int = 0, sizes: Sequence[tuple[int, int]] | None = None,
    probe: str | None = None,
) -> SynthSummary:
    """Write the synthetic REFER root under ``out`` and return what was written.

    ``sizes[i]`` is the (width, height) of image ``i + 1``; later images get random sizes in
    ``DEFAULT_SIDE``. Objects scale with the image, so a 17×11 image holds shapes of a few pixels
    and a 3000×2000 one shapes of hundreds. ``probe``: one of ``PROBES`` (see the module's doc), or
    None for the plain dataset.
    """
    sizes = list(sizes or [])
    _validate(images, seed, sizes, probe)
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
        placed = _place_objects(rng, width, height) if probe is None else _probe_objects(probe, rng, width, height)
        objects = _describable(placed, probe)
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
        refs = _refs(layouts, split_of, style, np.random.default_rng([seed, 0, stream]), probe)
        (out / dataset).mkdir(parents=True, exist_ok=True)
        (out / dataset / "instances.json").write_bytes(instances_bytes)
        refs_files[dataset] = out / dataset / f"refs({split_by}).p"
        refs_files[dataset].write_bytes(pickle.dumps(refs, protocol=2))
        images_per_split[dataset] = {split: list(split_of.values()).count(split) for split in SPLITS[split_by]}
    return SynthSummary(out, image_dir, images, len(instances["annotations"]), images_per_split, refs_files)


def _validate(images: int, seed: int, sizes: list[tuple[int, int]], probe: str | None) -> None:
    if probe is not None and probe not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
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


class _Canvas:
    """The objects of one image so far, the space they (and a gap around each) take, and the size range
    of new ones: the gap keeps JPEG bleed of one shape off the next."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.rng, self.width, self.height = rng, width, height
        side = min(width, height)
        self.low, self.high = max(4.0, 0.15 * side), max(4.0, 0.4 * side)
        self.gap = max(1, round(0.02 * side))
        self.occupied = np.zeros((height, width), dtype=bool)
        self.objects: list[_Object] = []

    def place(self, shape: str, colour: str, size: float | None, texture: str = "plain",
              near: _Object | None = None, accept: Callable[[_Object], bool] | None = None) -> _Object | None:
        """Add an object at a random free place (30 tries; ``size`` None: random in the range, drawn
        at each try), next to ``near`` if given, where ``accept`` holds if given; None if none fits."""
        for _attempt in range(100 if near is not None else 30):
            side = self.rng.uniform(self.low, self.high) if size is None else size
            origin = None if near is None else _around(near, side, self.width, self.height)
            obj = _shape(shape, colour, side, self.rng, self.width, self.height, origin, texture)
            if (obj.area >= MIN_OBJECT_PIXELS and not (obj.mask() & self.occupied).any()
                    and (near is None or _is_near(obj, near)) and (accept is None or accept(obj))):
                x, y, w, h = (int(v) for v in obj.bbox)
                gap = self.gap
                self.occupied[max(0, y - gap): y + h + gap, max(0, x - gap): x + w + gap] = True
                self.objects.append(obj)
                return obj
        return None

    def kinds(self, count: int) -> list[tuple[str, str]]:
        """``count`` different (shape, colour) pairs, at random."""
        pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
        return [pairs[i] for i in self.rng.choice(len(pairs), size=count, replace=False)]


def _place_objects(rng: np.random.Generator, width: int, height: int) -> list[_Object]:
    """2-5 shapes at random places (fewer when there is no room), none touching another."""
    canvas = _Canvas(rng, width, height)
    for _ in range(rng.integers(2, 6)):
        objects = canvas.objects
        twin = objects[rng.integers(len(objects))] if objects and rng.random() < TWIN_PROBABILITY else None
        if twin is None:
            shape, colour, size = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))], None
        else:  # clearly bigger or smaller than its twin, so size words can tell them apart
            shape, colour = twin.shape, twin.colour
            bigger = twin.size < (canvas.low + canvas.high) / 2
            size = min(canvas.high, twin.size * SIZE_RATIO) if bigger else max(canvas.low, twin.size / SIZE_RATIO)
        canvas.place(shape, colour, size)
    return canvas.objects


def _probe_objects(probe: str, rng: np.random.Generator, width: int, height: int) -> list[_Object]:
    """The objects of one probe image (see the module's doc). A group (twins, and the twin's
    neighbour) that does not fit whole is taken out whole and tried again, a few times: no twin is
    ever left without its twin (an image may end up with fewer groups, even none)."""
    canvas = _Canvas(rng, width, height)
    if probe == "place":  # one or two pairs of twins, one 1.5 times the other's side (2.25 times its area)
        for shape, colour in canvas.kinds(int(rng.integers(1, 3))):
            for _attempt in range(GROUP_ATTEMPTS):
                small = rng.uniform(canvas.low, canvas.high / SIZE_RATIO)
                before = len(canvas.objects)
                if (canvas.place(shape, colour, small * SIZE_RATIO) is not None
                        and canvas.place(shape, colour, small) is not None):
                    break
                del canvas.objects[before:]
        return canvas.objects
    texture, context = {0: (True, False), 1: (False, True), 2: (True, True)}[int(rng.integers(3))]
    (shape, colour), (twin_shape, twin_colour), (other_shape, other_colour) = canvas.kinds(3)
    for _attempt in range(GROUP_ATTEMPTS if context else 0):  # twin A next to another object, twin B alone
        size = rng.uniform(canvas.low, canvas.high)
        first = canvas.place(twin_shape, twin_colour, size)
        if (first is not None and canvas.place(other_shape, other_colour, None, near=first) is not None
                and canvas.place(twin_shape, twin_colour, size,
                                 accept=lambda obj: all(_is_alone(obj, other) for other in canvas.objects))):
            break
        canvas.objects.clear()
    loners = canvas.objects[-1:]  # twin B, placed last: nothing placed after it may come near

    def apart(obj: _Object) -> bool:
        return all(_is_alone(loner, obj) for loner in loners)

    for _attempt in range(GROUP_ATTEMPTS if texture else 0):  # striped and plain twins of the same size
        size = rng.uniform(canvas.low, canvas.high)
        before = len(canvas.objects)
        if (canvas.place(shape, colour, size, "striped", accept=apart) is not None
                and canvas.place(shape, colour, size, accept=apart) is not None):
            break
        del canvas.objects[before:]
    return canvas.objects


def _box_gap(a: _Object, b: _Object) -> float:
    """Distance between the two objects' boxes (0 when they overlap), in pixels."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.bbox, b.bbox
    return math.hypot(max(0.0, bx - (ax + aw), ax - (bx + bw)), max(0.0, by - (ay + ah), ay - (by + bh)))


def _is_near(a: _Object, b: _Object) -> bool:
    """``a`` and ``b`` are next to each other (in scale with the smaller: see ``NEAR_GAP``)."""
    return _box_gap(a, b) <= NEAR_GAP * min(a.size, b.size)


def _is_alone(a: _Object, b: _Object) -> bool:
    """``a`` and ``b`` are far apart (in scale with the larger: see ``ALONE_GAP``)."""
    return _box_gap(a, b) >= ALONE_GAP * max(a.size, b.size)


def _around(near: _Object, size: float, width: int, height: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where the top-left corner of a ``size`` object may go for it to lie close to ``near``:
    within ``NEAR_GAP`` of ``size`` of its box on every side (and inside the image)."""
    x, y, w, h = near.bbox
    reach = NEAR_GAP * size
    xs = (max(0.0, x - size - reach), min(width - size, x + w + reach))
    ys = (max(0.0, y - size - reach), min(height - size, y + h + reach))
    return (xs[0], max(xs)), (ys[0], max(ys))


def _shape(shape: str, colour: str, size: float, rng: np.random.Generator, width: int, height: int,
           origin: tuple[tuple[float, float], tuple[float, float]] | None = None, texture: str = "plain") -> _Object:
    """A ``shape`` of side (diameter, base) ``size`` whose box's top-left corner is drawn uniformly from
    ``origin`` (x range, y range), by default from anywhere the shape fits in the image."""
    (x_low, x_high), (y_low, y_high) = origin or ((0, width - size), (0, height - size))
    x, y = rng.uniform(x_low, x_high), rng.uniform(y_low, y_high)
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
    return _Object(shape, colour, size, polygon, rle, int(coco_mask.area(rle)), bbox, texture)


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
        mask = obj.mask()
        image[mask] = COLOURS[obj.colour] if obj.texture == "plain" else _stripes(obj, mask)
    return Image.fromarray(image)


def _stripes(obj: _Object, mask: np.ndarray) -> np.ndarray:
    """The pixels of a striped object, ``(mask.sum(), 3)`` uint8: diagonal stripes of two colours
    either side of the object's colour, whose mean over the mask is that colour (to half a level
    per channel, the rounding): the more numerous stripe pixels lie nearer the colour, and both stay
    ``STRIPE_MARGIN`` inside 0..255, where JPEG's ringing would be clipped and shift the mean."""
    colour = np.array(COLOURS[obj.colour], dtype=np.float64)
    contrast = np.clip(np.minimum(colour, 255 - colour) - STRIPE_MARGIN, 0, STRIPE_CONTRAST)
    rows, cols = np.nonzero(mask)
    width = max(2, round(STRIPE_WIDTH * obj.size))
    first = ((rows + cols) // width) % 2 == 0
    many, few = (first, ~first) if first.sum() >= (~first).sum() else (~first, first)
    pixels = np.empty((len(rows), 3))
    pixels[few] = colour + contrast
    pixels[many] = colour - contrast * few.sum() / max(1, many.sum())
    return np.rint(pixels).astype(np.uint8)


def _selects(description: _Description, objects: list[_Object]) -> list[int]:
    """Indices of the objects a description refers to. A texture, "alone" or "next to" says what the
    object itself is or has around it; a place or size relation needs at least two candidates and
    picks only an object that *clearly* beats every other candidate."""
    candidates = [
        i for i, obj in enumerate(objects)
        if obj.shape == description.shape and description.colour in (None, obj.colour)
    ]
    relation = description.relation
    if relation is None:
        return candidates
    if relation in TEXTURES:
        return [i for i in candidates if objects[i].texture == relation]
    if relation == ALONE:
        return [i for i in candidates if all(_is_alone(objects[i], obj) for obj in objects if obj is not objects[i])]
    if relation.startswith(NEXT_TO):
        return [i for i in candidates if any(_is_near(objects[i], obj) for obj in objects
                                             if obj is not objects[i] and relation == _next_to(obj))]
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


def _next_to(obj: _Object) -> str:
    return f"{NEXT_TO} {obj.colour} {obj.shape}"


def _relations(objects: list[_Object], location_words: bool, probe: str | None) -> tuple[str | None, ...]:
    """What a description may add to colour and shape: in the inside probe only what lies inside
    or around the object (place or size would tell its twins apart without either)."""
    if probe == "inside":
        return (None, *TEXTURES, ALONE, *dict.fromkeys(_next_to(obj) for obj in objects))
    return (None,) + (RELATIONS if location_words else tuple(r for r in RELATIONS if r not in LOCATIONS))


def _descriptions(index: int, objects: list[_Object], location_words: bool, probe: str | None) -> list[_Description]:
    """Every description that singles out ``objects[index]``, plainest first."""
    obj = objects[index]
    relations = _relations(objects, location_words, probe)
    candidates = [_Description(colour, obj.shape, relation) for relation in relations for colour in (obj.colour, None)]
    return [d for d in candidates if _selects(d, objects) == [index]]


def _describable(objects: list[_Object], probe: str | None) -> list[_Object]:
    """Drop objects that cannot be described without location words (refcoco+ has none), one
    at a time, since each removal can make the others describable."""
    while True:
        for index in range(len(objects)):
            if not _descriptions(index, objects, location_words=False, probe=probe):
                objects = objects[:index] + objects[index + 1:]
                break
        else:
            return objects


def _sentence(description: _Description, style: str) -> str:
    noun = f"{description.colour} {description.shape}" if description.colour else description.shape
    relation = description.relation
    if relation is not None and relation.startswith(NEXT_TO):  # the same words in every style
        return f"the {noun} that is {relation}" if style == "long" else f"the {noun} {relation}"
    if style == "long":
        return {
            None: f"the {noun} that can be seen in the picture",
            "left": f"the {noun} that is on the left side of the picture",
            "right": f"the {noun} that is on the right side of the picture",
            "top": f"the {noun} that is near the top of the picture",
            "bottom": f"the {noun} that is near the bottom of the picture",
            "largest": f"the largest of the {noun}s in the picture",
            "smallest": f"the smallest of the {noun}s in the picture",
            "striped": f"the {noun} that is striped",
            "plain": f"the {noun} that is plain",
            ALONE: f"the {noun} that is alone in the picture",
        }[relation]
    return {
        None: f"the {noun}",
        "left": f"the {noun} on the left",
        "right": f"the {noun} on the right",
        "top": f"the {noun} at the top",
        "bottom": f"the {noun} at the bottom",
        "largest": f"the largest {noun}",
        "smallest": f"the smallest {noun}",
        "striped": f"the striped {noun}",
        "plain": f"the plain {noun}",
        ALONE: f"the {noun} alone",
    }[relation]


def _refs(
    layouts: list[tuple[int, list[_Object]]], split_of: dict[int, str], style: str, rng: np.random.Generator,
    probe: str | None,
) -> list[dict]:
    """One REFER ref per object, with 1-3 sentences and REFER's field names and id conventions."""
    refs: list[dict] = []
    sent_id = 0
    ann_id = 0
    for image_id, objects in layouts:
        for index, obj in enumerate(objects):
            ann_id += 1
            descriptions = _descriptions(index, objects, location_words=style != "no_location", probe=probe)
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
