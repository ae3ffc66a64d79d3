"""Primary metrics (torchmetrics) and the interference delta that compares a merge with
each task's own adapter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmerge.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    import torchmetrics


@dataclass(frozen=True)
class MetricSpec:
    """A task metric: how to build it and which direction is better."""

    name: str
    build: Callable[[int], torchmetrics.Metric]
    """Builds the metric for a task with this many classes."""
    higher_is_better: bool = True
    on_text: bool = False
    """Whether it compares predicted and reference texts rather than class ids."""


def _accuracy(n_classes: int) -> torchmetrics.Metric:
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(num_classes=max(n_classes, 2), average="micro")


def _macro_f1(n_classes: int) -> torchmetrics.Metric:
    from torchmetrics.classification import MulticlassF1Score

    return MulticlassF1Score(num_classes=max(n_classes, 2), average="macro")


def _wer(n_classes: int) -> torchmetrics.Metric:
    from torchmetrics.text import WordErrorRate

    return WordErrorRate()


# torchmetrics is imported when a metric is built: task specs read this registry cheaply.
METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec("accuracy", _accuracy),
    "macro_f1": MetricSpec("macro_f1", _macro_f1),
    "wer": MetricSpec("wer", _wer, higher_is_better=False, on_text=True),
}


def get_metric(name: str) -> MetricSpec:
    """The metric registered as ``name``; an unknown name lists the valid ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(unknown_name("metric", name, list(METRICS))) from None


def interference_delta(merged: float, single: float, metric: MetricSpec) -> float:
    """``merged - single``, sign flipped for lower-is-better metrics: higher is always better."""
    return merged - single if metric.higher_is_better else single - merged


def normalized(merged: float, single: float, metric: MetricSpec) -> float | None:
    """The share of the single-task score the merge keeps (``merged / single``, inverted for
    lower-is-better metrics); ``None`` when undefined."""
    numerator, denominator = (merged, single) if metric.higher_is_better else (single, merged)
    return numerator / denominator if denominator else None
