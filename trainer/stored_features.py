"""What a model reads from the shards instead of running a frozen encoder itself: SAM's image
embedding (``sam.npy``) and the vision encoder's patch features (``vision.npy``).

Each is read only when the manifest says it came from the model's very encoder. A feature of
another encoder may well have the right shape and the wrong meaning: the model would train on it
without complaint, so a mismatch is warned about and the encoder runs instead.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.hashing import file_sha256
from pipeline.vision_model import same_encoder
from trainer.data import DataConfig
from trainer.model import ModelConfig, SegmentationMLLM

log = logging.getLogger(__name__)


def sam_embeddings_match(shards: dict, model: ModelConfig) -> bool:
    """Whether the shards' ``sam.npy`` came from the SAM checkpoint this model decodes with (the
    manifest records its sha256). ``shards``: a manifest, or the run record of one (``describe_shards``)."""
    stored = shards.get("config", {}).get("sam", {}).get("checkpoint_sha256")
    if not stored or not shards.get("config", {}).get("store_sam_embeddings"):
        return False
    if model.sam_checkpoint is None or file_sha256(model.sam_checkpoint) != stored:
        log.warning("the shards' sam.npy come from another SAM checkpoint than --sam-checkpoint: "
                    "ignoring them and running the SAM encoder at every step")
        return False
    return True


def vision_features_match(shards: dict, model: SegmentationMLLM) -> bool:
    """Whether the shards' ``vision.npy`` came from this model's vision encoder: the same weights (by
    content), input size and normalisation, as the manifest records them."""
    stored = shards.get("config", {}).get("vision")
    if not stored:
        return False
    if not same_encoder(stored, model.vision_identity()):
        log.warning("the shards' vision.npy come from another vision encoder (%s at %s px) than --vision %s at %s "
                    "px, or from other weights: ignoring them and running the encoder at every step",
                    stored.get("model"), stored.get("size"), model.config.vision, model.config.vision_size)
        return False
    return True


def data_config(model: SegmentationMLLM, shards: dict, **fields: Any) -> DataConfig:
    """How to read ``shards`` into ``model``: its input geometry and normalisation, and the stored
    features that are its own encoders' (``fields``: the rest of :class:`DataConfig`)."""
    features = model.vision.features_shape(model.config.vision_size) if vision_features_match(shards, model) else None
    return DataConfig(**model.data_config_fields(), use_sam_embeddings=sam_embeddings_match(shards, model.config),
                      vision_features_shape=features, **fields)
