"""The segmentation MLLM (DESIGN §1): vision → projector → LLM (+LoRA) → ``[SEG]`` → SAM mask decoder.

Prompt and answer are fixed templates (``PROMPT``, ``ANSWER``), rendered through the LLM's chat
template when its tokenizer has one (``trainer.model.prompt``). ``<image>`` in the prompt is
replaced, at the embedding level, by the sample's *valid* projector tokens only, so every sequence
is [prompt before <image>, visual tokens, prompt after, answer] with no padding inside; sequences
are right-padded to the longest of the batch. Right padding with a causal LLM means no real token
ever attends to a pad, so a sample's outputs do not depend on what it is batched with.

The sentence comes *before* the image. In a causal LLM a visual token's state sees only what
precedes it; with the image first (LLaVA's order) every visual token is encoded blind to the
question, and the one ``[SEG]`` state has to do all the matching. Text first, each visual token
can already tell whether it is what the sentence describes (BENCHMARKS.md has what it gained).

``[SEG]`` is teacher-forced: training and inference feed the same full template, answer included,
and take the last-layer hidden state at the ``[SEG]`` position. There is no free generation: the
task always has exactly one target, so generating "it is [SEG] ." would only add decoding time.

What trains (everything else is frozen): the projector, LoRA on the LLM, the rows of the added
tokens in the input (and untied output) embeddings via peft's ``trainable_token_indices`` (computed
around the frozen layers by ``trainer.model.token_rows``), the ``[SEG]`` →
prompt MLP, the region prompt (``region_prompt``: ``[SEG]`` picks visual tokens, whose image
regions become SAM's mask prompt; see ``trainer.model.region_prompt``) and SAM's mask decoder.
``<image>`` is never embedded (it is spliced out), so its input row receives no gradient; its
output row only learns not to be predicted. It is among the token rows all the same: a resized
embedding draws the added rows at random, so an LLM adapter that left ``<image>``'s rows out would
give other logits on another copy of the base LLM (``trainer.export`` saves the adapter with peft).

``llm_training="full"`` trains the whole LLM instead of LoRA adapters (in float32). LoRA adapts
what a pretrained LLM already knows; a random-initialised LLM (the tiny one of the demo) knows
nothing, and a low-rank update of random frozen weights learns the words of the sentences slowly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from pipeline.attention import sdpa_backend
from pipeline.errors import SvpError
from pipeline.sam_model import SamCheckpointError, build_sam, validate_sam_checkpoint
from pipeline.state_dicts import state_dict_problems
from pipeline.superpixels.base import sam_checkpoint_field, sam_model_field
from pipeline.vision_model import (
    DEFAULT_MODEL_SEED,
    TINY,
    ModelLoadError,
    default_vision_size,
    load_vision,
    pretrained_source,
    vision_field,
    vision_size_field,
)
from trainer.model.losses import IGNORE_INDEX, answer_ce, mask_bce, mask_dice
from trainer.model.mask_head import MaskHead
from trainer.model.projectors import ProjectorConfig, build_projector
from trainer.model.prompt import IMAGE_TOKEN, SEG_TOKEN, PromptFormat
from trainer.model.region_prompt import RegionPrompt
from trainer.model.token_rows import embed_tokens, frozen_layer, token_logits
from trainer.model.tokenizer import tiny_tokenizer

LLM_TRAINING = ("lora", "full")  # ModelConfig.llm_training
# initializer_range 0.3 (not HF's 0.02): with 0.02 a random 2-layer LM attends almost uniformly,
# so the [SEG] state barely depends on the sentence and the mask head learns to ignore the text.
_TINY_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=256, max_position_embeddings=2048, tie_word_embeddings=False,
                 initializer_range=0.3)


# A field with ``identifies_model`` in its metadata tells one model from another: a checkpoint or
# export is only resumed or loaded into a model whose config agrees on every such field
# (``trainer.checkpoint.check_same_model``); the others (loss weights, LoRA alpha, ...) may change.
_IDENTIFIES = {"identifies_model": True}
# ``unrecorded`` in a field's metadata: what a saved config (``run_config.json``, an export's
# ``config.json``) that lacks the key stands for; lacking another identifying key, it is another model's.


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; JSON-serialisable with ``asdict``."""

    llm: str = field(default=TINY, metadata={**_IDENTIFIES, "help": (
        "causal LM: an HF model id or local directory, or 'tiny' (a random tiny Llama with a word-level tokenizer, "
        "for tests and the demo)")})
    vision: str = vision_field(TINY, **_IDENTIFIES)
    vision_size: int | None = vision_size_field(**_IDENTIFIES)
    sam_checkpoint: str | None = sam_checkpoint_field()
    sam_model: str = sam_model_field("tiny", **_IDENTIFIES)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig, metadata=_IDENTIFIES)
    lora_r: int = field(default=8, metadata={**_IDENTIFIES, "help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={**_IDENTIFIES, "help": (
        "comma-separated LLM modules that get LoRA, or all-linear (every linear layer of the decoder but the LM "
        "head, as peft names it)")})
    llm_training: str = field(default="lora", metadata={
        **_IDENTIFIES, "unrecorded": "lora", "choices": LLM_TRAINING, "help": (
        "lora: LoRA adapters on --lora-targets, the LLM frozen (for pretrained LLMs); full: every LLM weight "
        "trains, in float32, no LoRA (for a random-initialised LLM such as tiny, which has nothing for adapters "
        "to adapt)")})
    region_prompt: bool = field(default=True, metadata={**_IDENTIFIES, "unrecorded": False, "help": (
        "[SEG] also scores every visual token, and the tokens' image regions (superpixels, or grid cells for "
        "mlp/pool) painted with those scores become SAM's mask prompt; --no-region-prompt: the [SEG] sparse "
        "prompt alone")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "recompute the LLM's activations in the backward pass (HF gradient checkpointing, non-reentrant): less "
        "activation memory for a second forward pass of the LLM in each step; for long sequences or large "
        "batches on a GPU")})
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the text cross-entropy"})
    bce_weight: float = field(default=2.0, metadata={"help": "weight of the mask BCE"})
    dice_weight: float = field(default=0.5, metadata={"help": "weight of the mask Dice loss"})
    region_weight: float = field(default=1.0, metadata={"help": (
        "weight of the region prompt's BCE against the target mask (with --region-prompt)")})
    seed: int = field(default=DEFAULT_MODEL_SEED, metadata={"same_as": "seed", "help": (
        "seed of the model's random initialisation; svp train's --seed, which also seeds the data order")})

    def __post_init__(self) -> None:
        """Accept the JSON form (a dict projector, a list of targets), so ``ModelConfig(**asdict(c)) == c``."""
        if isinstance(self.projector, dict):
            self.projector = ProjectorConfig(**self.projector)
        self.lora_targets = tuple(self.lora_targets)
        if self.vision_size is None:  # resolved here, so that run configs and exports record the size used
            self.vision_size = default_vision_size(self.vision)
        if self.llm_training not in LLM_TRAINING:
            raise ValueError(f"llm_training must be one of {', '.join(LLM_TRAINING)}, got {self.llm_training!r}")


@dataclass
class ModelOutput:
    loss: torch.Tensor  # the weighted sum, with its graph
    ce_loss: torch.Tensor  # the terms, detached, for logging
    bce_loss: torch.Tensor
    dice_loss: torch.Tensor
    region_loss: torch.Tensor  # 0 without the region prompt
    mask_logits: torch.Tensor  # (B, 1, S/4, S/4), SAM's low-res frame
    num_visual_tokens: torch.Tensor  # (B,) long


class _Forward(NamedTuple):
    """One forward pass, before any loss: what training scores and prediction returns."""

    mask_logits: torch.Tensor  # (B, 1, S/4, S/4)
    hidden: torch.Tensor  # (B, L, D): the LLM's last hidden state (after its final norm)
    labels: torch.Tensor  # (B, L), IGNORE_INDEX but on the answer
    num_tokens: torch.Tensor  # (B,) visual tokens per sample
    region_logits: torch.Tensor | None  # the region prompt's mask logits; None without it


@dataclass
class _Sequences:
    """The spliced LLM input of a batch, right-padded to ``L``."""

    embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L): answer token ids, IGNORE_INDEX elsewhere
    seg_positions: torch.Tensor  # (B,)
    visual_start: torch.Tensor  # (B,): where each sample's visual tokens begin
    shared: int  # leading positions that hold the same text token in every sample


class TrainableStateError(SvpError, ValueError):
    """A trained-weights dict that does not fit this model exactly."""


def tiny_causal_lm(vocab_size: int) -> LlamaForCausalLM:
    """A random 2-layer Llama: the LLM of tests, the demo and CPU benchmarks."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **_TINY_LLM))


def _check_sources(config: ModelConfig) -> None:
    """Fail on a wrong ``--llm`` / ``--vision`` / ``--sam-checkpoint`` before any weights load."""
    for name, option in ((config.llm, "--llm"), (config.vision, "--vision")):
        if name != TINY:
            pretrained_source(name, option)
    if config.sam_checkpoint is None:
        if config.sam_model != "tiny":
            raise ModelLoadError(
                f"--sam-model {config.sam_model} needs --sam-checkpoint (SAM weights are never downloaded)"
            )
        return
    try:
        validate_sam_checkpoint(config.sam_checkpoint, config.sam_model)
    except SamCheckpointError as error:
        raise ModelLoadError(f"--sam-checkpoint: {error}") from error


def _load_llm(name: str) -> tuple[PreTrainedModel, Any]:
    """(causal LM, tokenizer) with ``[SEG]`` and ``<image>`` added and the embeddings grown to fit.

    Pretrained weights keep their stored dtype (``dtype="auto"``): the base is frozen, so a bf16
    checkpoint stays bf16; module boundaries cast (see ``_splice`` and ``forward``). The embedding is
    resized only when the new tokens fall outside it: Qwen's is padded beyond its tokenizer (151,936
    rows for 151,665 tokens), so the new ids already have rows, and shrinking it would drop them.
    """
    if name == TINY:
        tokenizer = tiny_tokenizer()
        model = tiny_causal_lm(len(tokenizer))
    else:
        _, local = pretrained_source(name, "--llm")
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local, dtype="auto")
    tokenizer.add_tokens([SEG_TOKEN, IMAGE_TOKEN], special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def _shared_prefix(texts: list[list[int]], limit: int) -> int:
    """How many leading ids (at most ``limit``: where the first visual token goes) every text has."""
    shared = 0
    for column in zip(*texts):
        if shared == limit or any(token != column[0] for token in column):
            break
        shared += 1
    return shared


def _cache_argument(decoder: nn.Module) -> str:
    """The name of a decoder's KV-cache argument: ``cache`` in recent transformers, which still
    accept the older ``past_key_values`` with a deprecation warning."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _add_lora(model: PreTrainedModel, config: ModelConfig, token_ids: list[int]) -> nn.Module:
    """LoRA on ``lora_targets``; the embedding rows of ``token_ids`` (and their untied output rows) train too.

    peft ties the output rows itself when the embeddings are tied; an untied ``lm_head`` is named
    explicitly, else the CE target ``[SEG]`` would keep its random resize-time row forever.
    """
    rows = {_module_name(model, model.get_input_embeddings()): token_ids}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        rows[_module_name(model, output)] = token_ids
    # peft's "all-linear": every linear layer of the decoder, the output layer excepted.
    targets = "all-linear" if config.lora_targets == ("all-linear",) else list(config.lora_targets)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, trainable_token_indices=rows, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class SegmentationMLLM(nn.Module):
    """Batch → (losses, SAM low-res mask logits); see the module docstring for what trains."""

    # The fewest positions that sharing the prompt's opening must save for a training step to run it
    # once (``_decode``). On the 2-core CPU at batch 8: 7 × 5 saved (the bench tokenizer's opening)
    # made the 85M LLM's fp32 step 1.01-1.10× the batch run whole (``bench.train_step``, two runs),
    # 7 × 18 (Qwen2.5's chat template) made Qwen2.5-0.5B's bf16 step 0.875× (``bench.realsize``). An
    # attribute, so that a benchmark can time a step both ways.
    min_shared_positions: int = 64

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_sources(config)
        self.config = config
        with torch.random.fork_rng():  # same seed, same random parts; the caller's RNG is untouched
            torch.manual_seed(config.seed)
            # first: a tiny encoder is then, at the default seed, the precompute job's (standalone_encoder)
            self.vision, vision_dim, _ = load_vision(config.vision, config.vision_size)
            llm, self.tokenizer = _load_llm(config.llm)
            self.seg_id = self.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
            self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            llm_dim = llm.get_input_embeddings().embedding_dim
            if config.gradient_checkpointing:  # non-reentrant: no need for inputs that require grad
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.llm = (_add_lora(llm, config, [self.seg_id, self.image_id]) if config.llm_training == "lora"
                        else llm.float())
            self.projector = build_projector(config.projector, vision_dim, llm_dim)
            self.mask_head = MaskHead(build_sam(config.sam_model, config.sam_checkpoint))
            self.seg_mlp = nn.Sequential(nn.Linear(llm_dim, llm_dim), nn.ReLU(),
                                         nn.Linear(llm_dim, self.mask_head.prompt_dim))
            self.region_prompt = RegionPrompt(llm_dim) if config.region_prompt else None
        self.prompt_format = PromptFormat(self.tokenizer)
        self._vision_identity: dict[str, Any] | None = None
        self.answer_ids = self.prompt_format.answer_ids
        eos = self.tokenizer.eos_token_id
        self.seg_offset = self.answer_ids.index(self.seg_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos if eos is not None else 0)  # a filler, always masked

    @property
    def device(self) -> torch.device:
        return self.seg_mlp[0].weight.device

    # ----------------------------------------------------------------------------------- forward

    def forward(self, batch: dict[str, Any]) -> ModelOutput:
        """Losses and low-res mask logits of a collated batch (see ``trainer.data``)."""
        run = self._run(batch)
        head = functools.partial(token_logits, self.causal_lm().get_output_embeddings())
        ce = answer_ce(run.hidden, run.labels, head)
        targets = batch["gt_masks"].to(self.device)[:, None]
        bce, dice = mask_bce(run.mask_logits, targets), mask_dice(run.mask_logits, targets)
        region = mask_bce(run.region_logits, targets) if run.region_logits is not None else bce.new_zeros(())
        config = self.config
        loss = (config.ce_weight * ce + config.bce_weight * bce + config.dice_weight * dice
                + config.region_weight * region)
        return ModelOutput(loss, ce.detach(), bce.detach(), dice.detach(), region.detach(), run.mask_logits,
                           run.num_tokens)

    @torch.inference_mode()
    def predict_masks(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(low-res mask logits (B, 1, S/4, S/4), visual tokens per sample) without targets or losses."""
        run = self._run(batch)
        return run.mask_logits, run.num_tokens

    def _run(self, batch: dict[str, Any]) -> _Forward:
        device = self.device
        if "vision_features" in batch:  # stored by precompute from this very encoder (trainer.stored_features)
            features, grid = batch["vision_features"].to(device), self.vision.grid(self.config.vision_size)
        else:
            features, grid = self.vision(batch["pixel_values"].to(device))
        tokens, valid = self.projector(
            features.to(self.seg_mlp[0].weight.dtype), grid,
            batch["superpixels"].to(device), batch["num_superpixels"].to(device),
        )
        sequences = self._splice(batch["sentences"], tokens, valid)
        hidden = self._decode(sequences)
        dtype = self.seg_mlp[0].weight.dtype  # only the rows read below are cast, not the whole sequence
        rows = torch.arange(len(tokens), device=device)
        seg_hidden = hidden[rows, sequences.seg_positions].to(dtype)
        prompts = self.seg_mlp(seg_hidden)[:, None]
        mask_prompt = None
        if self.region_prompt is not None:
            at = sequences.visual_start[:, None] + torch.arange(tokens.shape[1], device=device)
            visual_hidden = hidden[rows[:, None], at.clamp_max(hidden.shape[1] - 1)].to(dtype)
            regions = self.projector.regions(grid, batch["superpixels"].to(device))
            mask_prompt = self.region_prompt(seg_hidden, visual_hidden, regions, batch["input_sizes"],
                                             self.mask_head.image_size, self.mask_head.mask_prompt_size)
        if "sam_embeddings" in batch:
            embeddings = batch["sam_embeddings"].to(device)
        else:
            embeddings = self.mask_head.image_embeddings(batch["sam_pixels"].to(device))
        masks = self.mask_head(embeddings, prompts, mask_prompt)
        return _Forward(masks, hidden, sequences.labels, valid.sum(1), mask_prompt)

    def causal_lm(self) -> PreTrainedModel:
        """The HF causal LM, LoRA layers included: its decoder body (``get_decoder``) and LM head
        (``get_output_embeddings``, with the trained ``[SEG]`` row) are called apart, so that the head
        runs on the labelled rows only (``answer_ce``), not on every position of the sequence."""
        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    def _decode(self, sequences: _Sequences) -> torch.Tensor:
        """The LLM's last hidden state (B, L, D) of the spliced sequences; their shared prefix runs once.

        Every sequence opens with the same tokens (the chat template's system turn, the user turn's
        opening, the prompt up to the sentence: 17 of ~52 tokens for svp on Qwen2.5). In a causal LLM
        their states depend on nothing after them, so they are the same in every sample: the prefix
        runs as one sequence, its keys and values (HF's KV cache, with their graph) are repeated for
        the batch, and the rest of each sequence attends to them: the states and gradients of the
        whole batch run in full (to float rounding), for 1/B of the prefix's compute. LoRA dropout then draws one mask
        for the prefix's positions instead of one per sample.

        Only where it pays: the prefix is a second call of the LLM, which reads every weight once more
        and pays each layer's call overhead again, for ``(B - 1) · shared`` positions not computed.
        :attr:`min_shared_positions` is where that turns (``bench.train_step`` and ``bench.realsize``
        time the svp step both ways at each size).

        Only where autograd is on (training). Without it (eval, predict) the batch runs whole, and an
        eval gives the same table on one process as on several (``tests/test_multi_dataset.py``): how
        many positions are shared depends on the batch's sentences, so sharing would move a sample's
        outputs with its batch by float rounding.

        The attention kernel is ``pipeline.attention.sdpa_backend``'s choice. Neither with gradient
        checkpointing: HF drops the cache of a checkpointed layer (the rest would not see the prefix),
        and the backward recomputes the layers outside any kernel choice made here.
        """
        decoder = self.causal_lm().get_decoder()
        embeds, mask = sequences.embeds, sequences.attention_mask
        samples, length = mask.shape
        positions, shared = self._positions(mask), sequences.shared
        checkpointed = self.config.gradient_checkpointing
        with contextlib.nullcontext() if checkpointed else sdpa_backend(length, length, embeds.device):
            saved = (samples - 1) * shared
            if checkpointed or saved == 0 or saved < self.min_shared_positions or not torch.is_grad_enabled():
                return decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state
            keys_values = DynamicCache(config=decoder.config)
            cache = {_cache_argument(decoder): keys_values}  # the argument's name, looked up once
            prefix = decoder(inputs_embeds=embeds[:1, :shared], position_ids=positions[:1, :shared], use_cache=True,
                             **cache).last_hidden_state
            keys_values.batch_repeat_interleave(samples)
            rest = decoder(inputs_embeds=embeds[:, shared:], attention_mask=mask, position_ids=positions[:, shared:],
                           use_cache=True, **cache).last_hidden_state
        return torch.cat((prefix.expand(samples, -1, -1), rest), 1)

    @staticmethod
    def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """0, 1, ... along each unpadded sequence (right padding: the same for every row)."""
        return torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)

    def _tokenize(self, sentences: list[str]) -> tuple[list[list[int]], list[int]]:
        """Per sample: the text ids with ``<image>`` removed, and where ``<image>`` stood."""
        texts, image_at = [], []
        prompts = self.prompt_format.prompt_ids(sentences)
        for sentence, ids in zip(sentences, prompts):
            if ids.count(self.image_id) != 1 or self.seg_id in ids:
                raise ValueError(f"the sentence {sentence!r} contains {IMAGE_TOKEN} or {SEG_TOKEN}")
            at = ids.index(self.image_id)
            texts.append(ids[:at] + ids[at + 1 :] + self.answer_ids)
            image_at.append(at)
        return texts, image_at

    def _splice(self, sentences: list[str], tokens: torch.Tensor, valid: torch.Tensor) -> _Sequences:
        """[prompt before <image>, valid visual tokens, prompt after, answer], right-padded.

        Vectorised: boolean masks say where text and visual tokens go; text ids and (right-padded)
        visual tokens are poured into them in row-major order, which keeps each sample's order.
        """
        device = tokens.device
        texts, image_at = self._tokenize(sentences)
        text_ids = pad_sequence([torch.tensor(t) for t in texts], batch_first=True, padding_value=self.pad_id)
        text_ids = text_ids.to(device)
        text_lengths = torch.tensor([len(t) for t in texts], device=device)
        image_at = torch.tensor(image_at, device=device)
        num_visual = valid.sum(1)
        lengths = text_lengths + num_visual
        position = torch.arange(int(lengths.max()), device=device)[None]
        is_visual = (position >= image_at[:, None]) & (position < (image_at + num_visual)[:, None])
        in_sequence = position < lengths[:, None]
        is_text = in_sequence & ~is_visual
        ids = torch.full(is_text.shape, self.pad_id, device=device)
        ids[is_text] = text_ids[torch.arange(text_ids.shape[1], device=device)[None] < text_lengths[:, None]]
        embedding = self.llm.get_input_embeddings()
        embeds = embed_tokens(embedding, ids).masked_scatter(is_visual[..., None],
                                                             tokens[valid].to(frozen_layer(embedding).weight.dtype))
        answer_start = lengths - len(self.answer_ids)
        labels = torch.where(in_sequence & (position >= answer_start[:, None]), ids, IGNORE_INDEX)
        return _Sequences(embeds, in_sequence.long(), labels, answer_start + self.seg_offset, image_at,
                          _shared_prefix(texts, int(image_at.min())))

    # ------------------------------------------------------------------------------ bookkeeping

    def data_config_fields(self) -> dict[str, Any]:
        """What ``trainer.data.DataConfig`` must match: the input sizes and the vision normalisation."""
        return {
            "vision_size": self.config.vision_size,
            "vision_mean": tuple(self.vision.mean),
            "vision_std": tuple(self.vision.std),
            "sam_size": self.mask_head.image_size,
            "sam_channels": self.mask_head.prompt_dim,
        }

    def vision_identity(self) -> dict[str, Any]:
        """What identifies the vision encoder's features (``VisionEncoder.identity``): computed once,
        as it hashes the encoder's weights."""
        if self._vision_identity is None:
            self._vision_identity = self.vision.identity(self.config.vision, self.config.vision_size)
        return self._vision_identity

    def num_patches(self) -> int:
        """Patch tokens per image of the vision encoder: what the ``mlp`` projector hands the LLM."""
        side = self.config.vision_size // self.vision.patch_size
        return side * side

    def trainable_state_dict(self, include_llm: bool = True) -> dict[str, torch.Tensor]:
        """Exactly the trained tensors, by their module path (stable for a given ``ModelConfig``);
        ``include_llm=False``: those outside the LLM, which an export keeps apart from the LLM's
        (``trainer.export``: the LLM's go where transformers and peft read them)."""
        return {name: param.detach() for name, param in self.named_parameters()
                if param.requires_grad and (include_llm or not name.startswith("llm."))}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], include_llm: bool = True) -> None:
        """Strict: every trained tensor (outside the LLM with ``include_llm=False``), nothing else, each
        of the right shape; else nothing loads."""
        expected = self.trainable_state_dict(include_llm)
        problems = state_dict_problems(state, expected)
        if problems:
            raise TrainableStateError("trained weights do not fit this model: " + "; ".join(problems))
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state[name])

    def describe(self) -> str:
        """One line per part: trainable / total parameters (what a run prints at start)."""
        parts = {"vision": self.vision, "projector": self.projector, "llm": self.llm, "seg_mlp": self.seg_mlp,
                 "region_prompt": self.region_prompt, "mask_head": self.mask_head}
        lines = [f"SegmentationMLLM llm={self.config.llm} vision={self.config.vision} "
                 f"projector={self.config.projector.kind} sam={self.config.sam_model}"]
        for name, module in [*((n, m) for n, m in parts.items() if m is not None), ("total", self)]:
            total = sum(p.numel() for p in module.parameters())
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            share = 100 * trainable / max(total, 1)
            lines.append(f"  {name:<13} trainable {trainable:>13,} / {total:>15,} ({share:.2f}%)")
        return "\n".join(lines)

