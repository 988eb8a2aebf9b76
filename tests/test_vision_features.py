"""Frozen vision features stored by `svp precompute --store-vision-features` and read by the trainer
only when they are its own encoder's: the identity the manifest records, the features themselves,
the same losses as running the encoder, and every mismatch falling back to the encoder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from transformers import Dinov2Config, Dinov2Model

from pipeline.images import decode_image
from pipeline.shards import decode_stored_array
from pipeline.vision_model import _TINY_VISION, load_vision, vision_pixels


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory) -> Path:
    """A tiny DINOv2 saved as the hub ships one (config + safetensors), other weights than 'tiny'."""
    out = tmp_path_factory.mktemp("dinov2-tiny")
    torch.manual_seed(7)
    Dinov2Model(Dinov2Config(image_size=224, **_TINY_VISION)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def featured(synth_root, tmp_path_factory, tiny_sam_checkpoint, vision_dir, ray_local) -> Path:
    from jobs.precompute import main as precompute

    out = tmp_path_factory.mktemp("featured")
    assert precompute(["--refer-root", str(synth_root), "--dataset", "refcoco", "--out", str(out),
                       "--backend", "felzenszwalb", "--shard-size", "4", "--store-sam-embeddings",
                       "--sam-checkpoint", str(tiny_sam_checkpoint), "--sam-model", "tiny",
                       "--store-vision-features", "--vision", str(vision_dir)]) == 0
    return out


def _samples(shards: Path) -> list[dict]:
    return [sample for tar in sorted(shards.glob("*.tar")) for sample in wds.WebDataset(str(tar), shardshuffle=False)]


def test_precompute_stores_each_images_features_and_records_the_encoder(featured, vision_dir):
    encoder = load_vision(str(vision_dir), 224)[0]
    manifest = json.loads((featured / "manifest.json").read_text())
    assert manifest["config"]["vision"] == encoder.identity(str(vision_dir), 224)
    assert manifest["config"]["vision"]["weights_sha256"] != load_vision("tiny", 224)[0].identity("tiny", 224)[
        "weights_sha256"]
    from pipeline.inspect import format_summary, read_output, summarise

    summary = summarise(read_output(str(featured)))
    assert f"stored features: sam.npy (SAM tiny), vision.npy ({vision_dir} at 224 px)" in format_summary(summary)
    samples = _samples(featured)
    assert len(samples) == manifest["images_written"] > 0
    for sample in samples[:3]:
        stored = decode_stored_array(sample["vision.npy"])
        assert stored.dtype == np.float16 and stored.shape == (256, 48)
        rgb = decode_image(sample["jpg"]).rgb
        computed, grid = encoder(vision_pixels(rgb, 224, encoder.mean, encoder.std)[None])
        assert grid == (16, 16)
        torch.testing.assert_close(torch.from_numpy(stored.astype(np.float32)), computed[0], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("flags, message", [
    (["--store-vision-features"], "--store-vision-features and --vision go together"),
    (["--vision", "tiny"], "--store-vision-features and --vision go together"),
    (["--vision-size", "448"], "--store-vision-features and --vision go together"),
    (["--store-vision-features", "--vision", "/no/such/dinov2"], "is not a model directory"),
])
def test_a_vision_request_that_cannot_work_is_refused_before_any_work(synth_root, tmp_path, capsys, flags, message):
    from jobs.precompute import main as precompute

    out = tmp_path / "out"
    assert precompute(["--refer-root", str(synth_root), "--dataset", "refcoco", "--out", str(out),
                       "--backend", "felzenszwalb", *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def _model(sam: Path, **overrides):
    from trainer.model import ModelConfig, SegmentationMLLM

    return SegmentationMLLM(ModelConfig(sam_checkpoint=str(sam), **overrides))


def _first_batch(shards: Path, config) -> dict:
    from trainer.data import make_loader, shard_urls

    return next(iter(make_loader(shard_urls(str(shards), "train"), config, train=False, batch_size=4,
                                 num_workers=0)))


def test_stored_features_give_the_losses_of_the_encoder_they_came_from(featured, tiny_sam_checkpoint, vision_dir):
    from trainer.stored_features import data_config

    manifest = json.loads((featured / "manifest.json").read_text())
    model = _model(tiny_sam_checkpoint, vision=str(vision_dir)).eval()
    config = data_config(model, manifest)
    assert config.vision_features_shape == (256, 48) and config.use_sam_embeddings
    stored = _first_batch(featured, config)
    encoded = _first_batch(featured, config.__class__(**{**vars(config), "vision_features_shape": None}))
    assert "pixel_values" not in stored and "vision_features" not in encoded
    assert stored["keys"] == encoded["keys"]
    with torch.no_grad():
        from_store, from_encoder = model(stored), model(encoded)
    for name in ("loss", "ce_loss", "bce_loss", "dice_loss", "mask_logits"):
        torch.testing.assert_close(getattr(from_store, name), getattr(from_encoder, name), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("overrides", [{"vision": "tiny"}, {"vision_size": 112}], ids=["other weights", "other size"])
def test_features_of_another_encoder_are_ignored_with_a_warning(featured, tiny_sam_checkpoint, vision_dir, caplog,
                                                                 overrides):
    from trainer.stored_features import data_config

    manifest = json.loads((featured / "manifest.json").read_text())
    model = _model(tiny_sam_checkpoint, **{"vision": str(vision_dir), **overrides})
    with caplog.at_level(logging.WARNING, logger="trainer.stored_features"):
        config = data_config(model, manifest)
    assert config.vision_features_shape is None and "ignoring them and running the encoder" in caplog.text
    batch = _first_batch(featured, config)
    assert "vision_features" not in batch and batch["pixel_values"].shape[-1] == model.config.vision_size


def test_train_reads_them_and_eval_and_predict_work_with_or_without(featured, tiny_sam_checkpoint, vision_dir,
                                                                    tmp_path, capsys):
    from train_helpers import train_flags

    from jobs.eval import run_eval
    from jobs.train import main as train
    from pipeline.superpixels.spec import BackendSpec
    from trainer.predict import Predictor

    run = tmp_path / "run"
    assert train(train_flags(featured, run, tiny_sam_checkpoint, "--vision", str(vision_dir), "--max-steps", "2")) == 0
    assert "read from the shards instead of encoded at each step: sam.npy, vision.npy" in capsys.readouterr().out
    results, _ = run_eval(run, str(featured), ["val"], batch_size=4)
    assert results["splits"]["val"]["samples"] > 0
    predictor = Predictor.load(run, BackendSpec("felzenszwalb"), device="cpu", batch_size=2)
    image = predictor.prepare([np.full((40, 60, 3), 128, np.uint8)])[0]
    masks = predictor.masks([(image, "the thing on the left"), (image, "the other thing")])
    assert [mask.shape for mask, _ in masks] == [(40, 60), (40, 60)]


def test_the_standalone_tiny_encoder_is_the_one_a_model_of_the_default_seed_draws(tiny_sam_checkpoint):
    from pipeline.vision_model import standalone_encoder

    torch.manual_seed(3)
    standalone = standalone_encoder("tiny", 224).identity("tiny", 224)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))  # the caller's random stream is left as it was
    assert _model(tiny_sam_checkpoint).vision_identity() == standalone  # --seed 0, the default
    assert _model(tiny_sam_checkpoint, seed=1).vision_identity()["weights_sha256"] != standalone["weights_sha256"]
