"""Evaluate merges per task: the merged model's primary metric, the task's own adapter alone
(computed once, cached), and the interference delta between them."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmerge.adapters.lora import LoraAdapter
from lmerge.data import TaskSpec, subset_namespace
from lmerge.errors import ConfigError, unknown_name
from lmerge.evaluation.baseline_key import baseline_key, key_digest
from lmerge.evaluation.fold import WeightFolder
from lmerge.evaluation.harness import HarnessConfig, HarnessScore, HarnessSuite
from lmerge.metrics import get_metric, interference_delta, normalized
from lmerge.outputs import check_inputs_outside, single_metrics_path, subsets_dir, write_json_atomic
from lmerge.tasks.kinds import get_kind
from lmerge.tasks.models import apply_head, load_model
from lmerge.tasks.spec import SPLITS

CATALOG_SOURCE = "eval_tasks"

# Evaluation precisions, named as Lightning's --trainer.precision: the autocast dtype of each.
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class TaskScore:
    """One task's metric on one model."""

    value: float
    examples: int
    seconds: float = 0.0
    predicted: list[int] | None = None
    """Examples predicted as each class, for kinds that predict classes."""


@dataclass
class Evaluation:
    """Per-task results of one merge on one split, and their aggregates."""

    split: str
    namespace: str
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def aggregate(self) -> dict[str, float | None]:
        merged = [t["merged"] for t in self.tasks.values()]
        deltas = [t["interference_delta"] for t in self.tasks.values() if t["interference_delta"] is not None]
        shares = [t["normalized"] for t in self.tasks.values() if t["normalized"] is not None]
        return {
            "average": sum(merged) / len(merged) if merged else None,
            "normalized_average": sum(shares) / len(shares) if shares else None,
            "min_delta": min(deltas) if deltas else None,
            "average_delta": sum(deltas) / len(deltas) if deltas else None,
        }

    def table(self) -> str:
        """The results as an aligned text table: task, metric, merged, single, delta."""
        rows = [("task", "metric", "merged", "single", "delta")]
        for task, t in self.tasks.items():
            rows.append((task, t["metric"], _fmt(t["merged"]), _fmt(t["single"]), _fmt(t["interference_delta"], True)))
        agg = self.aggregate
        rows.append(("average", "", _fmt(agg["average"]), "", _fmt(agg["average_delta"], True)))
        rows.append(("normalized", "", _fmt(agg["normalized_average"]), "", ""))
        rows.append(("min delta", "", "", "", _fmt(agg["min_delta"], True)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "subset": self.namespace, "tasks": self.tasks, "aggregate": self.aggregate}


class Evaluator:
    """Loads the base model once for a set of tasks of one kind (and lm-evaluation-harness tasks,
    ``harness``), scores folded merges on them, and caches each task's single-adapter baseline
    under the output root."""

    def __init__(
        self,
        tasks: list[TaskSpec],
        split: str,
        *,
        output_root: str | Path,
        eval_subset: dict[str, Any] | None = None,
        batch_size: int = 32,
        base_model: str | None = None,
        device: str | None = None,
        precision: str = "32-true",
        harness: HarnessConfig | None = None,
    ) -> None:
        if not tasks and not harness:
            raise ConfigError("eval_tasks: the list is empty")
        kinds = {t.task_kind for t in tasks}
        if len(kinds) > 1:
            shown = ", ".join(sorted(map(str, kinds)))
            raise ConfigError(f"eval_tasks: tasks of different kinds cannot share one model ({shown})")
        # The harness scores a language model: the class generation tasks load the base model as.
        self.kind = tasks[0].task_kind if tasks else get_kind("generation")
        if harness and not self.kind.text_answers:
            raise ConfigError(
                f"eval_harness: it scores a language model, and eval_tasks of kind {self.kind.name!r} load "
                "the base model with a task head; evaluate those apart"
            )
        clash = sorted({t.name for t in tasks} & set(harness.tasks if harness else []))
        if clash:
            raise ConfigError(f"eval_harness.tasks: {clash[0]!r} is also a catalog task of eval_tasks")
        # Checked before anything loads, so a typo costs no model or dataset load.
        if split not in SPLITS:
            raise ConfigError(f"split: {unknown_name('split', split, list(SPLITS))}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"eval_batch_size: must be a positive integer, got {batch_size!r}")
        self.tasks = tasks
        self.split = split
        self.root = Path(output_root)
        self.eval_subset = eval_subset
        self.namespace = subset_namespace(eval_subset)
        for task in tasks:
            # Where each baseline goes, checked (names, the root) before anything loads.
            single_metrics_path(self.root, task.name, split, self.namespace)
        check_inputs_outside(self.root, [Path(t.adapter) for t in tasks if t.adapter])
        self.batch_size = batch_size
        self.base_model = base_model or self._base_from_adapters()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in PRECISIONS:
            raise ConfigError(f"eval_precision: {unknown_name('precision', precision, list(PRECISIONS))}")
        self.precision = precision
        self.harness = HarnessSuite(harness, self.root, self.base_model, precision) if harness else None
        self._model: nn.Module | None = None
        self._data: dict[str, Any] = {}
        self._baselines: dict[str, dict[str, Any]] = {}
        self._harness_baselines: dict[str, dict[str, HarnessScore]] = {}

    # ---- the model and the data -----------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = load_model(self.base_model, self.kind).to(self.device).eval()
        return self._model

    def folder(self, fan_in_fan_out: bool = False) -> WeightFolder:
        """A merge writer that folds every merged module into the evaluation model."""
        return WeightFolder(self.model, fan_in_fan_out)

    def data(self, task: TaskSpec):  # noqa: ANN201 - TaskDataModule is imported lazily
        if task.name not in self._data:
            from lmerge.data import TaskDataModule

            module = TaskDataModule.from_spec(
                task,
                self.base_model,
                eval_batch_size=self.batch_size,
                eval_subset=self.eval_subset,
                subset_cache_dir=subsets_dir(self.root),
                subset_splits=(self.split,),
            )
            if not module.has_split(self.split):
                raise ConfigError(f"task {task.name}: has no {self.split!r} split")
            self._data[task.name] = module
        return self._data[task.name]

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, task: TaskSpec, head: dict[str, torch.Tensor] | None) -> TaskScore:
        """The task's metric on the model as it is now (with ``head`` for kinds with heads)."""
        if self.kind.has_head:
            if not head:
                raise ConfigError(f"task {task.name}: no task head (modules_to_save) in its adapter")
            apply_head(self.model, self.kind, head)
        module = self.data(task)
        started = time.perf_counter()
        with self._inference():
            batches = _progress(module.dataloader(self.split, by_length=True), f"{task.name} [{self.split}]")
            scored = self.kind.score(self.model, batches, task, module, self.device)
        return TaskScore(scored.value, scored.examples, time.perf_counter() - started, scored.predicted)

    def head_alone(self, task: TaskSpec) -> TaskScore:
        """The task's own head (for kinds with heads) on the base model, no adapter folded in:
        how much the adapter adds is its baseline's score minus this one."""
        head = self.kind.adapter_head(task, self._adapter(task)) if self.kind.has_head else None
        return self.score(task, head)

    def baseline(self, task: TaskSpec) -> dict[str, Any]:
        """The task's own adapter alone on this split, cached under a key of everything the
        number depends on (:func:`lmerge.evaluation.baseline_key.baseline_key`): reused only
        while all of it is unchanged."""
        adapter = self._adapter(task)
        cache = single_metrics_path(self.root, task.name, self.split, self.namespace)
        cache_key = baseline_key(
            task,
            adapter,
            base_model=self.base_model,
            split=self.split,
            eval_subset=self.eval_subset,
            precision=self.precision,
            device=self.device.type,
            kind=str(self.kind),
        )
        cached = _read_record(cache)
        if cached and cached.get("key_sha256") == key_digest(cache_key):
            return cached
        self.data(task)  # a missing split or column is reported before the model loads
        with self.folded(adapter):
            score = self.score(task, self.kind.adapter_head(task, adapter))
        record = {
            "task": task.name,
            "adapter": str(adapter.path),
            "adapter_sha256": adapter.sha256,
            "split": self.split,
            "subset": self.namespace,
            "metric": task.metric,
            "precision": self.precision,
            "task_kind": str(self.kind),
            "value": score.value,
            "examples": score.examples,
            "predicted": score.predicted,
            "key_sha256": key_digest(cache_key),
            "key": cache_key,
        }
        write_json_atomic(cache, record, root=self.root)
        return record

    def evaluate(self, heads: dict[str, dict[str, torch.Tensor]] | None = None) -> Evaluation:
        """Score the model as it is now (a merge folded in) on every task, next to each task's
        cached baseline. ``heads`` maps a task to its head; default: the task adapter's own."""
        evaluation = Evaluation(self.split, self.namespace)
        for task in self.tasks:
            head = (heads or {}).get(task.name)
            if head is None and self.kind.has_head:
                head = self.kind.adapter_head(task, self._adapter(task))
            merged = self.score(task, head)
            metric = get_metric(task.metric)
            single = self._baselines[task.name]["value"] if task.name in self._baselines else None
            evaluation.tasks[task.name] = {
                "metric": task.metric,
                "higher_is_better": metric.higher_is_better,
                "merged": merged.value,
                "single": single,
                "interference_delta": None if single is None else interference_delta(merged.value, single, metric),
                "normalized": None if single is None else normalized(merged.value, single, metric),
                "examples": merged.examples,
                "seconds": round(merged.seconds, 3),
                "source": CATALOG_SOURCE,
            }
            if merged.predicted is not None and task.label_names:
                evaluation.tasks[task.name]["predicted"] = dict(zip(task.label_names, merged.predicted))
        if self.harness:
            with self._inference():
                merged_scores = self.harness.score(self.model)
            evaluation.tasks.update(self.harness.rows(merged_scores, self._harness_baselines))
        return evaluation

    def prepare_baselines(self, adapters: list[LoraAdapter] | None = None) -> None:
        """Compute (or read from the cache) every task's baseline, before any merge is folded; with
        harness tasks, each of ``adapters`` alone on them (default: the catalog tasks' adapters).
        Every task's data is checked (split, columns) before the first baseline is written."""
        for task in self.tasks:
            self.data(task)
        self._baselines = {task.name: self.baseline(task) for task in self.tasks if task.adapter}
        if self.harness:
            if adapters is None:
                adapters = [self._adapter(task) for task in self.tasks if task.adapter]
            self._harness_baselines = {}
            for adapter in adapters:
                with self._inference():
                    scores = self.harness.baseline(self.model, adapter, self.folded)
                self._harness_baselines[adapter.name] = scores

    def harness_baselines(self) -> dict[str, dict[str, HarnessScore]]:
        """Adapter -> harness task -> its score alone (after :meth:`prepare_baselines`)."""
        return self._harness_baselines

    @contextlib.contextmanager
    def folded(self, adapter: LoraAdapter) -> Iterator[None]:
        """The evaluation model with ``adapter`` folded in (and nothing else), restored afterwards."""
        folder = self.folder(adapter.fan_in_fan_out)
        try:
            for key in adapter.module_keys:
                A, B = adapter.factors(key)
                folder.add_delta(key, adapter.scaling(key) * B @ A)
            yield
        finally:
            folder.restore()

    # ---- helpers ----------------------------------------------------------------------------------
    def _inference(self) -> contextlib.AbstractContextManager:
        """Inference mode, under autocast in the evaluation precision."""
        dtype = PRECISIONS[self.precision]
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None))
        return stack

    def _adapter(self, task: TaskSpec) -> LoraAdapter:
        if not task.adapter:
            raise ConfigError(f"task {task.name}: the catalog names no adapter for it")
        return LoraAdapter(task.adapter, name=task.name)

    def _base_from_adapters(self) -> str:
        for task in self.tasks:
            if task.adapter:
                base = LoraAdapter(task.adapter).base_model
                if base:
                    return base
        raise ConfigError("eval_tasks: no task adapter names its base model (base_model_name_or_path)")


def _read_record(path: Path) -> dict[str, Any] | None:
    """A cached JSON record, or None when it is missing or damaged (it is then recomputed)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "value" in record else None


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _progress(loader, label: str) -> Iterator:  # noqa: ANN001
    from tqdm.auto import tqdm

    return iter(tqdm(loader, desc=label, leave=False, disable=None, unit="batch"))
