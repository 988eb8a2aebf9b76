"""svp predict on a tiny trained run, CPU: one SAM encoder pass per image, batch inference (in this
process and on local Ray), its failure records and its resume."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything.modeling import ImageEncoderViT
from test_sam_backend import TEST_OPTIONS, shapes_image
from train_helpers import train_flags

from jobs.predict import PredictOptions, superpixel_backend
from jobs.predict import main as svp_predict
from jobs.train import main as svp_train
from pipeline.partition import PartitionConfig
from pipeline.sam_model import save_tiny_sam
from pipeline.superpixels.base import BackendConfigError, SamOptions
from pipeline.superpixels.spec import BackendSpec
from trainer.export import load_exported_model
from trainer.predict import Predictor, predict_mask
from trainer.predictions import FAILURES, PREDICTIONS, PredictInput, group_by_image, read_inputs

TEXTS = ("the red circle", "the blue square on the left", "the largest triangle", "the green one")


@pytest.fixture(scope="module")
def run(shards, tiny_sam_checkpoint, tmp_path_factory) -> Path:
    """A run trained one step with the tiny SAM as its mask head, on felzenszwalb superpixels."""
    run_dir = tmp_path_factory.mktemp("predict-run")
    assert svp_train(train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "1")) == 0
    return run_dir


@pytest.fixture(scope="module")
def images(refer_root) -> list[Path]:
    return sorted((refer_root / "images/mscoco/images/train2014").glob("*.jpg"))[:5]


@contextlib.contextmanager
def sam_encoder_images() -> Iterator[list[int]]:
    """The images any SAM image encoder (the mask head's, a backend's) encodes, one entry per forward pass."""
    passes: list[int] = []

    def count(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, ImageEncoderViT):
            passes.append(len(args[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        yield passes
    finally:
        handle.remove()


# --- one SAM pass -------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint, passes", [("the run's", 1), ("a copy of the run's", 1), ("another", 2)])
def test_a_sam_backend_with_the_runs_checkpoint_encodes_each_image_once(run, images, tiny_sam_checkpoint, tmp_path,
                                                                         checkpoint, passes):
    """The mask head and the superpixel generator read one embedding when their SAM is the same bytes,
    wherever the file lies; another SAM has to encode the image itself."""
    sam = {"the run's": tiny_sam_checkpoint, "a copy of the run's": tmp_path / "copy.pth",
           "another": tmp_path / "other.pth"}[checkpoint]
    if checkpoint == "another":
        save_tiny_sam(sam, seed=1)
    elif sam != tiny_sam_checkpoint:
        shutil.copyfile(tiny_sam_checkpoint, sam)
    with sam_encoder_images() as encoded:
        assert svp_predict(["--run-dir", str(run), "--image", str(images[0]), "--text", "the red circle", "--backend",
                            "sam", "--sam-checkpoint", str(sam), "--out", str(tmp_path / "overlay.png")]) == 0
    assert sum(encoded) == passes
    assert (tmp_path / "overlay.png").is_file()


def test_the_shared_pass_gives_the_superpixels_and_masks_of_two_passes(run, tiny_sam_checkpoint):
    spec = BackendSpec("sam", PartitionConfig(), SamOptions(str(tiny_sam_checkpoint), "tiny", **TEST_OPTIONS))
    shared = Predictor.load(run, spec)
    two = Predictor(load_exported_model(run), spec.build())
    assert shared.shares_sam_encoder and not two.shares_sam_encoder
    assert shared.superpixels.sam.image_encoder is shared.model.mask_head.sam.image_encoder  # one encoder held
    rgbs = [shapes_image(300, 400, 1), shapes_image(480, 640, 2)]  # where the random SAM's masks make regions
    with sam_encoder_images() as encoded:
        once = shared.prepare(rgbs)
    assert sum(encoded) == len(rgbs)
    with sam_encoder_images() as encoded:
        twice = two.prepare(rgbs)
    assert sum(encoded) == 2 * len(rgbs)
    for a, b in zip(once, twice, strict=True):
        assert a.num_superpixels == b.num_superpixels > 1  # the generator's masks made regions
        assert torch.equal(a.superpixels, b.superpixels) and torch.equal(a.sam_embedding, b.sam_embedding)
    requests = [(image, text) for image in once for text in TEXTS[:2]]
    masks = shared.masks(requests)
    reference = two.masks([(image, text) for image in twice for text in TEXTS[:2]])
    for (mask, tokens), (expected, expected_tokens) in zip(masks, reference, strict=True):
        assert np.array_equal(mask, expected) and tokens == expected_tokens
    # the demo's one-image helper is the same computation
    labels = two.superpixels(rgbs[:1])[0].labels
    assert np.array_equal(predict_mask(two.model, rgbs[0], labels, TEXTS[0])[0], masks[0][0])


@pytest.mark.parametrize("kind", ["mlp", "pool"])
def test_a_projector_that_reads_no_superpixels_gets_none_made(tiny_sam_checkpoint, kind):
    """mlp and pool read only the label map's shape: predicting with them costs no superpixel backend,
    and the masks are those the model gives whatever labels it is handed."""
    from trainer.model import ModelConfig, ProjectorConfig, SegmentationMLLM

    torch.manual_seed(0)
    model = SegmentationMLLM(ModelConfig(sam_checkpoint=str(tiny_sam_checkpoint), sam_model="tiny",
                                         projector=ProjectorConfig(kind=kind))).eval()
    assert not model.projector.reads_superpixels
    spec = BackendSpec("sam", PartitionConfig(), SamOptions(str(tiny_sam_checkpoint), "tiny", **TEST_OPTIONS))
    rgbs = [shapes_image(300, 400, 1), shapes_image(480, 640, 2)]
    without = Predictor(model, None).prepare(rgbs)
    assert [image.num_superpixels for image in without] == [1, 1]
    with_backend = Predictor(model, spec.build()).prepare(rgbs)
    assert all(image.num_superpixels > 1 for image in with_backend)
    requests = [(image, TEXTS[0]) for image in without]
    for (mask, tokens), (expected, expected_tokens) in zip(
            Predictor(model, None).masks(requests),
            Predictor(model, None).masks([(image, TEXTS[0]) for image in with_backend]), strict=True):
        assert np.array_equal(mask, expected) and tokens == expected_tokens


def test_only_svp_reads_superpixels(run):
    assert load_exported_model(run).projector.reads_superpixels  # the run's projector is svp

# --- batch inference ----------------------------------------------------------------------------


def write_inputs(images: list[Path], tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """20 lines: 17 predictable (the 5 images with 4, 4, 3, 3, 3 expressions), a missing image, a
    corrupt one and an empty expression; returns the file and the failure stage expected per line."""
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a JPEG after all")
    rows: list[dict] = []
    for image, count in zip(images, (4, 4, 3, 3, 3)):
        rows += [{"image": str(image), "text": text} for text in TEXTS[:count]]
    rows.insert(3, {"image": str(tmp_path / "absent.jpg"), "text": "the red circle"})
    rows.insert(9, {"image": str(corrupt), "text": "the blue square on the left"})
    rows.insert(12, {"image": str(images[1]), "text": "  "})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, {4: "read", 10: "decode", 13: "input"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_outputs(out: Path, images: list[Path], failures: dict[int, str]) -> list[dict]:
    predictions = records(out / PREDICTIONS)
    assert len(predictions) == 17 and len({p["line"] for p in predictions}) == 17
    assert {p["line"] for p in predictions}.isdisjoint(failures)
    sizes = {str(path): Image.open(path).size for path in images}
    for prediction in predictions:
        width, height = sizes[prediction["image"]]
        rle = prediction["mask"]
        mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert mask.shape == (height, width) and int(mask.sum()) == prediction["area"]
        assert prediction["visual_tokens"] > 0 and prediction["seconds"] > 0 and prediction["text"] in TEXTS
    failed = records(out / FAILURES)
    assert {f["line"]: f["stage"] for f in failed} == failures
    assert all(f["reason"] for f in failed)
    return predictions


def test_a_batch_predicts_what_it_can_records_what_it_cannot_and_a_rerun_skips_it(run, images, tmp_path, capsys):
    inputs, failures = write_inputs(images, tmp_path)
    out = tmp_path / "out"
    with sam_encoder_images() as encoded:
        assert svp_predict(["--run-dir", str(run), "--inputs", str(inputs), "--out", str(out), "--overlays"]) == 0
    assert sum(encoded) == len(images)  # an image's expressions share its one SAM embedding
    predictions = check_outputs(out, images, failures)
    assert "predict: 17 predicted, 3 failed, 0 skipped" in capsys.readouterr().out
    for prediction in predictions:
        with Image.open(out / prediction["overlay"]) as overlay:
            assert overlay.width == Image.open(prediction["image"]).width
    before = {name: (out / name).read_bytes() for name in (PREDICTIONS, FAILURES)}

    assert svp_predict(["--run-dir", str(run), "--inputs", str(inputs), "--out", str(out)]) == 0
    assert "predict: 0 predicted, 0 failed, 20 skipped" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in before} == before

    # A run killed while writing its last line: that line is dropped and its input predicted again.
    text = before[PREDICTIONS].decode()
    (out / PREDICTIONS).write_text(text[: len(text) - 25])
    assert svp_predict(["--run-dir", str(run), "--inputs", str(inputs), "--out", str(out)]) == 0
    assert "predict: 1 predicted, 0 failed, 19 skipped" in capsys.readouterr().out
    again = check_outputs(out, images, failures)
    assert sorted(p["line"] for p in again) == sorted(p["line"] for p in predictions)


def test_a_batch_on_two_ray_workers_gives_what_one_process_does(run, images, tmp_path, ray_local, capsys):
    """Bit for bit in fp32. (In bf16, PyTorch's CPU flash attention rounds differently with the
    number of threads, and a Ray actor has one: a mask can move by a pixel, as --help says.)"""
    inputs, failures = write_inputs(images, tmp_path)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    fp32 = ["--sam-precision", "fp32", "--batch-size", "4"]
    assert svp_predict(["--run-dir", str(run), "--inputs", str(inputs), "--out", str(local), *fp32]) == 0
    assert svp_predict(["--run-dir", str(run), "--inputs", str(inputs), "--out", str(on_ray), *fp32,
                        "--workers", "2"]) == 0
    assert "predict: 17 predicted, 3 failed, 0 skipped" in capsys.readouterr().out
    expected = {p["line"]: p for p in check_outputs(local, images, failures)}
    for prediction in check_outputs(on_ray, images, failures):
        assert {k: v for k, v in prediction.items() if k != "seconds"} == {
            k: v for k, v in expected[prediction["line"]].items() if k != "seconds"}
    assert svp_predict(["--run-dir", str(run), "--inputs", str(inputs), "--out", str(on_ray), "--workers", "2"]) == 0
    assert "predict: 0 predicted, 0 failed, 20 skipped" in capsys.readouterr().out


# --- inputs and options -------------------------------------------------------------------------


def test_csv_inputs_are_numbered_by_their_line_and_bad_rows_are_failures(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('image,text\na.jpg,"the red circle, on the left"\n,the blue one\nb.jpg,\n"c.jpg","two\nlines"\n')
    inputs, failed = read_inputs(str(path))
    assert inputs == [PredictInput(2, "a.jpg", "the red circle, on the left"), PredictInput(6, "c.jpg", "two\nlines")]
    assert [(f.record["line"], f.record["stage"], f.record["reason"]) for f in failed] == [
        (3, "input", "no image"), (4, "input", "empty expression")]


def test_malformed_json_lines_are_failures_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.jpg", "text": "the red circle"}\n\n{"image": "b.jpg", "text": 3}\n[1]\n{oops\n')
    inputs, failed = read_inputs(str(path))
    assert inputs == [PredictInput(1, "a.jpg", "the red circle")]
    assert [(f.record["line"], f.record["stage"]) for f in failed] == [(3, "input"), (4, "input"), (5, "input")]


def test_a_csv_without_the_columns_is_refused(run, tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_text("file,sentence\na.jpg,the red circle\n")
    assert svp_predict(["--run-dir", str(run), "--inputs", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "its header lacks image, text" in capsys.readouterr().err


def test_an_images_inputs_share_a_batch_however_they_are_ordered():
    inputs = [PredictInput(line, image, "x") for line, image in enumerate("abacbdaee", start=1)]
    batches = group_by_image(inputs, batch_size=3)
    assert [[item.line for item in batch] for batch in batches] == [[1, 3, 7], [2, 5, 4], [6, 8, 9]]


@pytest.mark.parametrize("flags, message", [
    ([], "give either --image IMG --text TEXT (one image) or --inputs PAIRS (a batch)"),
    (["--image", "a.jpg", "--text", "x", "--inputs", "p.jsonl"], "give either --image"),
    (["--image", "a.jpg"], "--image needs --text"),
    (["--image", "a.jpg", "--text", "x", "--workers", "2", "--overlays"],
     "--overlays, --workers: for a batch (--inputs), not one --image"),
    (["--inputs", "p.jsonl", "--text", "x", "--mask-out", "m.png"], "--text, --mask-out: for one --image"),
    (["--inputs", "p.jsonl", "--address", "auto"], "give --workers N too"),
    (["--inputs", "p.jsonl", "--workers", "0"], "--workers must be >= 1"),
    (["--inputs", "p.jsonl", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_the_two_modes_refuse_each_others_options(tmp_path, capsys, flags, message):
    assert svp_predict(["--run-dir", str(tmp_path), "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_point_grid_other_than_the_runs_is_warned_about(tiny_sam_checkpoint, tmp_path, caplog):
    """A run trained on the full grid's superpixels, predicted with coarse-to-fine's: used, never silently."""
    recorded = SamOptions(str(tiny_sam_checkpoint), "tiny").record()
    source = {"backend": "sam", "sam": recorded}
    options = dict(run_dir=tmp_path, out=tmp_path / "o.png", sam_checkpoint=str(tiny_sam_checkpoint))
    assert superpixel_backend(PredictOptions(**options), source).sam.point_grid == "full"
    assert not caplog.records
    spec = superpixel_backend(PredictOptions(**options, point_grid="coarse-to-fine"), source)
    assert spec.sam.point_grid == "coarse-to-fine"
    assert "made with --point-grid full" in caplog.text
    with pytest.raises(BackendConfigError, match="--point-grid is for the sam backend"):
        superpixel_backend(PredictOptions(**options, point_grid="full"), {"backend": "slic"})
