"""Superpixel backends by name: the registry every job's ``--backend`` chooses from.

``sam`` is the method (SAM automatic masks → partition); ``felzenszwalb`` and ``slic`` are
classical CPU-only backends for machines without SAM weights, the demo and the tests. Each name
maps to its builder (:data:`pipeline.superpixels.base.Builder`); :class:`pipeline.superpixels.spec.BackendSpec`
names one, checks its options and builds it on each worker. Adding a backend is one entry here.
"""

from pipeline.superpixels import classical, sam
from pipeline.superpixels.base import Builder

BACKENDS: dict[str, Builder] = {
    "sam": sam.build,
    **{name: classical.builder(name) for name in classical.CLASSICAL_PARAMS},
}

__all__ = ["BACKENDS"]
