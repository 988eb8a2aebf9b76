"""trainer.evaluate's split metrics from per-sample records."""

from __future__ import annotations

import pytest

from trainer.evaluate import summarise


def _record(key: str, intersection: int, union: int, **extra: int) -> dict:
    return {"key": key, "intersection": intersection, "union": union, "target": 10, "pixels": 100, "tokens": 5,
            **extra}


def test_ciou_giou_and_the_floor() -> None:
    split = summarise([_record("a", 5, 10), _record("b", 10, 30)], seconds=1.0)
    assert split["ciou"] == pytest.approx(15 / 40) and split["giou"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert split["all_foreground_ciou"] == pytest.approx(0.1) and split["images"] == 2
    assert "referred_share" not in split  # the records do not count the other objects


def test_referred_share_is_the_share_of_object_pixels_on_the_one_meant() -> None:
    # One sample marks both of two equal twins (8 pixels on each), one only the right object.
    both, right = _record("a", 8, 20, on_other_objects=8), _record("b", 6, 8, on_other_objects=0)
    assert summarise([both], seconds=1.0)["referred_share"] == pytest.approx(0.5)
    assert summarise([right], seconds=1.0)["referred_share"] == 1.0
    assert summarise([both, right], seconds=1.0)["referred_share"] == pytest.approx(14 / 22)
    wrong = _record("c", 0, 18, on_other_objects=8)  # only the other twin: no pixel on the one meant
    assert summarise([wrong], seconds=1.0)["referred_share"] == 0.0
    assert summarise([_record("d", 0, 10, on_other_objects=0)], seconds=1.0)["referred_share"] is None
