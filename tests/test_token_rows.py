"""The embedding and LM head with the trained [SEG] rows equal peft's own forward, values and
gradients, without its copy of the whole vocabulary (trainer.model.token_rows)."""

from __future__ import annotations

import pytest
import torch
from test_losses import small_qwen  # noqa: F401 (a fixture)
from test_model import V

from trainer.model import ModelConfig, SegmentationMLLM
from trainer.model.token_rows import embed_tokens, frozen_layer, token_logits


@pytest.fixture(params=["tiny", "qwen"], ids=["llama-untied", "qwen-tied"])
def model(request) -> SegmentationMLLM:
    name = str(request.getfixturevalue("small_qwen")) if request.param == "qwen" else "tiny"
    model = SegmentationMLLM(ModelConfig(llm=name, vision_size=V))
    with torch.no_grad():  # the [SEG] rows start as copies of their base rows: move them, so that they count
        for name, param in model.llm.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    return model


def _deltas(model: SegmentationMLLM) -> list[torch.Tensor]:
    return [param for name, param in model.llm.named_parameters() if "trainable_tokens_delta" in name]


def _values_and_gradients(model, call) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for delta in _deltas(model):
        delta.grad = None
    out = call()
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [torch.zeros_like(delta) if delta.grad is None else delta.grad.clone()
                          for delta in _deltas(model)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_embedding_and_head_equal_peft_s_forward_in_values_and_gradients(model, dtype):
    embedding, head = model.llm.get_input_embeddings(), model.causal_lm().get_output_embeddings()
    ids = torch.randint(0, model.seg_id, (3, 9))
    ids[0, 4] = ids[2, 0] = model.seg_id
    hidden = torch.randn(5, embedding.token_adapter.base_layer.embedding_dim)
    tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for ours, peft_s in ((lambda: embed_tokens(embedding, ids), lambda: embedding(ids)),
                             (lambda: token_logits(head, hidden), lambda: head(hidden))):
            (ours_out, ours_grads), (peft_out, peft_grads) = (_values_and_gradients(model, call)
                                                              for call in (ours, peft_s))
            torch.testing.assert_close(ours_out, peft_out, **tolerance)
            assert any(grad.abs().sum() > 0 for grad in ours_grads)  # the [SEG] row is trained through it
            for ours_grad, peft_grad in zip(ours_grads, peft_grads, strict=True):
                torch.testing.assert_close(ours_grad, peft_grad, **tolerance)


def test_disabled_adapters_give_the_frozen_layers_alone(model):
    embedding, head = model.llm.get_input_embeddings(), model.causal_lm().get_output_embeddings()
    ids, hidden = torch.tensor([[model.seg_id, 1, 2]]), torch.randn(2, frozen_layer(head).in_features)
    with model.llm.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(embed_tokens(embedding, ids), frozen_layer(embedding)(ids))
        torch.testing.assert_close(token_logits(head, hidden), frozen_layer(head)(hidden))
    with torch.no_grad():  # and enabled, the [SEG] row is not the frozen one
        assert not torch.equal(embed_tokens(embedding, ids)[0, 0], frozen_layer(embedding)(ids)[0, 0])
