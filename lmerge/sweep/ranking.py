"""Max-min ranking: a point is as good as its worst task's interference delta; ties go to the
better average delta."""

from __future__ import annotations

from typing import Any

from lmerge.errors import ConfigError
from lmerge.evaluation.evaluate import Evaluation


def point_scores(evaluation: Evaluation) -> tuple[float, float]:
    """``(score, average_delta)`` of one evaluated point: the minimum and the mean interference
    delta over the evaluated tasks."""
    aggregate = evaluation.aggregate
    if aggregate["min_delta"] is None:
        raise ConfigError("eval_tasks: a sweep needs each task's own adapter in the catalog to compute deltas")
    return aggregate["min_delta"], aggregate["average_delta"]


def rank_key(point: dict[str, Any]) -> tuple[float, float]:
    """Sort key of a point record: higher is better."""
    return point["score"], point["average_delta"]


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the highest score, ties broken by the average delta (the earlier point
    wins a full tie)."""
    best = None
    for point in points:
        if best is None or rank_key(point) > rank_key(best):
            best = point
    return best
