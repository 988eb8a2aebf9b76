"""The model: vision encoder, visual projectors, MLLM with token splicing, SAM mask head and losses."""

from trainer.model.mask_head import MaskHead
from trainer.model.mllm import (
    ANSWER,
    LLM_TRAINING,
    PROMPT,
    ModelConfig,
    ModelOutput,
    SegmentationMLLM,
    TrainableStateError,
)
from trainer.model.projectors import PROJECTORS, ProjectorConfig, build_projector
from trainer.model.vision import ModelLoadError, load_vision

__all__ = [
    "ANSWER",
    "LLM_TRAINING",
    "PROJECTORS",
    "PROMPT",
    "MaskHead",
    "ModelLoadError",
    "ModelConfig",
    "ModelOutput",
    "ProjectorConfig",
    "SegmentationMLLM",
    "TrainableStateError",
    "build_projector",
    "load_vision",
]
