"""What the benchmarks' options take from svp's commands, in a module light to import: bench.large_image
measures its own process's peak memory, which a module it does not need (transformers, through
bench.common) would add a hundred MiB to."""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any

# SAM's thresholds for a SAM with random weights, whose masks SAM's own (0.88, 0.95) would all drop.
RANDOM_WEIGHT_THRESHOLDS = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.6, "stability_score_offset": 0.01}


def option_of(config: type, name: str, default: Any) -> Any:
    """The field ``name`` of a command's ``config`` (its help and choices) with a benchmark's own
    ``default``: the flag means what the command's does, and its help is written once, where the
    command declares it; only the size differs (``--points-per-side 8`` on 2 CPU cores, not SAM's 32)."""
    (source,) = (f for f in fields(config) if f.name == name)
    return field(default=default, metadata=source.metadata)
