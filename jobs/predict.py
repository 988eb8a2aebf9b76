"""``svp predict``: segment what a text refers to, in one image or in a batch of (image, text) pairs.

One image: ``svp predict --run-dir RUN --image IMG --text TEXT --out overlay.png`` writes the overlay (mask
tinted red, the expression written above) and, with ``--mask-out``, the binary mask.

A batch: ``svp predict --run-dir RUN --inputs PAIRS.jsonl --out DIR`` reads one ``{"image": path-or-URL,
"text": ...}`` per line (or a .csv with image and text columns) and writes DIR/predictions.jsonl (a mask
as COCO RLE per input) and DIR/failures.jsonl (unreadable images, empty expressions: recorded, the rest
goes on); ``--overlays`` adds DIR/overlays/. A rerun into the same DIR skips what is done. ``--workers N``
runs it on Ray, N actors holding one model each (``python -m jobs.predict`` for ``ray job submit``).

RUN is a run directory of ``svp train`` (its ``export/`` is read) or an export alone (``svp export``).
The images get superpixels from the same backend the run was trained on (as its export records it;
override with ``--backend``), with the SAM settings it recorded; a
``--sam-model`` given here must be the run's. SAM's image encoder runs once per image when the
backend's SAM is the run's own checkpoint (see ``trainer.predict``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs import entry, options, ray_cluster
from pipeline.images import ImageDecodeError, decode_image
from pipeline.partition import PartitionConfig
from pipeline.storage import read_url, storage_env
from pipeline.superpixels import BACKENDS
from pipeline.superpixels.base import (
    BackendConfigError,
    SamOptions,
    point_grid_field,
    sam_checkpoint_field,
    sam_model_field,
    sam_precision_field,
)
from pipeline.superpixels.spec import BackendSpec
from trainer.export import read_export_config
from trainer.predict import Predictor, render_overlay
from trainer.predictions import (
    Outcome,
    PredictInput,
    PredictionsDir,
    failure,
    group_by_image,
    predict_inputs,
    read_inputs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    """Which run; one image (--image, --text) or a batch (--inputs); where the results go."""

    run_dir: Path = field(metadata={"help": (
        "run directory of `svp train`, or an export (`svp export`, or a run's export/)")})
    out: Path = field(metadata={"help": (
        "with --image: the overlay PNG to write; with --inputs: the output directory (predictions.jsonl, "
        "failures.jsonl, overlays/), where a rerun skips the inputs already done")})
    image: str | None = field(default=None, metadata={"help": (
        "one image (JPEG, PNG, ...; a path or an fsspec URL such as s3://...); needs --text. Not with --inputs")})
    text: str | None = field(default=None, metadata={"help": (
        "the referring expression for --image, e.g. 'the red circle'; never empty")})
    inputs: str | None = field(default=None, metadata={"help": (
        "a batch: JSON lines {\"image\": path-or-URL, \"text\": ...}, or a .csv with image and text columns (a path "
        "or an fsspec URL). Not with --image")})
    mask_out: Path | None = field(default=None, metadata={"help": "with --image: also write the binary mask as a PNG"})
    overlays: bool = field(default=False, metadata={"help": (
        "with --inputs: also write each prediction's overlay as OUT/overlays/LINE.png")})
    batch_size: int = field(default=8, metadata={"help": (
        "expressions per forward pass of the model, and images per pass of its mask head's SAM encoder")})
    workers: int | None = field(default=None, metadata={"help": (
        "with --inputs: run on Ray with this many actors, each holding one model; omitted: in this process")})
    backend: str | None = field(default=None, metadata={"choices": tuple(BACKENDS), "help": (
        "superpixel backend; omitted: the one the run's training shards were made with")})
    sam_checkpoint: str | None = sam_checkpoint_field()
    sam_model: str | None = sam_model_field(None)
    point_grid: str | None = point_grid_field(None, help=(
        "SAM's prompts for the superpixels; omitted: the run's recorded grid. Another than the run's is used, "
        "with a warning: the model then reads superpixels of another kind than it was trained on"))
    sam_precision: str = sam_precision_field()


OPTIONS = (PredictOptions, ray_cluster.RayOptions)


def superpixel_backend(given: PredictOptions, source: dict) -> BackendSpec:
    """The backend the run trained on (``source``: the config of its training shards, as its export
    records it), unless overridden, with the SAM settings it recorded; a ``--sam-model`` that is not the
    recorded one is refused, not replaced."""
    recorded = SamOptions.from_record(source["sam"]) if "sam" in source else None
    if given.sam_model is not None and recorded is not None and given.sam_model != recorded.sam_model:
        raise BackendConfigError(
            f"--sam-model {given.sam_model} is not the SAM of the run: {given.run_dir}'s training shards were made "
            f"with --sam-model {recorded.sam_model}; give that, or leave --sam-model out")
    name = given.backend or source.get("backend")
    if name is None:
        raise BackendConfigError(f"{given.run_dir} does not record its superpixel backend; pass --backend")
    partition = PartitionConfig(**source["partition"]) if "partition" in source else PartitionConfig()
    sam = None
    if name == "sam":
        settings = recorded or SamOptions()
        if recorded is not None and given.point_grid not in (None, recorded.point_grid):
            log.warning("--point-grid %s: %s's training shards were made with --point-grid %s; the model reads "
                        "superpixels of another kind than it was trained on", given.point_grid, given.run_dir,
                        settings.point_grid)
        sam = replace(settings, sam_checkpoint=given.sam_checkpoint, sam_model=given.sam_model or settings.sam_model,
                      point_grid=given.point_grid or settings.point_grid, sam_precision=given.sam_precision,
                      store_sam_embeddings=False)
    elif given.point_grid is not None:
        raise BackendConfigError(f"--point-grid is for the sam backend; {given.run_dir} uses --backend {name}")
    spec = BackendSpec(name, partition, sam)
    spec.validate()
    return spec


def check_modes(given: PredictOptions, cluster: ray_cluster.RayOptions) -> None:
    """Exactly one of the two modes, and no option of the other."""
    if (given.image is None) == (given.inputs is None):
        raise options.OptionError("give either --image IMG --text TEXT (one image) or --inputs PAIRS (a batch)")
    if given.batch_size < 1:
        raise options.OptionError(f"--batch-size must be >= 1, got {given.batch_size}")
    if given.image is not None:
        if given.text is None:
            raise options.OptionError("--image needs --text: the expression to segment, e.g. --text 'the red circle'")
        if not given.text.strip():  # the model would still paint a mask, of nothing anyone asked for
            raise options.OptionError("--text is empty: give the expression to segment, e.g. --text 'the red circle'")
        _refuse({"--overlays": given.overlays, "--workers": given.workers is not None,
                 "--address": cluster.address is not None, "--gpus-per-worker": cluster.gpus_per_worker is not None},
                "for a batch (--inputs), not one --image")
        return
    _refuse({"--text": given.text is not None, "--mask-out": given.mask_out is not None},
            "for one --image; with --inputs each line has its text")
    if given.workers is not None and given.workers < 1:
        raise options.OptionError(f"--workers must be >= 1, got {given.workers}")
    if given.workers is None and (cluster.address is not None or cluster.gpus_per_worker is not None):
        raise options.OptionError("--address and --gpus-per-worker are for Ray workers: give --workers N too")


def _refuse(flags: dict[str, bool], why: str) -> None:
    """An OptionError naming those of ``flags`` that were given (True), if any."""
    given = [flag for flag, present in flags.items() if present]
    if given:
        raise options.OptionError(f"{', '.join(given)}: {why}")


def run(args: argparse.Namespace) -> int:
    given, cluster = options.build(PredictOptions, args), options.build(ray_cluster.RayOptions, args)
    check_modes(given, cluster)
    spec = superpixel_backend(given, read_export_config(given.run_dir)["superpixels"])
    if given.inputs is not None:
        return predict_batch(given, spec, cluster)
    try:
        data = read_url(given.image)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read --image {given.image}: {exc}") from exc
    image = decode_image(data)
    predictor = Predictor.load(given.run_dir, spec, _local_device(), given.batch_size, given.sam_precision)
    [(mask, tokens)] = predictor.masks([(predictor.prepare([image.rgb])[0], given.text)])
    given.out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image.rgb, mask, given.text).save(given.out)
    if given.mask_out is not None:
        Image.fromarray((mask * 255).astype(np.uint8)).save(given.mask_out)
    print(f"predict: {int(mask.sum())} of {mask.size} pixels, {tokens} visual tokens; overlay: {given.out}")
    return 0


def predict_batch(given: PredictOptions, spec: BackendSpec, cluster: ray_cluster.RayOptions) -> int:
    """Every input not yet in OUT, in batches grouped by image, in this process or on Ray workers;
    each outcome is appended to OUT as it comes, so a killed run loses only the batches in flight."""
    from tqdm import tqdm

    inputs, bad = read_inputs(given.inputs)
    with PredictionsDir(given.out) as out:
        todo = [item for item in inputs if item.key not in out.done]
        bad_todo = [outcome for outcome in bad if outcome.key not in out.done]
        skipped = len(inputs) + len(bad) - len(todo) - len(bad_todo)
        out.write(bad_todo)
        batches = group_by_image(todo, given.batch_size)
        if given.workers is None:
            results = _in_process(given, spec, batches)
        else:
            results = _on_ray(given, spec, cluster, batches)
        predicted, failed = 0, len(bad_todo)
        with tqdm(total=len(todo), unit="input", desc="predict", file=sys.stderr) as progress:
            for outcomes in results:
                out.write(outcomes)
                failed += sum(outcome.failed for outcome in outcomes)
                predicted += sum(not outcome.failed for outcome in outcomes)
                progress.set_postfix(predicted=predicted, failed=failed)
                progress.update(len(outcomes))
    print(f"predict: {predicted} predicted, {failed} failed, {skipped} skipped as done in an earlier run; "
          f"out: {given.out}")
    return 0


def _local_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _in_process(given: PredictOptions, spec: BackendSpec, batches: list[list[PredictInput]]) -> Iterator[list[Outcome]]:
    if not batches:
        return
    predictor = Predictor.load(given.run_dir, spec, _local_device(), given.batch_size, given.sam_precision)
    for batch in batches:
        yield predict_inputs(predictor, batch, given.overlays)


def _on_ray(given: PredictOptions, spec: BackendSpec, cluster: ray_cluster.RayOptions,
            batches: list[list[PredictInput]]) -> Iterator[list[Outcome]]:
    """Batches on a pool of actors, each holding one model; a batch goes to whichever actor is free
    (:func:`jobs.ray_cluster.on_actors`: a batch that kills its actor every time is recorded as
    failed, stage ``worker``, and the rest goes on)."""
    if not batches:
        return iter(())
    ray_cluster.connect(cluster.address)
    gpus = ray_cluster.gpus_per_worker(cluster.gpus_per_worker, given.workers, "--workers", share=True)
    run_dir, overlays, batch_size, precision = given.run_dir, given.overlays, given.batch_size, given.sam_precision

    class PredictWorker:
        def __init__(self) -> None:
            self.predictor = Predictor.load(run_dir, spec, ray_cluster.worker_device("predict"), batch_size, precision)

        def predict(self, batch: list[PredictInput]) -> list[Outcome]:
            return predict_inputs(self.predictor, batch, overlays)

    def failed(batch: list[PredictInput], reason: str) -> list[Outcome]:
        return [failure(*item.key, "worker", reason[:500]) for item in batch]

    return ray_cluster.on_actors(PredictWorker, "predict", batches, given.workers, gpus, storage_env(), failed)


def main(argv: list[str] | None = None) -> int:
    return entry.main(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
