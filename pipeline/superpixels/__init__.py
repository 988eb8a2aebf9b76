"""Superpixel backends behind one small interface (:class:`SuperpixelBackend`).

``sam`` is the method (SAM automatic masks → partition); ``felzenszwalb`` and ``slic`` are
classical CPU-only backends for machines without SAM weights, the demo and the tests.
"""

from pipeline.superpixels.base import BackendSpec, SamOptions, SuperpixelBackend, SuperpixelResult

__all__ = ["BackendSpec", "SamOptions", "SuperpixelBackend", "SuperpixelResult"]
