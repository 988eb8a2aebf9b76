"""Real-size models with random weights, saved exactly as the hub ships them (nothing is downloaded).

Users start from Qwen2.5-0.5B (or a Llama-family LLM), DINOv2-base, CLIP ViT-L/14-336 or SigLIP, and
SAM's official ``.pth``. These builders write directories that ``from_pretrained`` reads the way it
reads a hub snapshot: ``config.json`` + ``model.safetensors`` in the stored dtype, tokenizer files
(the model family's own tokenizer class, with a byte-level BPE learned from a small corpus instead of
the real 150k vocabulary), ``preprocessor_config.json``. (SAM's official-format ``.pth`` with random
weights is ``bench.common.save_random_sam``.) The architectures are the real ones (every size of the
released config); only the weights and the vocabulary are not. Tests and ``bench.realsize`` drive
svp's user commands on them.

``overrides`` shrink a config for tests that check a *convention* (CLIP's vision tower, SigLIP's
lack of a CLS token) rather than a size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from pipeline.synth import COLOURS, RELATIONS, SHAPES

# Qwen2.5-0.5B's config.json (its vocabulary size included: the embedding is real-size even though
# the tokenizer uses only its first rows, as Qwen's own padded vocabulary does).
QWEN2_5_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=24, rms_norm_eps=1e-6,
                    rope_theta=1_000_000.0, sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True,
                    vocab_size=151936, hidden_act="silu")
# Llama-3.2-1B's config.json: GQA 32/8, tied embeddings, llama3 RoPE scaling.
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_theta=500_000.0, tie_word_embeddings=True, vocab_size=128256, hidden_act="silu",
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                   image_size=518, layerscale_value=1.0)
DINOV2_LARGE = {**DINOV2_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}
CLIP_VIT_L_14_336 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14, image_size=336, projection_dim=768),
    projection_dim=768)
SIGLIP_BASE_16_224 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, image_size=224))
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Qwen2.5's ChatML template, as its tokenizer_config.json carries it (without the tool-calling branch).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = ("please segment the object described as : it is . , answer image picture photo man woman person "
           "left right top bottom middle front back behind next near small large big one two three other "
           "shirt red blue green white black yellow wearing holding sitting standing the a an of on in with "
           # the chat template's roles and default system prompt, which Qwen's real vocabulary holds as whole
           # words: without them a rendered prompt is ~25 tokens longer than the real tokenizer makes it
           "system user assistant You are a helpful assistant .")


def _byte_level_bpe(special_tokens: list[str], vocab_size: int = 1200) -> Tokenizer:
    """A byte-level BPE (GPT-2 / Qwen2 / Llama-3 style) learned from svp's prompt and synthetic words."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = [*_CORPUS.split(), *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *RELATIONS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(words)] * 20 + words, trainer=trainer)
    return tokenizer


def _save_llm(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)  # safetensors, the config's dtype set to the stored one
    tokenizer.save_pretrained(out)
    return out


def save_qwen2(out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: Any) -> Path:
    """A Qwen2.5-0.5B-shaped LLM with a ``Qwen2Tokenizer`` (ChatML chat template, ``<|endoftext|>`` pad)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = _byte_level_bpe(specials)
    vocab, merges = bpe.get_vocab(), _merges(bpe)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHATML_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    config = Qwen2Config(**{**QWEN2_5_0_5B, **overrides}, bos_token_id=eos, eos_token_id=eos)
    return _save_llm(Qwen2ForCausalLM(config), tokenizer, out, dtype)


def save_llama(out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: Any) -> Path:
    """A Llama-3.2-1B-shaped LLM whose tokenizer has *no* pad token and no chat template (a base model)."""
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    bpe = _byte_level_bpe([bos, eos])
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, bpe.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA_3_2_1B, **overrides}, bos_token_id=bpe.token_to_id(bos),
                         eos_token_id=bpe.token_to_id(eos))
    return _save_llm(LlamaForCausalLM(config), tokenizer, out, dtype)


def _merges(bpe: Tokenizer) -> list[tuple[str, str]]:
    """The merges of a trained BPE, read back from its JSON (``tokenizers`` has no getter for them)."""
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def save_dinov2(out: Path, seed: int = 0, **overrides: Any) -> Path:
    """DINOv2-base (fp32, as shipped) with its ``BitImageProcessor`` (resize 256, crop 224, ImageNet mean/std)."""
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**{**DINOV2_BASE, **overrides})).save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out


def save_clip(out: Path, seed: int = 0, vision: dict | None = None, text: dict | None = None) -> Path:
    """CLIP ViT-L/14-336 (text and vision towers, as ``openai/clip-vit-large-patch14-336`` ships)."""
    torch.manual_seed(seed)
    config = CLIPConfig(text_config={**CLIP_VIT_L_14_336["text_config"], **(text or {})},
                        vision_config={**CLIP_VIT_L_14_336["vision_config"], **(vision or {})},
                        projection_dim=CLIP_VIT_L_14_336["projection_dim"])
    CLIPModel(config).save_pretrained(out)
    side = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(out)
    return out


def save_siglip(out: Path, seed: int = 0, vision: dict | None = None, text: dict | None = None) -> Path:
    """SigLIP base-patch16-224: no CLS token, mean/std 0.5, a plain resize (no crop)."""
    torch.manual_seed(seed)
    config = SiglipConfig(text_config={**SIGLIP_BASE_16_224["text_config"], **(text or {})},
                          vision_config={**SIGLIP_BASE_16_224["vision_config"], **(vision or {})})
    SiglipModel(config).save_pretrained(out)
    side = config.vision_config.image_size
    SiglipImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(out)
    return out
