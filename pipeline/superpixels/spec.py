"""The spec that names a superpixel backend: what a job checks, hashes into its config, and ships to workers.

A :class:`BackendSpec` is small, picklable and checked on the driver *before* any work starts
(missing or mismatched SAM checkpoint, unknown backend); each Ray worker then calls
:meth:`BackendSpec.build` once to hold one model for all the shards it processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.partition import PartitionConfig
from pipeline.sam_model import SamCheckpointError, validate_sam_checkpoint
from pipeline.superpixels import BACKENDS
from pipeline.superpixels.base import BackendConfigError, SamOptions, SuperpixelBackend
from pipeline.superpixels.classical import CLASSICAL_PARAMS
from pipeline.superpixels.sam_embeddings import WithSamEmbeddings
from pipeline.superpixels.vision_features import WithVisionFeatures
from pipeline.timing import StageTimer
from pipeline.vision_model import ModelLoadError, VisionOptions, vision_identity


@dataclass(frozen=True)
class BackendSpec:
    """Which backend, with which settings; what the shard config hash is computed from. ``vision``:
    the encoder whose patch features are stored beside the superpixels, if any."""

    name: str
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sam: SamOptions | None = None
    vision: VisionOptions | None = None

    def validate(self) -> None:
        """Refuse, with a message naming the option, anything that would fail on every worker."""
        if self.name not in BACKENDS:
            raise BackendConfigError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")
        if self.name == "sam" and (self.sam is None or not self.sam.sam_checkpoint):
            raise BackendConfigError(
                "--backend sam needs --sam-checkpoint PATH (an official SAM .pth such as "
                "sam_vit_h_4b8939.pth); weights are never downloaded. For CPU-only runs use "
                "--backend felzenszwalb or --backend slic."
            )
        if self.stores_sam_embeddings and not self.sam.sam_checkpoint:
            raise BackendConfigError(
                "--store-sam-embeddings needs --sam-checkpoint: the embedding comes from SAM's image encoder"
            )
        if self.uses_sam:
            try:
                validate_sam_checkpoint(self.sam.sam_checkpoint, self.sam.sam_model)
            except SamCheckpointError as error:  # a SAM option of this backend: a config error like the rest
                raise BackendConfigError(str(error)) from error
        if self.vision is not None:
            try:
                self.vision.validate()
            except ModelLoadError as error:
                raise BackendConfigError(str(error)) from error

    def config(self) -> dict:
        """Everything that changes the output bytes (the checkpoint by content, not by path)."""
        config: dict = {"backend": self.name, "partition": self.partition.as_dict()}
        if self.uses_sam:
            config["sam"] = self.sam.record()
        if self.name != "sam":
            config["params"] = CLASSICAL_PARAMS[self.name]
        if self.vision is not None:  # absent otherwise: an output without features keeps its config hash
            config["vision"] = vision_identity(self.vision.vision, self.vision.resolved_size())
        return config

    @property
    def stores_sam_embeddings(self) -> bool:
        return self.sam is not None and self.sam.store_sam_embeddings

    @property
    def uses_sam(self) -> bool:
        """Whether SAM runs at all: as the backend, or for the embeddings stored beside another one."""
        return self.name == "sam" or self.stores_sam_embeddings

    def build(self, device: str = "cpu", timer: StageTimer | None = None) -> SuperpixelBackend:
        """Instantiate the backend on ``device`` (called once per worker), timing its stages on ``timer``.

        SAM's own pass yields its embeddings; any other backend gets SAM's encoder beside it when
        embeddings are to be stored. The vision encoder, when its features are stored, runs beside either.
        """
        backend = BACKENDS[self.name](self.partition, self.sam, device, timer)
        if self.stores_sam_embeddings and self.name != "sam":
            backend = WithSamEmbeddings(backend, self.sam, device=device)
        if self.vision is not None:
            backend = WithVisionFeatures(backend, self.vision, device=device)
        return backend
