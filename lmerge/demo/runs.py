"""The demo's merges, each run through the same code and shipped config a user would run by hand,
and reduced to one row of the results table."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmerge.errors import LMergeError
from lmerge.evaluation.evaluate import Evaluation, Evaluator
from lmerge.merge.config import load_merge_config
from lmerge.pipeline import run_merge
from lmerge.tasks.spec import catalog_tasks


@dataclass
class MethodResult:
    """One row of the results table: a method's primary metric per task on the test split."""

    name: str
    """Row label."""
    kind: str
    """``single`` (each task's own adapter), ``static``, ``sweep`` or ``learned``."""
    scores: dict[str, float]
    """Task -> primary metric."""
    normalized: float
    """Mean over tasks of the score divided by the task's own adapter's score."""
    min_delta: float
    """Worst task's score minus its own adapter's (higher is better)."""
    seconds: float
    """Wall time of this step (learning included)."""
    detail: str = ""
    """Where its outputs are, or what was chosen."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything the report shows besides the scores (e.g. learned coefficients)."""

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    def as_record(self) -> dict[str, Any]:
        """Its fields as JSON values (paths as strings), as :meth:`from_record` reads them."""
        return json.loads(json.dumps(vars(self), default=str))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MethodResult:
        """The row :meth:`as_record` wrote."""
        return cls(**record)

    @classmethod
    def from_evaluation(cls, name: str, kind: str, evaluation: Evaluation, seconds: float, detail: str) -> MethodResult:
        aggregate = evaluation.aggregate
        return cls(
            name=name,
            kind=kind,
            scores={task: t["merged"] for task, t in evaluation.tasks.items()},
            normalized=aggregate["normalized_average"],
            min_delta=aggregate["min_delta"],
            seconds=seconds,
            detail=detail,
            extra={"predicted": {task: t["predicted"] for task, t in evaluation.tasks.items() if "predicted" in t}},
        )


@dataclass
class TaskAlone:
    """One task's adapter alone, and its head alone on the frozen base model (test split)."""

    metric: str
    """The task's primary metric."""
    single: float
    """The adapter (and its head) alone: the score every merge is measured against."""
    head_alone: float
    """The adapter's head on the base model without the adapter."""
    labels: dict[str, int]
    """Test examples per true class."""
    predicted: dict[str, dict[str, int]]
    """``single`` / ``head alone`` -> test examples predicted as each class."""


def adapters_alone(catalog: Path, tasks: list[str], output_root: Path, batch_size: int) -> dict[str, TaskAlone]:
    """Each task's adapter alone and its head alone on the test split (the adapter's score is
    cached where the merges' evaluations read it)."""
    specs = catalog_tasks(str(catalog), tasks)
    evaluator = Evaluator(specs, "test", output_root=output_root, batch_size=batch_size)
    alone = {}
    for spec in specs:
        single = evaluator.baseline(spec)
        head = evaluator.head_alone(spec)
        predicted = {"single-task adapter": single.get("predicted"), "head alone": head.predicted}
        alone[spec.name] = TaskAlone(
            metric=spec.metric,
            single=single["value"],
            head_alone=head.value,
            labels=evaluator.data(spec).label_counts("test"),
            predicted={k: dict(zip(spec.label_names, v)) for k, v in predicted.items() if v is not None},
        )
    return alone


def single_row(alone: dict[str, TaskAlone]) -> MethodResult:
    """Each task's own adapter on its own task: the ceiling every merge is measured against."""
    scores = {task: a.single for task, a in alone.items()}
    return MethodResult("single-task adapters", "single", scores, 1.0, 0.0, 0.0, "each task's own adapter")


def run_static(name: str, config: Path, overrides: dict[str, Any]) -> MethodResult:
    """``lmerge merge --config config`` with ``overrides`` (catalog, output root)."""
    started = time.perf_counter()
    result = run_merge(load_merge_config(config, **overrides))
    seconds = time.perf_counter() - started
    return MethodResult.from_evaluation(name, "static", result.evaluation, seconds, str(result.run_dir))


def run_grid_sweep(name: str, config: Path, overrides: dict[str, Any], test_overrides: dict[str, Any]) -> MethodResult:
    """``lmerge sweep --config config`` (ranked on its own split, resumed when it ran before), then
    its best point merged and scored on the test split."""
    from lmerge.sweep import load_sweep_config, run_sweep

    started = time.perf_counter()
    sweep = run_sweep(load_sweep_config(config, **overrides))
    if sweep.best is None or sweep.best_config is None:
        raise LMergeError(f"sweep {config}: no point was evaluated")
    result = run_merge(load_merge_config(sweep.best_config, **{**overrides, **test_overrides}))
    chosen = ", ".join(f"{k}={v}" for k, v in sorted(sweep.best["params"].items()) if k in sweep.swept)
    row = MethodResult.from_evaluation(
        f"{name} ({chosen})", "sweep", result.evaluation, time.perf_counter() - started, str(sweep.path)
    )
    row.extra["points"] = [
        {"params": {k: p["params"][k] for k in sweep.swept}, "score": p["score"]} for p in sweep.points
    ]
    return row


def score_learned(
    name: str, tag: str, outcome: dict[str, Any], merge_overrides: dict[str, Any], learn_seconds: float
) -> MethodResult:
    """A learned merge (``outcome``: where ``lmerge fit``'s export wrote it) named ``tag`` in
    outputs, scored on the test split as ``lmerge merge --config <merge_spec.yaml>`` would; its
    row's time is ``learn_seconds`` plus the scoring's."""
    started = time.perf_counter()
    result = run_merge(load_merge_config(outcome["merge_spec"], **merge_overrides, tag=tag))
    seconds = learn_seconds + time.perf_counter() - started
    row = MethodResult.from_evaluation(name, "learned", result.evaluation, seconds, outcome["merge_spec"])
    row.extra["coefficients"] = Path(outcome["coefficients"])
    row.extra["log_dir"] = outcome["log_dir"]
    return row


def learned_outcome(console: str, log_dir: Path) -> dict[str, Any]:
    """Where an ``lmerge fit`` run whose console is ``console`` exported its learned merge (the
    line its export prints), and its TensorBoard ``log_dir``."""
    marker = "learned merge: "
    lines = [line for line in console.splitlines() if line.startswith(marker)]
    if not lines:
        raise LMergeError(f"the learner's console ({log_dir}) names no learned merge")
    spec = Path(lines[-1][len(marker) :].strip())
    return {"merge_spec": str(spec), "coefficients": str(spec.parent / "coefficients.png"), "log_dir": str(log_dir)}
