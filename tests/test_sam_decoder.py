"""``decode_prompts`` against segment-anything's own ``MaskDecoder.predict_masks``: the same masks,
IoU predictions and gradients, with prompts of several images in one call, with and without mask
prompts (the first layer's image side shared per image, or not)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything.modeling import Sam

from pipeline.sam_decoder import decode_prompts
from pipeline.sam_model import build_sam

OWNER = torch.tensor([0, 1, 1, 0, 1])  # prompts of two images, interleaved


@pytest.fixture(scope="module")
def sam(tiny_sam_checkpoint: Path) -> Sam:
    return build_sam("tiny", tiny_sam_checkpoint)


def prompts(sam: Sam, with_masks: bool) -> dict[str, torch.Tensor]:
    """Image embeddings of two images and a click (plus, ``with_masks``, a mask prompt) per prompt."""
    generator = torch.Generator().manual_seed(0)
    frame, dim = sam.image_encoder.img_size, sam.prompt_encoder.embed_dim
    embeddings = torch.randn(2, dim, frame // 16, frame // 16, generator=generator)
    points = torch.rand(len(OWNER), 1, 2, generator=generator) * frame
    masks = torch.randn(len(OWNER), 1, frame // 4, frame // 4, generator=generator) if with_masks else None
    sparse, dense = sam.prompt_encoder(points=(points, torch.ones(len(OWNER), 1, dtype=torch.int)), boxes=None,
                                       masks=masks)
    return {"embeddings": embeddings, "sparse": sparse, "dense": dense, "pe": sam.prompt_encoder.get_dense_pe()}


def ours(sam: Sam, x: dict[str, torch.Tensor], shared_dense: bool,
         image_per_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``image_per_prompt``: each prompt's image embedding given in its row (no ``owner``), as the
    trainer's mask head does."""
    dense = x["dense"][:1] if shared_dense else x["dense"]
    if image_per_prompt:
        return decode_prompts(sam.mask_decoder, x["embeddings"][OWNER], None, x["pe"], x["sparse"], dense)
    return decode_prompts(sam.mask_decoder, x["embeddings"], OWNER, x["pe"], x["sparse"], dense)


def reference(sam: Sam, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decoder, one call per image, put back in prompt order."""
    masks, iou = [None] * len(OWNER), [None] * len(OWNER)
    for image in OWNER.unique().tolist():
        mine = (OWNER == image).nonzero()[:, 0].tolist()
        image_masks, image_iou = sam.mask_decoder.predict_masks(x["embeddings"][image : image + 1], x["pe"],
                                                                x["sparse"][mine], x["dense"][mine])
        for row, prompt in enumerate(mine):
            masks[prompt], iou[prompt] = image_masks[row], image_iou[row]
    return torch.stack(masks), torch.stack(iou)


@pytest.mark.parametrize("with_masks,shared_dense,image_per_prompt",
                         [(False, True, False), (False, False, False), (True, False, False), (True, False, True)],
                         ids=["clicks, first layer shared per image", "clicks, per prompt", "mask prompts",
                              "mask prompts, an image per prompt"])
def test_the_same_masks_and_iou_predictions_as_sams_decoder(sam: Sam, with_masks: bool, shared_dense: bool,
                                                            image_per_prompt: bool) -> None:
    with torch.inference_mode():
        x = prompts(sam, with_masks)
        masks, iou = ours(sam, x, shared_dense, image_per_prompt)
        expected_masks, expected_iou = reference(sam, x)
    assert masks.shape == expected_masks.shape == (len(OWNER), 4, *expected_masks.shape[2:])
    assert expected_masks.std() > 0.01  # masks that differ from pixel to pixel, so the comparison can fail
    torch.testing.assert_close(masks, expected_masks, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(iou, expected_iou, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared_dense,image_per_prompt", [(True, False), (False, False), (True, True)],
                         ids=["first layer shared per image", "per prompt", "an image per prompt"])
def test_the_same_gradients_as_sams_decoder(sam: Sam, shared_dense: bool, image_per_prompt: bool) -> None:
    """What the trainer's mask head and SAM's pretraining backpropagate through."""
    weights = torch.randn(len(OWNER), 4, sam.image_encoder.img_size // 4, sam.image_encoder.img_size // 4,
                          generator=torch.Generator().manual_seed(1))
    gradients = []
    for decode in (lambda x: ours(sam, x, shared_dense, image_per_prompt), lambda x: reference(sam, x)):
        sam.zero_grad(set_to_none=True)
        x = prompts(sam, with_masks=False)
        x["embeddings"].requires_grad_(True)
        masks, iou = decode(x)
        ((masks * weights).mean() + iou.square().mean()).backward()
        gradients.append({"embeddings": x["embeddings"].grad,
                          **{name: p.grad for name, p in sam.mask_decoder.named_parameters() if p.grad is not None}})
    got, expected = gradients
    assert got.keys() == expected.keys() and len(expected) > 20
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-6, msg=name)
