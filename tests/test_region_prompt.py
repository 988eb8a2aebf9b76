"""The region prompt: token regions per projector, the vision → SAM frame resampling, its training signal."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from trainer.checkpoint import CheckpointError, check_same_model, model_config_from_dict
from trainer.model import ModelConfig, ProjectorConfig, SegmentationMLLM, build_projector
from trainer.model.region_prompt import PADDING_LOGIT, RegionPrompt, to_sam_frame

V, S = 112, 512  # as in test_model: tiny DINOv2 at 112 px (8×8 patches of 14 px), tiny SAM at 512 px


def test_grid_projectors_own_grid_cells_and_svp_owns_superpixels() -> None:
    superpixels = torch.randint(0, 5, (2, V, V))
    grid = (8, 8)
    y, x = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    mlp = build_projector(ProjectorConfig(kind="mlp"), 32, 16).regions(grid, superpixels)
    assert torch.equal(mlp, ((y // 14) * 8 + x // 14).expand(2, V, V))
    pool = build_projector(ProjectorConfig(kind="pool", pool_tokens=16), 32, 16).regions(grid, superpixels)
    assert torch.equal(pool, ((y // 28) * 4 + x // 28).expand(2, V, V))
    svp = build_projector(ProjectorConfig(kind="svp"), 32, 16).regions(grid, superpixels)
    assert torch.equal(svp, superpixels)


def test_to_sam_frame_puts_the_squashed_image_where_sam_put_the_resized_one() -> None:
    """A left-half map on a tall image (h = S, w = S/2 in SAM's frame) → at 128² (scale 1/4) the
    image is 128 × 64: columns < 32 are the map's left half, 32..63 its right half, 64.. padding."""
    image_map = torch.zeros(1, V, V)
    image_map[..., : V // 2] = 5.0
    framed = to_sam_frame(image_map, torch.tensor([[S, S // 2]]), S, S // 4, fill=-3.0)
    assert framed.shape == (1, 1, S // 4, S // 4)
    assert torch.allclose(framed[0, 0, :, :30], torch.tensor(5.0))  # a pixel or two blends at the edge of the half
    assert torch.allclose(framed[0, 0, :, 34:64], torch.tensor(0.0))
    assert torch.allclose(framed[0, 0, :, 64:], torch.tensor(-3.0))  # the image ends exactly at column 64


def test_region_logits_paint_each_token_on_its_region() -> None:
    torch.manual_seed(0)
    prompt = RegionPrompt(llm_dim=8)
    seg, visual = torch.randn(1, 8), torch.randn(1, 2, 8)
    regions = torch.zeros(1, V, V, dtype=torch.long)
    regions[..., V // 2 :] = 1  # token 0 left, token 1 right
    logits = prompt.token_logits(seg, visual)[0]
    framed = prompt(seg, visual, regions, torch.tensor([[S // 2, S]]), S, S // 4)[0, 0]  # a wide image
    # the image is the top 64 of 128 rows; a pixel or two blends between the tokens' regions
    assert torch.allclose(framed[:64, :62], logits[0]) and torch.allclose(framed[:64, 66:], logits[1])
    assert torch.allclose(framed[64:], torch.tensor(PADDING_LOGIT))


def test_the_region_loss_trains_the_selection_and_is_absent_without_the_prompt() -> None:
    from tests.test_model import make_batch

    batch = make_batch()
    model = SegmentationMLLM(ModelConfig(vision_size=V, projector=ProjectorConfig(kind="svp")))
    output = model(batch)
    assert float(output.region_loss) > 0
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.region_prompt.parameters())
    plain = SegmentationMLLM(ModelConfig(vision_size=V, region_prompt=False))
    assert plain.region_prompt is None and float(plain(batch).region_loss) == 0
    assert not any(name.startswith("region_prompt.") for name in plain.trainable_state_dict())


def test_a_config_from_before_the_region_prompt_has_none() -> None:
    old = asdict(ModelConfig())
    del old["region_prompt"]
    assert model_config_from_dict(old).region_prompt is False
    check_same_model(old, asdict(ModelConfig(region_prompt=False)), "checkpoint")
    with pytest.raises(CheckpointError, match="region_prompt: checkpoint False vs requested True"):
        check_same_model(old, asdict(ModelConfig()), "checkpoint")


def test_the_train_command_line_sets_the_region_prompt() -> None:
    from jobs import entry, train

    required = ["--shards", "shards", "--run-dir", "run"]
    assert train.train_config(entry.parse(train, required)).model.region_prompt is True
    config = train.train_config(entry.parse(train, [*required, "--no-region-prompt", "--region-weight", "0.25"])).model
    assert (config.region_prompt, config.region_weight) == (False, 0.25)
