"""Primary metrics (torchmetrics) and the interference delta that compares a merge with
each task's own adapter."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmerge.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    import torchmetrics


@dataclass(frozen=True)
class MetricSpec:
    """A task metric: how to build it and which direction is better."""

    name: str
    build: Callable[[int], torchmetrics.Metric | TextMatchRate]
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


# ---- answers as text: normalisation, extraction, and the string-match metrics ----------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# A sign before a number, a decimal point or thousands separator inside one: kept by normalize_answer.
_NUMBER_MARK = re.compile(r"(?<![\w.,-])-(?=\d)|(?<=\d)[.,](?=\d)")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, punctuation (ASCII and Unicode) removed, the
    articles a/an/the removed, whitespace collapsed; except that a number keeps its sign and
    decimal point and loses its thousands separators (``"-1,000.50"`` -> ``"-1000.50"``), so
    ``-3`` never matches ``3``."""
    text = text.lower()
    marks = {m.start() for m in _NUMBER_MARK.finditer(text)}
    chars = []
    for i, char in enumerate(text):
        if i in marks:
            chars.append("" if char == "," else char)
        elif char not in string.punctuation and not unicodedata.category(char).startswith("P"):
            chars.append(char)
    return " ".join(_ARTICLES.sub(" ", "".join(chars)).split())


def extract_answer(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The answer ``pattern`` picks out of ``text``: its last match's first group (the whole match
    for a pattern without groups); ``text`` itself without a pattern; None when it does not match."""
    if pattern is None:
        return text
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if pattern.groups else last.group()


class TextMatchRate:
    """The share of predicted texts that ``rule`` accepts against their references (the
    torchmetrics calls the scorers make: ``to``, ``update``, ``compute``)."""

    def __init__(self, rule: Callable[[str, str], bool]) -> None:
        self.rule = rule
        self.matches = 0
        self.total = 0

    def to(self, device: object) -> TextMatchRate:
        return self

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        self.matches += sum(self.rule(p, r) for p, r in zip(predictions, references))
        self.total += len(references)

    def compute(self) -> float:
        return self.matches / self.total if self.total else 0.0


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def contains(prediction: str, reference: str) -> bool:
    """Whether the normalized reference occurs in the normalized prediction as whole words."""
    return f" {normalize_answer(reference)} " in f" {normalize_answer(prediction)} "


# torchmetrics is imported when a metric is built: task specs read this registry cheaply.
METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec("accuracy", _accuracy),
    "macro_f1": MetricSpec("macro_f1", _macro_f1),
    "wer": MetricSpec("wer", _wer, higher_is_better=False, on_text=True),
    "exact_match": MetricSpec("exact_match", lambda n_classes: TextMatchRate(exact_match), on_text=True),
    "contains": MetricSpec("contains", lambda n_classes: TextMatchRate(contains), on_text=True),
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
