"""The segmentation MLLM on tiny random parts: shapes, splicing, what trains, strict state, loading."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.vision_model import IMAGENET_MEAN, IMAGENET_STD, load_vision
from trainer.model import (
    ANSWER,
    PROMPT,
    ModelConfig,
    ModelLoadError,
    ProjectorConfig,
    SegmentationMLLM,
    TrainableStateError,
)
from trainer.model.losses import IGNORE_INDEX, answer_ce, mask_bce, mask_dice
from trainer.model.mllm import tiny_causal_lm
from trainer.model.tokenizer import tiny_tokenizer

V, S, C = 112, 512, 64  # tiny DINOv2 at 112 px → 8×8 patch grid; tiny SAM: 512 px frame, 64 wide
GRID_PATCHES = 64


def make_batch(counts: tuple[int, ...] = (3, 7), sentences: tuple[str, ...] | None = None, seed: int = 0) -> dict:
    """Vertical-stripe superpixels (K_b stripes), random pixels, a left-half target mask."""
    g = torch.Generator().manual_seed(seed)
    columns = torch.arange(V)
    superpixels = torch.stack([(columns * k // V).expand(V, V) for k in counts])
    gt = torch.zeros(len(counts), S // 4, S // 4)
    gt[:, :, : S // 8] = 1
    default = ("the red circle", "the largest of the blue squares that is on the left side of the picture")
    return {
        "pixel_values": torch.randn(len(counts), 3, V, V, generator=g),
        "superpixels": superpixels,
        "num_superpixels": torch.tensor(counts),
        "sentences": list(sentences or default[: len(counts)]),
        "sam_embeddings": torch.randn(len(counts), C, S // 16, S // 16, generator=g),
        "gt_masks": gt,
        "input_sizes": torch.tensor([[S, S]] * len(counts)),  # the image fills SAM's frame
    }


def build(kind: str = "svp", **overrides) -> SegmentationMLLM:
    return SegmentationMLLM(ModelConfig(vision_size=V, projector=ProjectorConfig(kind=kind), **overrides))


def take(batch: dict, rows: list[int]) -> dict:
    return {k: [v[i] for i in rows] if isinstance(v, list) else v[rows] for k, v in batch.items()}


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory, tiny_sam_checkpoint) -> dict[str, str]:
    """The tiny LLM (+tokenizer, without the new tokens) and DINOv2 saved like hub checkpoints."""
    root = tmp_path_factory.mktemp("pretrained")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(123)
    tiny_causal_lm(len(tokenizer)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    load_vision("tiny", V)[0].backbone.save_pretrained(root / "vision")
    return {"llm": str(root / "llm"), "vision": str(root / "vision"), "sam_checkpoint": str(tiny_sam_checkpoint)}


@pytest.mark.parametrize("kind, expected", [("svp", [3, 7]), ("mlp", [GRID_PATCHES] * 2), ("pool", [16, 16])])
def test_forward_shapes_and_visual_token_counts(kind: str, expected: list[int]) -> None:
    model = build(kind)
    out = model(make_batch())
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.mask_logits.shape == (2, 1, S // 4, S // 4)
    assert out.num_visual_tokens.tolist() == expected
    model.eval()
    logits, tokens = model.predict_masks(make_batch())
    torch.testing.assert_close(logits, model(make_batch()).mask_logits, rtol=1e-5, atol=1e-6)  # flash vs math: rounding
    assert tokens.tolist() == expected
    assert model.num_patches() == GRID_PATCHES


def test_sam_pixels_run_the_frozen_encoder_like_precomputed_embeddings() -> None:
    model = build().eval()
    batch = make_batch()
    batch["sam_pixels"] = torch.randn(2, 3, S, S)
    from_pixels = batch.copy()
    del from_pixels["sam_embeddings"]
    batch["sam_embeddings"] = model.mask_head.image_embeddings(batch["sam_pixels"])
    assert torch.allclose(model(from_pixels).mask_logits, model(batch).mask_logits, atol=1e-5)


def test_mask_head_decodes_a_batch_like_sam_decodes_each_image() -> None:
    """One decoder call for the batch = SAM's own single-mask forward, image by image."""
    head = SegmentationMLLM(ModelConfig(vision_size=V)).mask_head
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3, C, S // 16, S // 16, generator=generator)
    prompts = torch.randn(3, 1, C, generator=generator)
    _, no_mask = head.sam.prompt_encoder(points=None, boxes=None, masks=None)
    expected = torch.cat([
        head.sam.mask_decoder(image_embeddings=embedding[None], image_pe=head.sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=prompt[None], dense_prompt_embeddings=no_mask,
                              multimask_output=False)[0]
        for embedding, prompt in zip(embeddings, prompts)
    ])
    torch.testing.assert_close(head(embeddings, prompts), expected, rtol=1e-4, atol=1e-4)


def test_padding_does_not_leak_into_a_shorter_sample() -> None:
    """Sample 0 alone vs. batched with a longer one (more tokens, longer sentence): same LLM states."""
    model = build().eval()
    batch = make_batch(counts=(3, 9))
    with torch.no_grad():
        pair, alone = model._run(batch), model._run(take(batch, [0]))
    length = alone.hidden.shape[1]  # alone: no padding at all
    assert pair.hidden.shape[1] > length and int((pair.labels[1] != IGNORE_INDEX).sum()) == len(model.answer_ids)
    torch.testing.assert_close(pair.hidden[0, :length], alone.hidden[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pair.mask_logits[0], alone.mask_logits[0], rtol=1e-5, atol=1e-5)


def capture_sequences(model: SegmentationMLLM) -> list:
    """Every ``_Sequences`` the model hands its LLM, as the model calls it."""
    captured, decode = [], model._decode
    model._decode = lambda sequences: (captured.append(sequences), decode(sequences))[1]
    return captured


@pytest.mark.parametrize("training", ["lora", "full"])
def test_the_shared_prefix_runs_once_with_the_states_and_gradients_of_the_full_batch(training: str) -> None:
    """Both sentences start with "the": the prompt's opening and that word run once, as one sequence,
    and the rest of each sample attends to their cached keys and values."""
    model = build(lora_dropout=0.0, llm_training=training).train()
    model.min_shared_positions = 1  # two samples share too few positions for the default to share them
    decoder = model.causal_lm().get_decoder()
    calls = []
    decoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(tuple(kwargs["inputs_embeds"].shape)),
                                  with_kwargs=True)
    sequences = capture_sequences(model)
    model(make_batch())
    (spliced,) = sequences
    samples, length, width = spliced.embeds.shape
    opening = model.tokenizer(PROMPT.split("{sentence}")[0] + "the")["input_ids"]  # BOS included
    assert spliced.shared == len(opening) > 1
    assert calls == [(1, spliced.shared, width), (samples, length - spliced.shared, width)]
    trained = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(samples, length, width, generator=torch.Generator().manual_seed(0))
    weights = weights * spliced.attention_mask[..., None]  # padding positions are never read
    results = []
    for run in (lambda: model._decode(spliced),
                lambda: decoder(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
                                position_ids=model._positions(spliced.attention_mask)).last_hidden_state):
        model.zero_grad(set_to_none=True)
        hidden = run()
        (hidden * weights).sum().backward(retain_graph=True)
        results.append((hidden * (weights != 0), [p.grad for p in trained]))
    (shared_hidden, shared_grads), (full_hidden, full_grads) = results
    assert [g is None for g in shared_grads] == [g is None for g in full_grads]
    assert sum(g is not None for g in full_grads) > 4
    torch.testing.assert_close(shared_hidden, full_hidden, rtol=1e-4, atol=1e-5)
    for got, expected in zip(shared_grads, full_grads):
        if expected is None:
            continue
        scale = float(expected.abs().max())  # gradients of the random tiny LLM reach the hundreds
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5 * scale)


@pytest.mark.parametrize("checkpointing, calls_per_batch", [(False, 2), (True, 1)])
def test_what_is_shared_and_when_the_batch_runs_whole(checkpointing: bool, calls_per_batch: int) -> None:
    """Different first words leave the prompt's opening to share; gradient checkpointing (whose layers
    drop HF's cache), a batch of one and inference run in one call."""
    model = build(gradient_checkpointing=checkpointing).train()
    calls = []
    model.causal_lm().get_decoder().register_forward_hook(lambda *args: calls.append(1))
    sequences = capture_sequences(model)
    batch = make_batch(sentences=("red circle", "the blue square"))
    model(batch)  # the default threshold: one sample's opening saved is too little to share
    shared = len(model.tokenizer(PROMPT.split("{sentence}")[0])["input_ids"])
    assert sequences[0].shared == shared < model.min_shared_positions
    assert len(calls) == 1
    model.min_shared_positions = shared  # (2 - 1) samples × shared positions saved: just enough
    model(batch)
    assert len(calls) == 1 + calls_per_batch
    calls.clear()
    model(take(batch, [0]))
    assert len(calls) == 1
    model.predict_masks(batch)  # inference: the batch runs whole, so its outputs are each sample's own
    assert len(calls) == 2


def test_splice_layout_visual_tokens_in_place_labels_on_the_answer_only() -> None:
    model = build()
    tokens = torch.randn(2, 5, model.seg_mlp[0].in_features)
    valid = torch.tensor([[True] * 2 + [False] * 3, [True] * 5])
    sequences = model._splice(["the red circle", "the blue square on the left"], tokens, valid)
    texts, image_at = model._tokenize(["the red circle", "the blue square on the left"])
    for i, n in enumerate((2, 5)):
        length = len(texts[i]) + n
        assert int(sequences.attention_mask[i].sum()) == length
        assert torch.equal(sequences.embeds[i, image_at[i] : image_at[i] + n], tokens[i, :n])
        labelled = sequences.labels[i][sequences.labels[i] != IGNORE_INDEX].tolist()
        assert labelled == model.answer_ids
        assert (sequences.labels[i, :length - len(model.answer_ids)] == IGNORE_INDEX).all()
        assert int(sequences.seg_positions[i]) == length - len(model.answer_ids) + model.seg_offset
    with pytest.raises(ValueError, match="contains"):
        model._tokenize(["the [SEG] circle"])  # a sentence cannot smuggle in a second [SEG] or <image>


@pytest.mark.parametrize("kind", ["svp", "mlp", "pool"])
def test_a_few_steps_on_one_batch_reduce_the_loss(kind: str) -> None:
    # Deterministic: LoRA dropout would draw from the global RNG, so the losses would depend on
    # which tests ran before (at lr 3e-3 svp's 6th step rose by 0.005-0.03 in some orders). lr 1e-3
    # is the demo's.
    model = build(kind, lora_dropout=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    batch, losses = make_batch(), []
    for _ in range(6):
        out = model(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_gradients_reach_the_trained_parts_and_only_them() -> None:
    model = build()
    model(make_batch()).loss.backward()
    named = dict(model.named_parameters())
    trained = {name for name, p in named.items() if p.requires_grad}
    # the frozen parts: never trainable, never a gradient
    for name, p in named.items():
        frozen = (
            name.startswith(("vision.", "mask_head.sam.image_encoder.", "mask_head.sam.prompt_encoder.",
                             "mask_head.sam.mask_decoder.iou_prediction_head."))
            or (name.startswith("llm.") and "lora_" not in name and "trainable_tokens_delta" not in name)
        )
        assert frozen == (name not in trained), name
        if frozen:
            assert p.grad is None, name
    assert any(n.startswith("llm.") and "base_layer" in n for n in named)  # the base LLM is there, frozen

    def grad_norm(select) -> float:
        return sum(float(p.grad.abs().sum()) for n, p in named.items() if select(n) and p.grad is not None)

    for part, select in {
        "projector": lambda n: n.startswith("projector."),
        "LoRA B (A starts with no gradient: B is zero-initialised)": lambda n: "lora_B" in n,
        "[SEG] input embedding row": lambda n: "embed_tokens.token_adapter.trainable_tokens_delta" in n,
        "[SEG] output (lm_head) row": lambda n: "lm_head.token_adapter.trainable_tokens_delta" in n,
        "[SEG] MLP": lambda n: n.startswith("seg_mlp."),
        "mask decoder": lambda n: n.startswith("mask_head.sam.mask_decoder."),
    }.items():
        assert grad_norm(select) > 0, part


def test_full_llm_training_trains_every_llm_weight_without_lora() -> None:
    model = build(llm_training="full")
    llm = dict(model.llm.named_parameters())
    assert llm and all(p.requires_grad and p.dtype == torch.float32 for p in llm.values())
    assert not any("lora" in name for name in llm)
    model(make_batch()).loss.backward()
    assert all(llm[name].grad is not None for name in ("model.embed_tokens.weight", "lm_head.weight"))
    trained = model.trainable_state_dict()
    assert {f"llm.{name}" for name in llm} <= set(trained)
    assert not any(name.startswith("vision.") for name in trained)
    with pytest.raises(ValueError, match="llm_training"):
        ModelConfig(llm_training="adapters")


def test_a_saved_model_config_without_llm_training_counts_as_lora() -> None:
    from trainer.checkpoint import CheckpointError, check_same_model

    old = asdict(ModelConfig())
    del old["llm_training"]
    check_same_model(old, asdict(ModelConfig()), "checkpoint")
    with pytest.raises(CheckpointError, match="llm_training: checkpoint 'lora' vs requested 'full'"):
        check_same_model(old, asdict(ModelConfig(llm_training="full")), "checkpoint")


def test_trainable_state_dict_round_trip_into_a_differently_seeded_model(pretrained_dirs: dict) -> None:
    config = ModelConfig(vision_size=V, seed=0, **pretrained_dirs)
    trained = SegmentationMLLM(config)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    trained(make_batch()).loss.backward()
    optimizer.step()  # LoRA B and the token rows move away from their initial values
    trained.eval()
    state = {name: t.clone() for name, t in trained.trainable_state_dict().items()}
    assert any("lora_B" in n for n in state) and any("mask_decoder" in n for n in state)

    fresh = SegmentationMLLM(replace(config, seed=1)).eval()
    batch = make_batch()
    expected = trained(batch)
    assert not torch.allclose(fresh(batch).mask_logits, expected.mask_logits)
    fresh.load_trainable_state_dict(state)
    got = fresh(batch)
    assert torch.equal(got.mask_logits, expected.mask_logits) and torch.equal(got.loss, expected.loss)


def test_loading_trained_weights_is_strict_and_all_or_nothing() -> None:
    model = build()
    state = {name: torch.zeros_like(t) for name, t in model.trainable_state_dict().items()}
    names = sorted(state)
    missing, wrong_shape = names[0], names[1]
    state.pop(missing)
    state[wrong_shape] = torch.zeros(3, 3)
    state["projector.extra.weight"] = torch.zeros(1)
    before = {name: t.clone() for name, t in model.trainable_state_dict().items()}
    with pytest.raises(TrainableStateError) as error:
        model.load_trainable_state_dict(state)
    message = str(error.value)
    assert f"missing keys: {missing}" in message
    assert "unexpected keys: projector.extra.weight" in message
    assert f"{wrong_shape} (3, 3)" in message
    assert all(torch.equal(before[n], t) for n, t in model.trainable_state_dict().items())  # nothing loaded


def test_same_seed_same_model_other_seed_other_model() -> None:
    a, b, c = build(seed=3).state_dict(), build(seed=3).state_dict(), build(seed=4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretrained_directories_load_through_from_pretrained(pretrained_dirs: dict) -> None:
    model = SegmentationMLLM(ModelConfig(vision_size=V, **pretrained_dirs))
    llm_file = load_file(Path(pretrained_dirs["llm"]) / "model.safetensors")
    vision_file = load_file(Path(pretrained_dirs["vision"]) / "model.safetensors")
    sam_file = torch.load(pretrained_dirs["sam_checkpoint"], weights_only=True)
    base = model.llm.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q_proj, llm_file["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(model.vision.backbone.embeddings.cls_token, vision_file["embeddings.cls_token"])
    sam_patches = model.mask_head.sam.image_encoder.patch_embed.proj.weight
    assert torch.equal(sam_patches, sam_file["image_encoder.patch_embed.proj.weight"])
    assert model.tokenizer.convert_tokens_to_ids("[SEG]") == len(tiny_tokenizer())  # added to the saved vocabulary
    assert torch.isfinite(model(make_batch()).loss)


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"llm": "/nonexistent/llm"}, "--llm"),
        ({"vision": "./no/such/vision"}, "--vision"),
        ({"sam_checkpoint": "/nonexistent/sam.pth"}, "--sam-checkpoint"),
        ({"sam_model": "vit_h"}, "--sam-checkpoint"),  # a random ViT-H is never built silently
    ],
)
def test_a_wrong_model_source_names_its_option(overrides: dict, option: str) -> None:
    with pytest.raises(ModelLoadError, match=option):
        SegmentationMLLM(ModelConfig(vision_size=V, **overrides))


def test_a_sam_checkpoint_of_another_model_type_is_refused(tiny_sam_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="--sam-checkpoint.*vit_b"):
        SegmentationMLLM(ModelConfig(vision_size=V, sam_checkpoint=str(tiny_sam_checkpoint), sam_model="vit_b"))


def test_bf16_autocast_forward_and_backward_on_cpu() -> None:
    model = build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.projector.mlp[0].weight.grad is not None


def test_config_round_trips_through_json_and_data_fields_match_the_model() -> None:
    config = ModelConfig(vision_size=V, projector=ProjectorConfig(kind="pool", pool_tokens=9))
    assert ModelConfig(**json.loads(json.dumps(asdict(config)))) == config
    fields = SegmentationMLLM(config).data_config_fields()
    assert fields == {"vision_size": V, "vision_mean": IMAGENET_MEAN, "vision_std": IMAGENET_STD, "sam_size": S,
                      "sam_channels": C}


def test_describe_counts_trainable_and_total_parameters() -> None:
    model = build()
    text = model.describe()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable {trainable:>13,} / {total:>15,}" in text


def test_losses() -> None:
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2] = 1  # sample 1: empty target
    perfect = (target * 2 - 1) * 50
    assert mask_dice(perfect, target) < 1e-3 and mask_bce(perfect, target) < 1e-3
    assert mask_dice(-perfect, target) > 0.45  # sample 0 all wrong, sample 1's eps keeps it finite
    # per sample, then over the batch: a wrong small sample weighs as much as a right large one
    one_wrong = perfect.clone()
    one_wrong[1] = 50
    assert mask_bce(one_wrong, target) == pytest.approx(50 / 2, rel=1e-3)
    hidden, head = torch.randn(1, 4, 6), torch.nn.Linear(6, 10)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 5]])
    expected = torch.nn.functional.cross_entropy(head(hidden[0, 1:3]), torch.tensor([3, 5]))
    assert torch.allclose(answer_ce(hidden, labels, head), expected)


def test_tiny_vocabulary_covers_the_template_and_every_synthetic_sentence() -> None:
    from pipeline.synth import ALONE, COLOURS, NEXT_TO, RELATIONS, SHAPES, TEXTURES, _Description, _sentence

    tokenizer = tiny_tokenizer()
    next_to = [f"{NEXT_TO} {colour} {shape}" for colour in COLOURS for shape in SHAPES]  # the inside probe's
    sentences = [
        _sentence(_Description(colour, shape, relation), style)
        for colour in (None, *COLOURS)
        for shape in SHAPES
        for relation in (None, *RELATIONS, *TEXTURES, ALONE, *next_to)
        for style in ("short", "long", "no_location")
    ]
    for text in [PROMPT.replace("<image>", "").format(sentence=s) + ANSWER.replace("[SEG]", "") for s in sentences]:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    bos, the, red = tokenizer("the red")["input_ids"]
    assert tokenizer("The RED zebra")["input_ids"] == [bos, the, red, tokenizer.unk_token_id]  # lower-cased; unknown
