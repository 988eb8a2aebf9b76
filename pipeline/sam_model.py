"""SAM itself, for both halves: building it, checking a checkpoint against it, and loading one.

The precompute job's SAM backend and the trainer's mask head load SAM through this one path, so a
checkpoint that works in one works in the other, and both refuse a bad one with the same message.
A checkpoint is data, never code (``weights_only=True``), and is loaded strictly.

``tiny`` is SAM's architecture at toy sizes: every module of SAM (ViT image encoder with a neck,
prompt encoder, two-way-transformer mask decoder, SAM's 256-wide IoU head), with a 2-block,
32-wide encoder on a 512 px frame and a 64-wide prompt encoder and decoder, so its embedding is
64×32×32 instead of 256×64×64. The decoder is what a training step spends most of its time in,
and the tiny one costs a small fraction of SAM's, which is what lets the demo train on a CPU. It
exists for tests, the demo and CPU benchmarks, where the real ViT-H weights (2.5 GB, never
downloaded by us) are not at hand. Random, its masks mean nothing; ``svp tiny-sam --pretrain-on``
teaches it clicks → masks first (``trainer.sam_pretraining``).

``small`` is the other half of that trade: SAM's real prompt encoder, mask decoder (256 wide, 8
heads, 2048-wide MLP) and 1024 px frame with a 256×64×64 embedding, which every released SAM
(ViT-B/L/H) shares, on a 2-block, 64-wide encoder of windowed attention with SAM's neck. Its automatic masks cost what a
real SAM's cost after the encoder (the 32×32 grid's 1024 prompts through the real decoder), so the
mask generator is measured at the sizes users run, on a CPU, without the real encoder's weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from pipeline.errors import SvpError
from pipeline.state_dicts import state_dict_problems

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "small", "tiny")
TOY_SAM_MODEL_TYPES = ("tiny", "small")  # built here, never released: ``svp tiny-sam`` makes their checkpoints
# segment_anything's Sam.pixel_mean / pixel_std (0-255 RGB): what every SAM, tiny included, normalises by.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_MASK_STRIDE = 4  # SAM's mask decoder predicts masks at a quarter of its input frame


class SamCheckpointError(SvpError, ValueError):
    """The SAM checkpoint is missing, unreadable, or does not match ``--sam-model``."""


def _architecture(model_type: str) -> Sam:
    """SAM with random weights; under ``torch.device("meta")`` it allocates nothing."""
    if model_type not in SAM_MODEL_TYPES:
        raise SamCheckpointError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_MODEL_TYPES)}")
    if model_type == "tiny":
        return _tiny_architecture()
    if model_type == "small":
        return _tiny_architecture(image_size=1024, width=256, encoder_width=64, decoder_heads=8, decoder_mlp=2048,
                                  global_attention=())
    return sam_model_registry[model_type](checkpoint=None)


def _tiny_architecture(image_size: int = 512, width: int = 64, encoder_width: int = 32, decoder_heads: int = 4,
                       decoder_mlp: int | None = None, global_attention: tuple[int, ...] = (1,)) -> Sam:
    """SAM's modules wired as ``segment_anything.build_sam._build_sam`` wires them, with a 2-block
    encoder ``encoder_width`` wide, a ``width``-wide neck, prompt encoder and mask decoder, on an
    ``image_size`` frame (SAM's: 256 and 1024)."""
    grid = image_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=encoder_width, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=global_attention, window_size=14, out_chans=width,
        ),
        prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=decoder_mlp or 4 * width,
                                          num_heads=decoder_heads),
            transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def _load_state_dict(path: str | Path, model_type: str) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint memory-mapped (nothing is copied until used) and refuse what is not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {str(path)!r} (--sam-model {model_type}) does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for "this is not a torch file"
        raise SamCheckpointError(
            f"SAM checkpoint {str(path)!r} is not a torch state dict saved with torch.save: {error}"
        ) from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamCheckpointError(
            f"SAM checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors"
        )
    return state


def _check_matches(state: Mapping[str, torch.Tensor], model: Sam, path: str | Path, model_type: str) -> None:
    """Say which keys are wrong (a vit_b file given as vit_h, ...) rather than load half a model."""
    problems = state_dict_problems(state, model.state_dict())
    if problems:
        raise SamCheckpointError(
            f"SAM checkpoint {str(path)!r} does not match --sam-model {model_type}: " + "; ".join(problems)
        )


def validate_sam_checkpoint(path: str | Path, model_type: str) -> None:
    """Fail fast on the driver: the file exists, is a state dict and fits ``model_type``.

    Cheap on purpose (it runs before any work): the model is built on the ``meta`` device and the
    checkpoint is memory-mapped, so only names and shapes are read.
    """
    with torch.device("meta"):
        model = _architecture(model_type)
    _check_matches(_load_state_dict(path, model_type), model, path, model_type)


def build_sam(model_type: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
              image_encoder: ImageEncoderViT | None = None) -> Sam:
    """SAM of ``model_type`` in eval mode on ``device``; random weights when ``checkpoint`` is None.

    Weights are loaded with ``weights_only=True`` (a checkpoint is data, never code) and strictly.

    ``image_encoder``: an encoder already in memory that holds this checkpoint's encoder weights (the
    caller has made sure, by the checkpoint's content): it becomes this SAM's encoder as it is, not
    a copy, and only the prompt encoder and mask decoder are read from ``checkpoint``. ``svp predict``
    gives its superpixel generator the mask head's encoder this way, so one SAM encoder (ViT-H: 2.5 GB)
    is held and run per image, not two; the rest is built on the ``meta`` device first, so the
    encoder it replaces is never allocated.
    """
    if image_encoder is None:
        model = _architecture(model_type)
        if checkpoint is not None:
            state = _load_state_dict(checkpoint, model_type)
            _check_matches(state, model, checkpoint, model_type)
            model.load_state_dict(state, strict=True)
        return model.eval().to(device)
    if checkpoint is None:
        raise ValueError("a SAM sharing an image encoder needs the checkpoint its prompt encoder and decoder come from")
    with torch.device("meta"):
        model = _architecture(model_type)
    state = _load_state_dict(checkpoint, model_type)
    _check_matches(state, model, checkpoint, model_type)
    model.image_encoder = image_encoder
    for part in ("prompt_encoder", "mask_decoder"):
        prefix = f"{part}."
        getattr(model, part).load_state_dict(
            {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)},
            strict=True, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:  # a tensor that no checkpoint entry filled: segment_anything's Sam gained one
        raise ValueError(f"SAM {model_type} built around a given image encoder lacks {', '.join(left)}")
    return model.eval().to(device)


def save_tiny_sam(path: str | Path, seed: int = 0, model_type: str = "tiny") -> Path:
    """Write a random-initialised ``tiny`` (or ``small``) SAM state dict: the stand-in checkpoint for
    tests, the demo and benchmarks, where no official one is at hand."""
    if model_type not in TOY_SAM_MODEL_TYPES:
        raise ValueError(f"only {' and '.join(TOY_SAM_MODEL_TYPES)} SAMs are made here, not {model_type!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_sam(model_type)
    return save_state_dict(model.state_dict(), path)


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """``torch.save`` a SAM state dict to ``path``, opened here rather than by torch: a path that
    cannot be written is then an ``OSError`` that names it (torch's own writer raises a bare
    ``RuntimeError``), which a command can tell its user about."""
    path = Path(path)
    with open(path, "wb") as stream:
        torch.save(state, stream)
    return path
