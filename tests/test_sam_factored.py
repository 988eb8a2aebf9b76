"""The factored decoder against the decoder it stands in for: the same predicted IoU and masks, to
float64 rounding, at the tiny decoder's and at every real SAM's decoder width (256 wide, 8 heads,
64×64 tokens)."""

from __future__ import annotations

import pytest
import torch

from pipeline.sam_decoder import decode_tokens, mask_logits, predicted_iou
from pipeline.sam_factored import FactoredDecoder
from pipeline.sam_model import build_sam


@pytest.mark.parametrize("model_type", ["tiny", "small"])
def test_the_factored_decoder_predicts_what_the_decoder_does(model_type: str) -> None:
    torch.manual_seed(0)
    sam = build_sam(model_type)
    decoder = sam.mask_decoder.double()
    with torch.no_grad():  # layer norms away from their initial (1, 0), so that each one's weight and bias count
        for norm in [m for m in decoder.modules() if isinstance(m, torch.nn.LayerNorm)]:
            norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(0, 0.2)
    frame, dim = sam.image_encoder.img_size, sam.prompt_encoder.embed_dim
    embedding = torch.randn(1, dim, frame // 16, frame // 16, dtype=torch.float64)
    points = torch.rand(6, 1, 2) * frame
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(points, torch.ones(6, 1, dtype=torch.int)), boxes=None, masks=None)
        sparse, dense, pe = sparse.double(), dense[:1].double(), sam.prompt_encoder.get_dense_pe().double()
        owner = torch.zeros(6, dtype=torch.long)
        expected = decode_tokens(decoder, embedding, owner, pe, sparse, dense)
        factored = FactoredDecoder(decoder, embedding[0], pe, dense)
        first, rest = factored(sparse[:4]), factored(sparse[4:])  # one per image serves calls of any size
        chosen = torch.tensor([3, 1])
        tokens = first.decoded_tokens(chosen)
        masks = first.mask_logits(chosen, slice(None), decoder.output_upscaling)  # every output, as mask_logits
        expected_masks = mask_logits(decoder, expected[chosen])
        iou = predicted_iou(decoder, expected)
    assert iou.std() > 1e-3, "the prompts must predict different IoUs for the comparison to mean anything"
    torch.testing.assert_close(torch.cat([first.iou, rest.iou]), iou, rtol=0, atol=1e-10)
    torch.testing.assert_close(tokens, expected.tokens[chosen], rtol=0, atol=1e-10)
    assert masks.shape == (2, decoder.num_mask_tokens, 4 * frame // 16, 4 * frame // 16)
    assert masks.std() > 1e-2, "masks that vary, or the comparison means nothing"
    torch.testing.assert_close(masks, expected_masks, rtol=0, atol=1e-9)
