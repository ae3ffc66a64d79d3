"""Max-min ranking: a point is as good as its worst task's interference delta; ties go to the
better average delta."""

from __future__ import annotations

from typing import Any

from lmerge.errors import ConfigError
from lmerge.evaluation.evaluate import Evaluation


def point_scores(evaluation: Evaluation, rank_by: str = "all") -> tuple[float, float]:
    """``(score, average_delta)`` of one evaluated point: the minimum and the mean interference
    delta over the evaluated tasks that ``rank_by`` names (``all``, or a row ``source``:
    ``eval_tasks``, ``eval_harness``)."""
    rows = [row for row in evaluation.tasks.values() if rank_by in ("all", row.get("source"))]
    deltas = [row["interference_delta"] for row in rows]
    if not deltas or None in deltas:
        raise ConfigError("eval_tasks: a sweep needs each task's own adapter in the catalog to compute deltas")
    return min(deltas), sum(deltas) / len(deltas)


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
