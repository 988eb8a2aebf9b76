"""Batch prediction (``svp predict --inputs``): its inputs, the work on one batch, and its output directory.

- **Inputs**: JSON lines ``{"image": path-or-URL, "text": ...}``, or a CSV with ``image`` and ``text``
  columns (``.csv``), read through :mod:`pipeline.storage` like the images (``s3://`` works). An input is
  known by its line in the file, its image and its text: what a rerun compares.
- **Work** (:func:`predict_inputs`, run in-process or by each Ray worker): the inputs of a batch are
  grouped by image, so an image is read, partitioned and SAM-encoded once for all its expressions.
  What fails (a missing or corrupt image, an empty expression) becomes a failure record; the rest goes on.
- **Output** (:class:`PredictionsDir`): ``predictions.jsonl`` and ``failures.jsonl``, appended a whole
  line at a time and flushed, so a killed run leaves at most a partial last line, which the next run
  drops (and redoes that input); ``overlays/LINE.png`` with ``--overlays``, written before their record.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.batches import one_by_one
from pipeline.errors import SvpError
from pipeline.images import ImageDecodeError, decode_image
from pipeline.refer import encode_mask
from pipeline.storage import read_url
from trainer.predict import Predictor, render_overlay

PREDICTIONS = "predictions.jsonl"
FAILURES = "failures.jsonl"
OVERLAYS = "overlays"
INPUT_COLUMNS = ("image", "text")


class InputsError(SvpError, ValueError):
    """The inputs file cannot be read as a whole (absent, not text, a CSV without its columns)."""


@dataclass(frozen=True)
class PredictInput:
    """One line of the inputs: an image and what to segment in it."""

    line: int  # 1-based line of the inputs file (for a CSV, the line its row ends on)
    image: str
    text: str

    @property
    def key(self) -> tuple[int, str, str]:
        return (self.line, self.image, self.text)


@dataclass
class Outcome:
    """What became of one input: a line of ``predictions.jsonl``, or of ``failures.jsonl`` if ``failed``."""

    record: dict[str, Any]
    failed: bool
    overlay: bytes | None = None  # the overlay PNG, with --overlays

    @property
    def key(self) -> tuple[int, str | None, str | None]:
        return record_key(self.record)


def record_key(record: dict[str, Any]) -> tuple[int, str | None, str | None]:
    return (record["line"], record["image"], record["text"])


def failure(line: int, image: str | None, text: str | None, stage: str, reason: str) -> Outcome:
    return Outcome({"line": line, "image": image, "text": text, "stage": stage, "reason": reason}, failed=True)


def read_inputs(url: str) -> tuple[list[PredictInput], list[Outcome]]:
    """The inputs to predict, and the failures of lines that are not one (malformed, no image, an empty
    expression): those are recorded, not fatal, like an unreadable image."""
    try:
        text = read_url(url).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputsError(f"cannot read --inputs {url}: {exc}") from exc
    inputs, failures = [], []
    rows = _csv_rows(text, url) if url.lower().endswith(".csv") else _json_rows(text)
    for line, image, expression, problem in rows:
        if problem is None and not expression.strip():
            problem = "empty expression"
        if problem is None:
            inputs.append(PredictInput(line, image, expression))
        else:
            failures.append(failure(line, image, expression, "input", problem))
    return inputs, failures


Row = tuple[int, Any, Any, str | None]  # line, image, text, what is wrong with it (None: nothing)


def _json_rows(text: str) -> Iterator[Row]:
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except json.JSONDecodeError as exc:
            yield line, None, None, f"not JSON: {exc}"
            continue
        if not isinstance(row, dict):
            yield line, None, None, f"not a JSON object with {' and '.join(INPUT_COLUMNS)}"
            continue
        yield _checked(line, row.get("image"), row.get("text"))


def _csv_rows(text: str, url: str) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [column for column in INPUT_COLUMNS if column not in (reader.fieldnames or ())]
    if missing:
        raise InputsError(f"--inputs {url}: a CSV needs the columns {', '.join(INPUT_COLUMNS)}; "
                          f"its header lacks {', '.join(missing)}")
    for row in reader:
        yield _checked(reader.line_num, row["image"], row["text"])


def _checked(line: int, image: Any, text: Any) -> Row:
    """JSON and CSV rows alike: an image and a text, both strings (an absent text is no expression)."""
    text = "" if text is None else text
    if not isinstance(image, str) or not image:
        return line, None, text if isinstance(text, str) else None, "no image"
    if not isinstance(text, str):
        return line, image, None, f"text is a {type(text).__name__}, not a string"
    return line, image, text, None


def group_by_image(inputs: Sequence[PredictInput], batch_size: int) -> list[list[PredictInput]]:
    """Batches of about ``batch_size`` inputs, an image's inputs never split (it is prepared once);
    an image with more inputs than that is a batch of its own."""
    by_image: dict[str, list[PredictInput]] = {}
    for item in inputs:
        by_image.setdefault(item.image, []).append(item)
    batches: list[list[PredictInput]] = []
    current: list[PredictInput] = []
    for group in by_image.values():
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        current += group
    return [*batches, current] if current else batches


def predict_inputs(predictor: Predictor, inputs: Sequence[PredictInput], overlays: bool = False) -> list[Outcome]:
    """Predict a batch of inputs: each image read, decoded and prepared once, then every expression.

    ``seconds`` of a prediction is its share of the work: its image's reading and preparation divided
    among that image's inputs, plus an equal share of the model's forward passes.
    """
    outcomes: list[Outcome] = []
    groups: dict[str, list[PredictInput]] = {}
    for item in inputs:
        groups.setdefault(item.image, []).append(item)
    images, rgbs, seconds = [], [], []
    for image, group in groups.items():
        started = time.perf_counter()
        try:
            data = read_url(image)
        except Exception as exc:  # noqa: BLE001 - absent, refused, a store that did not answer, a bad URL
            outcomes += [failure(*item.key, "read", f"{type(exc).__name__}: {exc}") for item in group]
            continue
        try:
            rgbs.append(decode_image(data).rgb)
        except ImageDecodeError as exc:
            outcomes += [failure(*item.key, "decode", str(exc)) for item in group]
            continue
        images.append(image)
        seconds.append(time.perf_counter() - started)

    started = time.perf_counter()
    prepared = one_by_one(predictor.prepare, rgbs)
    prepare_share = (time.perf_counter() - started) / max(len(rgbs), 1)
    requests, owners = [], []
    for image, rgb, ready, spent in zip(images, rgbs, prepared, seconds):
        group = groups[image]
        if isinstance(ready, Exception):
            outcomes += [failure(*item.key, "superpixels", f"{type(ready).__name__}: {ready}") for item in group]
            continue
        per_input = (spent + prepare_share) / len(group)
        requests += [(ready, item.text) for item in group]
        owners += [(item, rgb, per_input) for item in group]

    started = time.perf_counter()
    masks = one_by_one(predictor.masks, requests)
    forward_share = (time.perf_counter() - started) / max(len(requests), 1)
    for (item, rgb, per_input), result in zip(owners, masks, strict=True):
        if isinstance(result, Exception):
            outcomes.append(failure(*item.key, "predict", f"{type(result).__name__}: {result}"))
            continue
        mask, tokens = result
        outcomes.append(_prediction(item, rgb, mask, tokens, per_input + forward_share, overlays))
    return outcomes


def _prediction(item: PredictInput, rgb: np.ndarray, mask: np.ndarray, tokens: int, seconds: float,
                overlay: bool) -> Outcome:
    record = {"line": item.line, "image": item.image, "text": item.text, "mask": encode_mask(mask),
              "area": int(mask.sum()), "visual_tokens": tokens, "seconds": round(seconds, 4)}
    png = None
    if overlay:
        record["overlay"] = f"{OVERLAYS}/{overlay_name(item.line)}"
        buffer = io.BytesIO()
        render_overlay(rgb, mask, item.text).save(buffer, format="PNG")
        png = buffer.getvalue()
    return Outcome(record, failed=False, overlay=png)


def overlay_name(line: int) -> str:
    return f"{line:06d}.png"


class PredictionsDir:
    """``DIR/predictions.jsonl``, ``DIR/failures.jsonl`` and ``DIR/overlays/``: what a run appends to and
    a rerun reads to skip what is done. Local: a file is appended to, which object stores cannot do."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._files: dict[bool, IO[str]] = {}
        self.done: set[tuple[int, str | None, str | None]] = set()
        for failed, name in ((False, PREDICTIONS), (True, FAILURES)):
            file = path / name
            self.done |= {record_key(record) for record in _whole_lines(file)}
            self._files[failed] = file.open("a", encoding="utf-8")

    def __enter__(self) -> PredictionsDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for file in self._files.values():
            file.close()

    def write(self, outcomes: Sequence[Outcome]) -> None:
        """Append each outcome as one whole line, flushed; an overlay is in place before its record."""
        for outcome in outcomes:
            if outcome.overlay is not None:
                target = self.path / outcome.record["overlay"]
                target.parent.mkdir(exist_ok=True)
                partial = target.with_name(f".{target.name}.tmp")
                partial.write_bytes(outcome.overlay)
                os.replace(partial, target)
            file = self._files[outcome.failed]
            file.write(json.dumps(outcome.record) + "\n")
            file.flush()
            self.done.add(outcome.key)


def _whole_lines(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``; a last line without its newline (a run killed while writing it) is cut
    off the file, so that the next line appended starts on a line of its own."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with path.open("r+b") as file:
            file.truncate(len(whole))
    return [json.loads(line) for line in whole.decode("utf-8").splitlines() if line.strip()]
