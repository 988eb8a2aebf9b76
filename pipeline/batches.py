"""Work done a batch at a time, where one bad item must fail alone rather than take its batch with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def one_by_one(work: Callable[[list[T]], list[R]], items: list[T]) -> list[R | Exception]:
    """``work(items)``; where that raises, ``work([item])`` for each item, the item's exception in place
    of its result, so that one bad item fails alone rather than the batch it came in."""
    if not items:
        return []
    try:
        return list(work(items))
    except Exception as exc:  # noqa: BLE001 - any error of one input is that input's failure record
        if len(items) == 1:
            return [exc]
    results: list[R | Exception] = []
    for item in items:
        try:
            results += work([item])
        except Exception as exc:  # noqa: BLE001 - as above
            results.append(exc)
    return results
