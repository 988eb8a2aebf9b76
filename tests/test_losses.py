"""The answer CE scores only the labelled rows, and scores them as the LLM's own full logits would."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import V, capture_sequences, make_batch
from torch import nn

from bench import hub_models
from trainer.model import ModelConfig, SegmentationMLLM
from trainer.model.losses import IGNORE_INDEX, answer_ce
from trainer.model.token_rows import frozen_layer


def full_logits_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: CE of every position's fp32 logits against the next label, ``ignore_index`` elsewhere."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def test_answer_ce_equals_the_full_logits_ce_and_runs_the_head_on_the_labelled_rows_only() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=generator)
    labels = torch.full((3, 7), IGNORE_INDEX)
    labels[0, 2:5] = torch.tensor([3, 5, 1])  # answers of different lengths and places, as right padding makes
    labels[1, 5:7] = torch.tensor([9, 0])
    labels[2, 1:7] = torch.tensor([2, 2, 4, 6, 8, 7])
    head = nn.Linear(16, 10)
    rows_seen = []
    head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape))
    torch.testing.assert_close(answer_ce(hidden, labels, head), full_logits_ce(head(hidden), labels))
    assert rows_seen[0] == (3 + 2 + 6, 16)  # the row before each label, none of the 18 - 11 others


@pytest.fixture(scope="module")
def small_qwen(tmp_path_factory):
    """A small Qwen2 (tied input and output embeddings, as Qwen2.5-0.5B's are) saved like a hub snapshot."""
    return hub_models.save_qwen2(tmp_path_factory.mktemp("qwen") / "qwen", dtype=torch.float32, hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=2048)


@pytest.mark.parametrize("llm, training", [("tiny", "lora"), ("tiny", "full"), ("qwen", "lora")],
                         ids=["llama-untied-lora", "llama-full", "qwen-tied-lora"])
def test_the_model_s_ce_is_the_ce_of_the_llm_s_own_full_logits(llm: str, training: str, request) -> None:
    name = str(request.getfixturevalue("small_qwen")) if llm == "qwen" else llm
    model = SegmentationMLLM(ModelConfig(llm=name, vision_size=V, llm_training=training)).eval()
    with torch.no_grad():  # LoRA B and the [SEG] row deltas start at zero: move them, so that they count
        for param in model.llm.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    sequences = capture_sequences(model)
    batch = make_batch()
    ce = model(batch).ce_loss
    labels = model._run(batch).labels
    spliced = sequences[0]
    with torch.no_grad():  # the LLM's own forward: the whole batch (no shared prefix), every position and word
        logits = model.llm(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
                           position_ids=model._positions(spliced.attention_mask)).logits
    torch.testing.assert_close(ce, full_logits_ce(logits, labels), rtol=1e-5, atol=1e-6)


def test_the_lm_head_sees_only_the_answer_rows_and_prediction_never_runs_it() -> None:
    model = SegmentationMLLM(ModelConfig(vision_size=V)).eval()
    rows_seen = []
    frozen_layer(model.causal_lm().get_output_embeddings()).register_forward_hook(
        lambda module, args, out: rows_seen.append(tuple(args[0].shape)))
    batch = make_batch()
    model(batch)
    assert rows_seen == [(2 * len(model.answer_ids), model.seg_mlp[0].in_features)]
    model.predict_masks(batch)
    assert len(rows_seen) == 1
