"""REFER layout reader: refs grouped per image, with masks decoded by pycocotools.

A REFER root holds ``{dataset}/refs({split_by}).p`` (a pickle), ``{dataset}/instances.json``
(COCO-style images, annotations, categories) and the COCO images under
``images/mscoco/images/train2014``. The pipeline works one *image* at a time, so this module turns
the flat ref list into one :class:`ImageRefs` per (split, image), and :func:`refer_images` turns
the datasets of one output into its samples (:class:`ReferImage`): with several datasets, one per
image, since refcoco, refcoco+ and refcocog annotate the same COCO images and each image's
superpixels need computing once.

Two trust rules shape the code:

- The refs file is a pickle that users download from third-party mirrors. It is read with an
  unpickler that refuses every global, so a crafted file cannot construct any object, let alone
  run code: REFER refs are plain lists, dicts, strings and numbers.
- Real dumps contain the odd broken record. A malformed *per-image* record makes that image an
  :class:`AnnotationProblem` (the job reports it in ``failures.jsonl``) instead of aborting a run
  over 20k images; only a broken top-level file raises.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from pipeline.errors import SvpError

DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
}
IMAGE_SUBDIR = Path("images/mscoco/images/train2014")
UNKNOWN_IMAGE_ID = -1  # AnnotationProblem.image_id of a ref that names no usable image_id


class ReferError(SvpError, ValueError):
    """A REFER root, file or record that cannot be used, with the reason and where it is."""


class UnsafePickleError(ReferError):
    """The refs pickle asked to construct an object; refused before anything ran."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class RefRecord:
    """One referred object: REFER's ref fields joined with its instances.json annotation."""

    ref_id: int
    ann_id: int
    category_id: int
    split: str
    sentences: list[dict]  # {"sent_id", "sent", "raw", "tokens"}, as in REFER
    bbox: list[float]  # [x, y, w, h] from the annotation
    segmentation: Any  # COCO polygons or RLE, as stored in the annotation


@dataclass(frozen=True)
class ImageRefs:
    """The refs of one image within one split (refcocog google puts some images in two splits)."""

    image: ImageRecord
    split: str
    refs: list[RefRecord]


@dataclass(frozen=True)
class AnnotationProblem:
    """An image left out because one of its records is malformed; ``image_id`` may be -1.

    ``split`` is the split its refs name (the first one that is a string), "" if none does;
    ``dataset`` the dataset whose records they are.
    """

    image_id: int
    file_name: str
    error: str
    split: str = ""
    dataset: str = ""


@dataclass(frozen=True)
class SplitRefs:
    """The refs that one (dataset, split) has on an image, sorted by ref_id."""

    dataset: str
    split_by: str
    split: str
    refs: tuple[RefRecord, ...]


@dataclass(frozen=True)
class ReferImage:
    """One sample of a precompute output: an image and the refs of each (dataset, split) it serves,
    sorted by (dataset, split)."""

    image: ImageRecord
    parts: tuple[SplitRefs, ...]


@dataclass(frozen=True)
class ReferDataset:
    root: Path
    dataset: str
    split_by: str
    image_dir: Path
    samples: list[ImageRefs]  # sorted by (split, image_id); refs within by ref_id
    problems: list[AnnotationProblem]  # sorted by image_id
    categories: dict[int, str]

    @property
    def splits(self) -> list[str]:
        return sorted({sample.split for sample in self.samples})

    @property
    def refs_path(self) -> Path:
        return _refs_path(self.root, self.dataset, self.split_by)

    @property
    def instances_path(self) -> Path:
        return _instances_path(self.root, self.dataset)

    def image_path(self, image: ImageRecord) -> Path:
        return self.image_dir / image.file_name


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickler for plain data only: every opcode that could reach a callable needs a global.

    GLOBAL, STACK_GLOBAL, INST, the EXT* codes (and through them REDUCE, OBJ, NEWOBJ) all resolve
    classes via ``find_class``, so refusing it there leaves nothing that can be constructed or
    called. Persistent ids are an application hook; REFER does not use them, so they are refused
    as well.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # REFER's refs were written by Python 2; its byte strings hold UTF-8 text.
        super().__init__(file, encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self._path}: refused to load global {module}.{name}; a REFER refs file holds only "
            "lists, dicts, strings and numbers"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused persistent id {pid!r}")


def load_refs_pickle(path: str | Path) -> list[dict]:
    """Load a ``refs(*.p)`` file without letting it construct objects or run code.

    Note that Python 3 writes ``bytes`` at protocols 0-2 through the ``_codecs.encode`` global,
    so such values are refused too; REFER files contain none.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            refs = _NoGlobalsUnpickler(file, path).load()
    except FileNotFoundError:
        raise ReferError(f"refs file not found: {path}") from None
    except UnsafePickleError:
        raise
    except OSError as error:
        raise ReferError(f"cannot read refs file {path}: {error}") from None
    except Exception as error:  # a corrupt pickle can fail in many ways; all mean the same here
        raise ReferError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    if not isinstance(refs, list):
        raise ReferError(f"{path}: expected a list of refs at the top level, got {type(refs).__name__}")
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ReferError(f"{path}: ref #{index} is a {type(ref).__name__}, expected a dict")
    return refs


def _load_instances(path: Path) -> dict[str, list]:
    """instances.json with its three top-level lists checked; anything deeper is per image."""
    try:
        with path.open("rb") as file:
            instances = json.load(file)
    except FileNotFoundError:
        raise ReferError(f"instances file not found: {path}") from None
    except OSError as error:
        raise ReferError(f"cannot read instances file {path}: {error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ReferError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(instances, dict):
        raise ReferError(f"{path}: expected a JSON object at the top level, got {type(instances).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances.get(key), list):
            raise ReferError(f"{path}: {key!r} is missing or not a list")
    return instances


def _categories(raw: list, path: Path) -> dict[int, str]:
    """Category names; global metadata, so a malformed entry breaks the whole file."""
    categories = {}
    for entry in raw:
        if not (isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get("name"), str)):
            raise ReferError(f"{path}: malformed category {entry!r}: needs an integer 'id' and a string 'name'")
        categories[entry["id"]] = entry["name"]
    return categories


def _by_id(entries: list) -> dict[int, dict]:
    """Index entries by their integer ``id``; entries without one cannot be referred to anyway."""
    return {entry["id"]: entry for entry in entries if isinstance(entry, dict) and _is_int(entry.get("id"))}


def load_refer(root: str | Path, dataset: str, split_by: str) -> ReferDataset:
    """Read one REFER dataset and group its refs per (split, image).

    ``dataset`` and ``split_by`` are checked before any file is opened, so a typo fails fast with
    the valid choices instead of a missing-file error.
    """
    if dataset not in DATASETS:
        raise ReferError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if split_by not in DATASETS[dataset]:
        raise ReferError(
            f"split_by {split_by!r} is not valid for {dataset}; expected one of {', '.join(DATASETS[dataset])}"
        )
    root = Path(root)
    refs = load_refs_pickle(_refs_path(root, dataset, split_by))
    instances_path = _instances_path(root, dataset)
    instances = _load_instances(instances_path)
    categories = _categories(instances["categories"], instances_path)
    images = _by_id(instances["images"])
    annotations = _by_id(instances["annotations"])

    problems: list[AnnotationProblem] = []
    refs_by_image: dict[int, list[dict]] = defaultdict(list)
    for index, ref in enumerate(refs):
        if _is_int(ref.get("image_id")):
            refs_by_image[ref["image_id"]].append(ref)
        else:
            problems.append(AnnotationProblem(
                UNKNOWN_IMAGE_ID, "", f"ref #{index} (ref_id {ref.get('ref_id')!r}) has no integer 'image_id'",
                _named_split([ref]), dataset,
            ))

    samples: list[ImageRefs] = []
    for image_id, raw_refs in refs_by_image.items():
        raw_image = images.get(image_id, {})
        try:
            image = _image_record(image_id, raw_image)
            records = [_ref_record(raw, image, annotations) for raw in raw_refs]
        except ReferError as error:
            file_name = raw_image.get("file_name")
            problems.append(AnnotationProblem(
                image_id, file_name if isinstance(file_name, str) else "", str(error), _named_split(raw_refs), dataset
            ))
            continue
        by_split: dict[str, list[RefRecord]] = defaultdict(list)
        for record in records:
            by_split[record.split].append(record)
        for split, split_refs in by_split.items():
            samples.append(ImageRefs(image, split, sorted(split_refs, key=lambda r: r.ref_id)))

    samples.sort(key=lambda s: (s.split, s.image.image_id))
    problems.sort(key=lambda p: p.image_id)
    return ReferDataset(root, dataset, split_by, root / IMAGE_SUBDIR, samples, problems, categories)


def refer_images(datasets: Sequence[ReferDataset]) -> tuple[list[ReferImage], list[AnnotationProblem]]:
    """The samples of one output over ``datasets``, sorted by image_id, and its problems.

    One dataset: a sample per (split, image), as the dataset reads; refcocog google's images in two
    splits are a sample in each, so every split's samples hold exactly that split's refs, as they
    always did. Several datasets: a sample per image, holding the refs of every (dataset, split) that
    annotates it, so that an image is decoded and segmented once however many datasets refer to it.
    There an image is left out whole, with one problem per dataset that names it, when any dataset's
    records of it are malformed or two datasets disagree on its file name or size: half an image's
    refs would make a sample that silently lacks targets of some (dataset, split).
    """
    if len(datasets) == 1:
        [refer] = datasets
        images = [ReferImage(s.image, (SplitRefs(refer.dataset, refer.split_by, s.split, tuple(s.refs)),))
                  for s in refer.samples]
        return sorted(images, key=lambda i: i.image.image_id), list(refer.problems)
    records: dict[int, dict[str, ImageRecord]] = defaultdict(dict)
    parts: dict[int, list[SplitRefs]] = defaultdict(list)
    for refer in datasets:
        for sample in refer.samples:
            records[sample.image.image_id][refer.dataset] = sample.image
            parts[sample.image.image_id].append(SplitRefs(refer.dataset, refer.split_by, sample.split,
                                                          tuple(sample.refs)))
    problems = [p for refer in datasets for p in refer.problems]
    broken = {p.image_id for p in problems}
    for image_id, by_dataset in records.items():
        if len(set(by_dataset.values())) > 1:
            reason = "the datasets describe this image differently: " + "; ".join(
                f"{dataset}: {r.file_name} {r.width}x{r.height}" for dataset, r in sorted(by_dataset.items()))
        elif image_id in broken:  # the intact datasets' refs of an image left out: reported, not dropped silently
            reason = "left out with the image: another dataset's records of it are unusable"
        else:
            continue
        broken.add(image_id)
        problems += [AnnotationProblem(image_id, by_dataset[part.dataset].file_name, reason, part.split, part.dataset)
                     for part in parts[image_id]]
    images = [ReferImage(next(iter(records[image_id].values())),
                         tuple(sorted(image_parts, key=lambda p: (p.dataset, p.split))))
              for image_id, image_parts in sorted(parts.items()) if image_id not in broken]
    problems.sort(key=lambda p: (p.image_id, p.dataset, p.split))
    return images, problems


def _refs_path(root: Path, dataset: str, split_by: str) -> Path:
    return root / dataset / f"refs({split_by}).p"


def _instances_path(root: Path, dataset: str) -> Path:
    return root / dataset / "instances.json"


def _named_split(raw_refs: list[dict]) -> str:
    return next((ref["split"] for ref in raw_refs if isinstance(ref.get("split"), str)), "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _require(record: dict, key: str, check: Any, expected: str, where: str) -> Any:
    if key not in record:
        raise ReferError(f"{where} has no {key!r}")
    value = record[key]
    if not check(value):
        raise ReferError(f"{where}: {key!r} must be {expected}, got {value!r}")
    return value


def _image_record(image_id: int, raw: dict) -> ImageRecord:
    if not raw:
        raise ReferError(f"image_id {image_id} is not in instances.json 'images'")
    where = f"image {image_id}"
    file_name = _require(raw, "file_name", _is_plain_file_name, "a plain file name", where)
    height = _require(raw, "height", lambda v: _is_int(v) and v > 0, "a positive integer", where)
    width = _require(raw, "width", lambda v: _is_int(v) and v > 0, "a positive integer", where)
    return ImageRecord(image_id, file_name, height, width)


def _is_plain_file_name(value: Any) -> bool:
    """Refuse names that would escape the image directory (``../``, absolute paths)."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


def _ref_record(raw: dict, image: ImageRecord, annotations: dict[int, dict]) -> RefRecord:
    where = f"ref {raw.get('ref_id', '?')!r}"
    ref_id = _require(raw, "ref_id", _is_int, "an integer", where)
    ann_id = _require(raw, "ann_id", _is_int, "an integer", where)
    category_id = _require(raw, "category_id", _is_int, "an integer", where)
    split = _require(raw, "split", lambda v: isinstance(v, str) and v, "a non-empty string", where)
    raw_sentences = _require(raw, "sentences", lambda v: isinstance(v, list) and v, "a non-empty list", where)
    sentences = [_sentence(sentence, f"{where} sentence #{i}") for i, sentence in enumerate(raw_sentences)]

    ann = annotations.get(ann_id)
    if ann is None:
        raise ReferError(f"{where}: ann_id {ann_id} is not in instances.json 'annotations'")
    ann_where = f"{where}: annotation {ann_id}"
    if ann.get("image_id") != image.image_id:
        raise ReferError(f"{ann_where} belongs to image {ann.get('image_id')!r}, not {image.image_id}")
    bbox = _require(ann, "bbox", lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
                    "four numbers [x, y, w, h]", ann_where)
    if "segmentation" not in ann:
        raise ReferError(f"{ann_where} has no 'segmentation'")
    segmentation = ann["segmentation"]
    try:
        _segmentation_kind(segmentation, image.height, image.width)
    except ReferError as error:
        raise ReferError(f"{ann_where}: {error}") from None
    return RefRecord(ref_id, ann_id, category_id, split, sentences, [float(v) for v in bbox], segmentation)


def _sentence(raw: Any, where: str) -> dict:
    """Keep exactly REFER's four sentence fields, so downstream JSON has one stable shape."""
    if not isinstance(raw, dict):
        raise ReferError(f"{where} is a {type(raw).__name__}, expected a dict")
    return {
        "sent_id": _require(raw, "sent_id", _is_int, "an integer", where),
        "sent": _require(raw, "sent", lambda v: isinstance(v, str) and v.strip(), "a non-empty string", where),
        "raw": _require(raw, "raw", lambda v: isinstance(v, str), "a string", where),
        "tokens": _require(raw, "tokens", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                           "a list of strings", where),
    }


def _segmentation_kind(segmentation: Any, height: int, width: int) -> str:
    """Classify a COCO segmentation as ``polygons``, ``rle`` or ``compressed``, or say why not.

    Checked up front because pycocotools trusts its input: a polygon of four numbers is taken for
    a box, and an RLE whose counts sum to less than H×W decodes to uninitialised memory.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ReferError("empty polygon list")
        for index, polygon in enumerate(segmentation):
            if not (isinstance(polygon, list) and all(map(_is_number, polygon))):
                raise ReferError(f"polygon #{index} is not a list of numbers")
            if len(polygon) < 6 or len(polygon) % 2:
                raise ReferError(f"polygon #{index} has {len(polygon)} coordinates; needs an even count >= 6")
        return "polygons"
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ReferError(f"segmentation is neither a polygon list nor an RLE dict: {type(segmentation).__name__}")
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        raise ReferError(f"RLE size {segmentation['size']!r} does not match the image's [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        kind = "rle"
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise ReferError("RLE counts must be non-negative integers")
    elif isinstance(counts, (str, bytes)):
        kind = "compressed"
        if isinstance(counts, str):
            if not counts.isascii():
                raise ReferError("compressed RLE counts contain non-ASCII characters")
            counts = counts.encode("ascii")
        counts = _compressed_counts(counts)
    else:
        raise ReferError(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
    if sum(counts) != height * width:
        raise ReferError(f"RLE counts cover {sum(counts)} pixels, the image has {height * width}")
    return kind


def _compressed_counts(counts: bytes) -> list[int]:
    """Decode COCO's compressed RLE string (the inverse of maskApi's rleToString).

    pycocotools exposes no way to read the run lengths back, and they are needed to check the
    total before decoding (see :func:`_segmentation_kind`).
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ReferError("compressed RLE counts end in the middle of a number")
            chunk = counts[position] - 48
            if not 0 <= chunk < 64:
                raise ReferError("compressed RLE counts contain a character outside '0'..'o'")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ReferError("compressed RLE counts decode to a negative run length")
        runs.append(value)
    return runs


def ref_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, RLE or compressed RLE) to a 0/1 uint8 H×W mask.

    Polygons of one object are merged (union), so a pixel covered by two parts is still 1.
    """
    kind = _segmentation_kind(segmentation, height, width)
    if kind == "polygons":
        polygons = [[float(v) for v in polygon] for polygon in segmentation]
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif kind == "rle":
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle).astype(np.uint8)


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a 2-D mask, with ``counts`` as text so it can go into JSON."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}
