"""The model: vision encoder, visual projectors, MLLM with token splicing, SAM mask head and losses."""

from pipeline.vision_model import ModelLoadError, load_vision
from trainer.model.mask_head import MaskHead
from trainer.model.mllm import (
    LLM_TRAINING,
    ModelConfig,
    ModelOutput,
    SegmentationMLLM,
    TrainableStateError,
)
from trainer.model.projectors import PROJECTORS, ProjectorConfig, build_projector
from trainer.model.prompt import ANSWER, PROMPT

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
