"""lm-evaluation-harness as an evaluation backend (``pip install lmerge[harness]``): its tasks
scored on the evaluation model as it is (a merge folded in, in memory, through the harness's
``HFLM``), on each single adapter for the baseline (cached like the catalog baselines), and
recorded as rows of the evaluation beside the catalog tasks.

A harness task reports several metrics; its row's metric is the one ``metrics`` names for it,
else the first the task lists (``acc`` for arc_easy and hellaswag), and all of them are kept in
the row's ``harness.metrics``. Its ``single`` is the best single adapter's score (each adapter's
is in ``harness.singles``): the interference delta asks what the merge lost against the best of
its parts. lm_eval is imported only when the harness runs: it is heavy.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmerge.adapters.lora import LoraAdapter
from lmerge.errors import ConfigError
from lmerge.evaluation.baseline_key import SCORING_VERSION, config_digest, model_fingerprint, package_version
from lmerge.outputs import single_metrics_path, write_json_atomic

HARNESS_SOURCE = "eval_harness"
_CACHE_SPLIT = "harness"


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks to evaluate on, next to (or instead of) catalog tasks."""

    tasks: list[str]
    """Harness task, group or tag names, e.g. ``[arc_easy, hellaswag]``."""
    num_fewshot: int | None = None
    """Few-shot examples in each prompt; default: each task's own (0 where it sets none)."""
    limit: int | float | None = None
    """Examples per task: a count, or below 1 a share of each task (the harness's first examples);
    default: every example."""
    batch_size: int = 8
    """Batch size of the harness's model calls."""
    include_path: str | None = None
    """A folder of extra task YAMLs (the harness's ``include_path``), e.g. tasks over local data."""
    include_defaults: bool = True
    """Also offer the harness's own tasks (indexing its thousands of YAMLs takes a while);
    false: only those of ``include_path``."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Task -> the metric its row reports, e.g. ``{hellaswag: acc_norm, gsm8k: "exact_match,strict-match"}``
    (a metric name, or ``name,filter``); default: the task's first."""

    def __post_init__(self) -> None:
        tasks = self.tasks
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigError(f"eval_harness.tasks: expected a non-empty list of task names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"eval_harness.tasks: {tasks!r} names a task twice")
        if self.num_fewshot is not None and (not _is_int(self.num_fewshot) or self.num_fewshot < 0):
            raise ConfigError(f"eval_harness.num_fewshot: must be an integer >= 0, got {self.num_fewshot!r}")
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0):
            raise ConfigError(f"eval_harness.limit: must be a positive count or share, got {limit!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"eval_harness.batch_size: must be a positive integer, got {self.batch_size!r}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ConfigError(f"eval_harness.include_path: {self.include_path} is not a directory")
        if not self.include_defaults and self.include_path is None:
            raise ConfigError("eval_harness.include_defaults: false leaves no tasks without an include_path")
        unknown = sorted(set(self.metrics) - set(tasks))
        if unknown:
            raise ConfigError(f"eval_harness.metrics.{unknown[0]}: not one of eval_harness.tasks")

    def settings(self) -> dict[str, Any]:
        """What a cached score depends on, beside the adapter, the precision and lm_eval's version."""
        values = asdict(self)
        del values["tasks"], values["batch_size"], values["metrics"]
        if self.include_path is not None:
            values["include_path"] = str(Path(self.include_path).resolve())
        return values


@dataclass
class HarnessScore:
    """One harness task's metrics on one model."""

    metrics: dict[str, float]
    """``name,filter`` -> value (the standard errors left out)."""
    higher_is_better: dict[str, bool]
    """Metric name -> its direction."""
    examples: int
    seconds: float = 0.0

    def primary(self, task: str, chosen: str | None) -> tuple[str, float, bool]:
        """``(metric, value, higher is better)`` of task's row: ``chosen``, else the first metric."""
        key = next(iter(self.metrics)) if chosen is None else chosen if "," in chosen else f"{chosen},none"
        if key not in self.metrics:
            have = ", ".join(self.metrics)
            raise ConfigError(f"eval_harness.metrics.{task}: {chosen!r} is not a metric of {task} (it has {have})")
        name, _, kept = key.partition(",")
        return (name if kept == "none" else key), self.metrics[key], self.higher_is_better.get(name, True)


class HarnessSuite:
    """The harness tasks of one evaluator: scores its model as it is, and each adapter alone (cached)."""

    def __init__(self, config: HarnessConfig, output_root: Path, base_model: str, precision: str) -> None:
        self.config = config
        self.root = output_root
        self.base_model = base_model
        self.precision = precision
        self._manager: Any = None
        self._tokenizer: Any = None

    @property
    def manager(self) -> Any:  # lm_eval's TaskManager, imported lazily
        """The harness's task index (its own tasks and ``include_path``'s), the names checked once."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            config = self.config
            manager = TaskManager(include_path=config.include_path, include_defaults=config.include_defaults)
            known = set(manager.all_tasks)
            for name in config.tasks:
                if name not in known:
                    close = difflib.get_close_matches(name, known, n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise ConfigError(f"eval_harness.tasks: {name!r} is not a harness task, group or tag{hint}")
            self._manager = manager
        return self._manager

    def score(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, HarnessScore]:
        """The harness's results for ``tasks`` (default: all of the config's) on ``model`` as it is."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        config = self.config
        tasks = tasks or config.tasks
        backend = "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal"
        started = time.perf_counter()
        with _quiet():
            language_model = HFLM(
                pretrained=model, tokenizer=self.tokenizer, backend=backend, batch_size=config.batch_size
            )
            results = simple_evaluate(
                model=language_model,
                tasks=tasks,
                num_fewshot=config.num_fewshot,
                limit=config.limit,
                task_manager=self.manager,
                log_samples=False,
            )
        # One harness run scores every task: each gets an even share of its time.
        seconds = (time.perf_counter() - started) / len(tasks)
        return {task: _task_score(results, task, seconds) for task in tasks}

    def baseline(
        self, model: nn.Module, adapter: LoraAdapter, folded: Callable[[LoraAdapter], contextlib.AbstractContextManager]
    ) -> dict[str, HarnessScore]:
        """Every task's score of ``adapter`` alone (``folded(adapter)`` folds it into ``model`` for
        the duration), from the cache where its key matches."""
        key = self._cache_key(adapter)
        scores = {}
        for task in self.config.tasks:
            record = _read_json(self._cache_path(task, adapter))
            if record and record.get("key") == key:
                scores[task] = HarnessScore(record["metrics"], record["higher_is_better"], record["examples"])
        missing = [task for task in self.config.tasks if task not in scores]
        if missing:
            with folded(adapter):
                computed = self.score(model, missing)
            for task, score in computed.items():
                record = {"harness_task": task, "adapter": str(adapter.path), "key": key, **asdict(score)}
                write_json_atomic(self._cache_path(task, adapter), record, root=self.root)
            scores.update(computed)
        return scores

    def rows(self, merged: dict[str, HarnessScore], singles: dict[str, dict[str, HarnessScore]]) -> dict[str, dict]:
        """The evaluation rows of the harness tasks: the merged score against the best single adapter's."""
        from lmerge.metrics import MetricSpec, interference_delta, normalized

        rows = {}
        for task, score in merged.items():
            chosen = self.config.metrics.get(task)
            metric, value, higher = score.primary(task, chosen)
            each = {adapter: scores[task].primary(task, chosen)[1] for adapter, scores in singles.items()}
            single = (max if higher else min)(each.values()) if each else None
            direction = MetricSpec(metric, build=None, higher_is_better=higher)  # only its direction is read
            rows[task] = {
                "metric": metric,
                "higher_is_better": higher,
                "merged": value,
                "single": single,
                "interference_delta": None if single is None else interference_delta(value, single, direction),
                "normalized": None if single is None else normalized(value, single, direction),
                "examples": score.examples,
                "seconds": round(score.seconds, 3),
                "source": HARNESS_SOURCE,
                "harness": {
                    "metrics": score.metrics,
                    "singles": each,
                    "num_fewshot": self.config.num_fewshot,
                    "limit": self.config.limit,
                },
            }
        return rows

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from lmerge.tasks.models import trust_remote_code

            self._tokenizer = AutoTokenizer.from_pretrained(self.base_model, trust_remote_code=trust_remote_code())
        return self._tokenizer

    def _cache_key(self, adapter: LoraAdapter) -> dict[str, Any]:
        settings = self.config.settings()
        # Beside the harness's own settings, what the number depends on that baseline caches key on too.
        identity = {
            "adapter_config_sha256": config_digest(adapter.config),
            "base_model": model_fingerprint(self.base_model),
            "scoring_version": SCORING_VERSION,
            "lmerge_version": package_version("lmerge"),
        }
        return (
            {"adapter_sha256": adapter.sha256, "precision": self.precision, "lm_eval": package_version("lm_eval")}
            | settings
            | identity
        )

    def _cache_path(self, task: str, adapter: LoraAdapter) -> Path:
        return single_metrics_path(self.root, task, _CACHE_SPLIT, adapter.name)


def _task_score(results: dict[str, Any], task: str, seconds: float) -> HarnessScore:
    """One task's (or group's) metrics out of ``simple_evaluate``'s results."""
    values = results["results"].get(task) or results.get("groups", {}).get(task) or {}
    metrics = {
        key: float(value)
        for key, value in values.items()
        if "," in key and "_stderr," not in key and isinstance(value, int | float)
    }
    if not metrics:
        raise ConfigError(f"eval_harness.tasks: the harness reported no metric for {task!r}")
    samples = results.get("n-samples", {})
    examples = samples[task]["effective"] if task in samples else values.get("sample_len", 0)
    return HarnessScore(metrics, dict(results.get("higher_is_better", {}).get(task, {})), int(examples), seconds)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm_eval's INFO and WARNING lines (a model object passed in, seeds, few-shot overrides) held back."""
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
