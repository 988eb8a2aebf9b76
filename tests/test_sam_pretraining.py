"""The tiny SAM's promptable pretraining (the demo's stand-in for SAM's released weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs import tiny_sam
from pipeline.refer import load_refer
from pipeline.sam_model import build_sam
from trainer.sam_pretraining import PretrainConfig, PretrainingError, _clicks, load_promptable_images, pretrain_sam

S = 512  # the tiny SAM's input frame


def test_train_images_and_their_referred_objects_are_loaded(synth_root: Path) -> None:
    images = load_promptable_images(synth_root, S)
    refer = load_refer(synth_root, "refcoco", "unc")
    train = [sample for sample in refer.samples if sample.split == "train"]
    assert len(images) == len(train)
    for image, sample in zip(images, train):
        assert image.pixels.shape == (3, S, S)
        assert image.masks.shape[0] == len({ref.ann_id for ref in sample.refs})
        assert image.masks.shape[1:] == (S // 4, S // 4)
        assert set(image.masks.unique().tolist()) <= {0.0, 1.0}
        assert (image.masks.flatten(1).sum(1) > 0).all()


def test_a_split_without_images_is_a_clear_error(synth_root: Path) -> None:
    with pytest.raises(PretrainingError, match="no 'nosuch' image"):
        load_promptable_images(synth_root, S, split="nosuch")


def test_every_click_is_inside_its_object() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 16, 16)
    masks[0, 2:4, 5:9] = 1
    masks[1, 10, 11] = 1
    masks[2, 12:, :3] = 1
    for _ in range(20):
        xy = (_clicks(masks, generator) - 2) / 4  # back to mask cells
        for mask, (x, y) in zip(masks, xy.long().tolist()):
            assert mask[y, x] == 1


def test_pretraining_fits_the_clicked_objects(synth_root: Path) -> None:
    """Fifty steps on four images more than halve the loss (mask terms + IoU head); the SAM ends frozen."""
    torch.manual_seed(0)
    sam = build_sam("tiny")
    images = load_promptable_images(synth_root, S)[:4]
    history = pretrain_sam(sam, images, PretrainConfig(steps=50, images_per_step=4, log_every=10))
    assert len(history) == 5
    losses = [loss for loss, _ in history]
    assert losses[-1] < 0.5 * losses[0], history
    assert not sam.training and not any(p.requires_grad for p in sam.parameters())


def test_tiny_sam_command_pretrains_and_saves_a_loadable_checkpoint(synth_root: Path, tmp_path: Path) -> None:
    random_path, trained_path = tmp_path / "random.pth", tmp_path / "trained.pth"
    assert tiny_sam.main(["--out", str(random_path)]) == 0
    assert tiny_sam.main(["--out", str(trained_path), "--pretrain-on", str(synth_root), "--steps", "2",
                          "--images-per-step", "2"]) == 0
    random_sam, trained = build_sam("tiny", random_path), build_sam("tiny", trained_path)
    changed = [name for name, value in trained.state_dict().items()
               if not torch.equal(value, random_sam.state_dict()[name])]
    assert any(name.startswith("image_encoder.") for name in changed)
    assert any(name.startswith("mask_decoder.") for name in changed)


def test_tiny_sam_command_names_a_bad_refer_root_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert tiny_sam.main(["--out", str(tmp_path / "sam.pth"), "--pretrain-on", str(tmp_path / "missing")]) == 2
    assert "svp tiny-sam: error: --pretrain-on" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
