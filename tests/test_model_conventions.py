"""The conventions real checkpoints bring, each on a small instance of the real family and format:
chat templates, a missing pad token, CLIP and SigLIP vision towers, the encoder's own input size and
normalisation, gradient checkpointing and LoRA on every linear layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_model import V, make_batch

from bench import hub_models
from pipeline.vision_model import default_vision_size, load_vision
from trainer.model import ModelConfig, SegmentationMLLM

SMALL_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048)
SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small-hub")
    return {
        "qwen": hub_models.save_qwen2(root / "qwen", dtype=torch.float32, **SMALL_LLM),
        "llama": hub_models.save_llama(root / "llama", dtype=torch.float32, head_dim=16, **SMALL_LLM),
        "clip": hub_models.save_clip(root / "clip", vision={**SMALL_VISION, "image_size": 112, "patch_size": 14},
                                     text=SMALL_TEXT),
        "siglip": hub_models.save_siglip(root / "siglip", vision={**SMALL_VISION, "image_size": 96, "patch_size": 16},
                                         text=SMALL_TEXT),
        "dinov2": hub_models.save_dinov2(root / "dinov2", **SMALL_VISION),
    }


def _model(llm: str = "tiny", **overrides) -> SegmentationMLLM:
    return SegmentationMLLM(ModelConfig(llm=llm, vision_size=V, lora_dropout=0.0, **overrides))


def test_a_chat_llm_is_prompted_through_its_chat_template(small):
    model = _model(str(small["qwen"]))
    assert model.prompt_format.chat
    texts, image_at = model._tokenize(["the red circle"])
    decoded = model.tokenizer.decode(texts[0])
    assert decoded.startswith("<|im_start|>system\n") and "<|im_start|>user\nplease segment : the red circle" in decoded
    assert decoded.endswith("<|im_start|>assistant\nit is [SEG] .<|im_end|>\n")
    assert model.tokenizer.decode(texts[0][image_at[0] - 3 : image_at[0]]).endswith(". ")  # <image> spliced out here
    # The embedding is padded beyond the tokenizer (as Qwen's is): the new tokens fit, nothing is resized.
    assert model.llm.get_input_embeddings().weight.shape[0] == SMALL_LLM["vocab_size"]
    assert model.seg_id < SMALL_LLM["vocab_size"]
    out = model(make_batch())
    assert torch.isfinite(out.loss)


def test_a_base_llm_without_chat_template_or_pad_token_gets_the_plain_prompt(small):
    model = _model(str(small["llama"]))
    assert model.tokenizer.pad_token is None and not model.prompt_format.chat
    assert model.pad_id == model.tokenizer.eos_token_id
    texts, _ = model._tokenize(["the red circle"])
    decoded = model.tokenizer.decode(texts[0])
    assert decoded.startswith("<|begin_of_text|>please segment") and decoded.endswith("it is [SEG] .<|end_of_text|>")
    batch = make_batch(sentences=("the red circle", "the largest of the blue squares on the left side"))
    out = model(batch)
    assert torch.isfinite(out.loss)
    model.eval()
    alone = model.predict_masks({k: v[:1] for k, v in batch.items()})[0]
    torch.testing.assert_close(alone, model.predict_masks(batch)[0][:1], rtol=1e-4, atol=1e-4)  # pads never seen


@pytest.mark.parametrize("family, tower, prefix", [("clip", "CLIPVisionModel", 1), ("siglip", "SiglipVisionModel", 0)])
def test_two_tower_checkpoints_give_their_vision_tower_without_cls(small, family, tower, prefix):
    side = default_vision_size(str(small[family]))
    assert side == {"clip": 112, "siglip": 96}[family]  # the processor's own size
    encoder, dim, patch = load_vision(str(small[family]), side)
    assert type(encoder.backbone).__name__ == tower and dim == 32
    assert not any("text" in name for name, _ in encoder.backbone.named_parameters())
    mean = hub_models.OPENAI_CLIP_MEAN if family == "clip" else [0.5] * 3
    assert encoder.mean == pytest.approx(tuple(mean))
    pixels = torch.randn(2, 3, side, side)
    features, grid = encoder(pixels)
    assert grid == (side // patch, side // patch)
    full = encoder.backbone(pixel_values=pixels).last_hidden_state
    assert full.shape[1] == grid[0] * grid[1] + prefix
    torch.testing.assert_close(features, full[:, prefix:])
    # Another input size interpolates the learned position embeddings instead of failing.
    features, grid = load_vision(str(small[family]), 2 * side)[0](torch.randn(1, 3, 2 * side, 2 * side))
    assert features.shape[1] == grid[0] * grid[1] == (2 * side // patch) ** 2


def test_dinov2_takes_its_processors_crop_not_its_configs_size(small):
    assert default_vision_size(str(small["dinov2"])) == 224  # the config says 518
    config = ModelConfig(vision=str(small["dinov2"]))
    assert config.vision_size == 224 and ModelConfig(vision=str(small["dinov2"]), vision_size=112).vision_size == 112
    assert ModelConfig().vision_size == 224


def test_gradient_checkpointing_changes_memory_not_results():
    plain, checkpointed = _model(), _model(gradient_checkpointing=True)
    assert checkpointed.llm.base_model.model.is_activation_checkpointing
    assert not plain.llm.base_model.model.is_activation_checkpointing
    for model in (plain, checkpointed):
        model.train()
        model(make_batch()).loss.backward()
    # to rounding: the plain run shares the prompt's prefix and attends with the math kernel, the
    # checkpointed one runs the whole batch with flash (SegmentationMLLM._decode)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_all_linear_puts_lora_on_every_decoder_linear_but_the_lm_head():
    model = _model(lora_targets=("all-linear",))
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.llm.named_modules() if isinstance(module, LoraLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    default = _model()
    assert ({n.rsplit(".", 1)[-1] for n, m in default.llm.named_modules() if isinstance(m, LoraLayer)}
            == {"q_proj", "v_proj"})
