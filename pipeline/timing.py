"""Wall-clock seconds per named stage of a unit of work: where a worker's time went.

A worker holds one :class:`StageTimer`, shared with its superpixel backend, so that the stages
inside a backend (segmenting, partition clean-up, SAM embeddings) are told apart from decoding
and writing without the backend returning timings through its results. Times are taken on the
host; a GPU stage is charged when its results reach the host, which is where they are waited for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_DONE = object()

# The stages of a shard, in the order its images go through them (how reports list them).
STAGES = ("decode", "superpixels", "partition", "embeddings", "write")


class StageTimer:
    """Accumulates seconds per stage until :meth:`take` hands them over and starts again."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Charge the time spent in the ``with`` block to ``name`` (even if it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """Charge ``seconds`` measured elsewhere (a forward hook's) to ``name``."""
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def timed(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, charging to ``name`` only the time spent producing each one.

        For lazy pipelines (a generator that runs the SAM encoder batch by batch): the work
        happens inside ``next``, interleaved with whatever the consumer does with each item.
        """
        iterator = iter(items)
        while True:
            with self.stage(name):
                item = next(iterator, _DONE)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]

    def take(self) -> dict[str, float]:
        """The seconds per stage so far; the timer starts again from zero."""
        seconds, self._seconds = self._seconds, {}
        return seconds


def throughput(images: int, seconds: float) -> str:
    """How fast ``images`` went through in ``seconds``, for a person to read: images per second to
    three significant digits, or seconds per image when under one a second (a slow backend on a
    CPU), so that a slow run never reads as "0.0 images/s"."""
    if images <= 0 or seconds <= 0:
        return "no images processed"
    per_second = images / seconds
    if per_second >= 1:
        return f"{_three_digits(per_second)} images/s"
    return f"{_three_digits(seconds / images)} s/image"


def _three_digits(value: float) -> str:
    """Three significant digits, without an exponent for the large values (``1234`` → ``1234``)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"
