"""Partition invariants of the classical backends on awkward images (SAM's are in test_sam_backend.py)."""

import numpy as np
import pytest

from pipeline.partition import PartitionConfig
from pipeline.superpixels.spec import BackendSpec


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    large = np.full((2000, 3000, 3), 180, np.uint8)
    large[400:1600, 300:1200] = [200, 30, 30]
    gray = np.repeat(rng.integers(0, 256, (90, 70, 1), dtype=np.uint8), 3, axis=2)
    return {"noisy": noisy, "tiny-17x11": noisy[:11, :17], "uniform": np.full((64, 64, 3), 7, np.uint8),
            "large-3000x2000": large, "grayscale": gray}


@pytest.mark.parametrize("backend", ["felzenszwalb", "slic"])
@pytest.mark.parametrize("config", [PartitionConfig(), PartitionConfig(min_area=400, max_regions=6)],
                         ids=["defaults", "strict"])
def test_classical_partitions_meet_the_invariants(backend, config):
    segment = BackendSpec(backend, config).build()
    images = _images()
    for name, result in zip(images, segment(list(images.values()))):
        labels, image = result.labels, images[name]
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint16, name
        areas = np.bincount(labels.ravel())
        assert areas.min() > 0, f"{name}: labels are not contiguous"
        assert len(areas) <= config.max_regions, name
        if labels.size >= config.min_area:
            assert areas.min() >= config.min_area, name
        else:
            assert len(areas) == 1, name
