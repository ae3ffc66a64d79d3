"""``run_demo``: build the benchmark, run every method on it, and report. Each step runs a shipped
config (``configs/finetune.yaml``, ``configs/demo/*.yaml``, the learners' ``configs/*.yaml``)
through the code ``lmerge fit|merge|sweep`` use, so any step can be re-run by hand."""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmerge.adapters.lora import LoraAdapter
from lmerge.data import load_task_catalog
from lmerge.demo.build import (
    SplitSizes,
    finetune_command,
    longest_first,
    mark_recipe,
    prepare_data,
    recipe_digest,
    stale_adapters,
)
from lmerge.demo.figures import results_png
from lmerge.demo.jobs import Finished, FitRunner, Job, demo_precision
from lmerge.demo.learned_cache import LearnedCache, inputs_digest, learner_key
from lmerge.demo.report import text_table, verdict, write_report
from lmerge.demo.runs import (
    MethodResult,
    TaskAlone,
    adapters_alone,
    learned_outcome,
    run_grid_sweep,
    run_static,
    score_learned,
    single_row,
)
from lmerge.demo.scored_cache import ScoredCache
from lmerge.demo.sources import DemoSources
from lmerge.evaluation.baseline_key import file_digest
from lmerge.evaluation.task_vectors import task_vector_stats
from lmerge.outputs import link_atomic, make_dirs, write_bytes_atomic, write_json_atomic
from lmerge.tasks.spec import catalog_tasks
from lmerge.yaml_files import read_yaml

# Row label -> config, relative to the configs directory.
STATIC = {
    "uniform": "demo/uniform.yaml",
    "ties": "demo/ties.yaml",
    "dare": "demo/dare.yaml",
    "ties (core space)": "demo/ties_core.yaml",
    "tsv": "demo/tsv.yaml",
}
# Ranked on validation, the best point scored on test.
SWEEPS = {
    "task_vector sweep": "demo/task_vector_sweep.yaml",
    "tsv sweep": "demo/tsv_sweep.yaml",
    "iso_c sweep": "demo/iso_c_sweep.yaml",
    "iso_cts sweep": "demo/iso_cts_sweep.yaml",
    "knots_ties sweep": "demo/knots_ties_sweep.yaml",
}
LEARNERS = {
    "AdaMerging": "adamerging.yaml",
    "gradient CE": "gradient.yaml",
    "SuperMerge": "supermerge.yaml",
    "regret smooth-max": "regret_smoothmax.yaml",
}


@dataclass
class DemoOutcome:
    """What a demo run produced."""

    results: list[MethodResult]
    table: str
    report: Path
    chart: Path
    seconds: float
    peak_rss_mb: float


# The demo prints its own steps; Lightning's model summary would repeat for every fit.
QUIET = ["--trainer.enable_model_summary", "false"]


def run_demo(
    *,
    catalog: Path,
    configs: Path,
    output_dir: Path,
    logs_dir: Path,
    sources: DemoSources,
    sizes: SplitSizes,
    seed: int = 0,
    retrain: bool = False,
    refit: bool = False,
    rescore: bool = False,
    fit_args: Sequence[str] = (),
    eval_batch_size: int = 32,
    min_label_examples: int | None = None,
    jobs: int = 0,
    learner_precision: str = "auto",
    ranking_precision: str = "32-true",
) -> DemoOutcome:
    """Run the whole demo; ``fit_args`` are extra ``lmerge fit`` flags for every fine-tune and
    learner (e.g. ``--trainer.max_steps 5``), which run as ``jobs`` processes at a time (0: one per
    core, :mod:`lmerge.demo.jobs`). Adapters are fine-tuned again with ``retrain`` (or
    when their recipe changed), learners learn again with ``refit`` (or when any of their inputs
    changed: :mod:`lmerge.demo.learned_cache`), and merges are scored on test again with ``rescore``
    (or when what they were computed from changed: :mod:`lmerge.demo.scored_cache`); the learners
    run at ``learner_precision``, the
    sweeps rank their points (validation split) at ``ranking_precision``
    (:func:`~lmerge.demo.jobs.demo_precision`), every test score in float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Every load of the headless base model reports the task head as missing weights: expected here.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    learner_precision = demo_precision(learner_precision, "learner_precision")
    ranking_precision = demo_precision(ranking_precision, "ranking_precision")
    load_at_start = os.getloadavg()
    steps = 5 + len(STATIC) + len(SWEEPS)
    step = _Steps(steps)

    step("data: parse, deduplicate and split the packaged datasets")
    data, rebuilt = prepare_data(catalog, sources, sizes, seed, min_label_examples)
    for task, manifest in data.items():
        print(f"  {task}: {manifest['examples']} examples, {len(manifest['labels'])} labels, {manifest['counts']}")

    demo_dir = output_dir / "demo"
    base_model = demo_dir / "base_model"
    link_atomic(base_model, sources.base_model, root=output_dir)
    step("fine-tune each task's LoRA adapter (configs/finetune.yaml)")
    recipe = recipe_digest(configs)
    stale = set(rebuilt) | set(stale_adapters(catalog, recipe))
    to_train = list(data) if retrain else [task for task in data if task in stale]
    for task in data:
        if task not in to_train:
            print(f"  {task}: cached adapter (--retrain true to train it again)")
    # Children print no progress bars: their consoles go to log files.
    extra = [*QUIET, "--trainer.enable_progress_bar", "false", *fit_args]
    make_dirs(demo_dir / "logs", root=output_dir)
    runner = FitRunner(logs_dir, demo_dir / "logs", jobs, extra)
    model = base_model.absolute()
    if len(to_train) > 1:
        to_train = longest_first(data, to_train, catalog, model)
    finetunes = [
        runner.job(task, f"finetune-{task}", finetune_command(configs, catalog, task, model, logs_dir))
        for task in to_train
    ]

    def finetune_done(done: Finished) -> None:
        mark_recipe(catalog, done.job.name, recipe)
        print(f"  {done.job.name}: fine-tuned in {done.seconds:.0f} s")

    runner.run(finetunes, "fine-tuning", finetune_done)

    metrics = {name: spec.metric for name, spec in load_task_catalog(catalog).items() if name in data}
    merge_overrides = {"catalog": str(catalog), "output_dir": str(output_dir), "eval_batch_size": eval_batch_size}
    learned_overrides = {**merge_overrides, "eval_tasks": list(metrics), "split": "test"}
    inputs = inputs_digest(catalog_tasks(str(catalog), list(data)), base_model)
    scores = _Scores(ScoredCache(demo_dir / "scored", inputs, output_dir), rescore)
    step(f"the learners ({', '.join(LEARNERS)}), trainer.precision {learner_precision}")
    learned: dict[str, tuple[dict, float]] = {}
    learner_jobs: list[Job] = []
    caches: dict[str, LearnedCache] = {}
    precision_args = ["--trainer.precision", learner_precision]
    for name, config in LEARNERS.items():
        key = learner_key(configs / config, [*precision_args, *fit_args], inputs)
        cache = LearnedCache(demo_dir / "learned" / f"{Path(config).stem}.json", key, root=output_dir)
        outcome = None if refit else cache.load()
        if outcome is not None:
            print(f"  {name}: cached learned merge (its inputs are unchanged; --refit true to learn it again)")
            learned[name] = (outcome, 0.0)
            continue
        command = ["fit", "--config", str(configs / config), "--data.catalog", str(catalog), *precision_args]
        command += ["--export.output_dir", str(output_dir), "--export.save", "none", "--export.eval_tasks", "null"]
        learner_jobs.append(runner.job(name, f"learner-{Path(config).stem}", command))
        caches[name] = cache

    # The most steps first: the longest learner (SuperMerge) ends with the batch, not after it.
    learner_jobs.sort(key=lambda job: -_max_steps(configs / LEARNERS[job.name]))

    def learner_done(done: Finished) -> None:
        outcome = learned_outcome(done.output, runner.log_dirs[done.job.name])
        caches[done.job.name].save(outcome)
        learned[done.job.name] = (outcome, done.seconds)
        print(f"  {done.job.name}: learned in {done.seconds:.0f} s")

    # The learners' processes take the cores; the adapters alone, the static merges and sweeps run
    # here in what they leave idle (the end of the batch, where one learns alone), then on every
    # core. Run beside them from the start instead, on 2 cores the three compete: the first demo
    # took 995 s, not about 975 one after the other.
    results: list[MethodResult] = []
    scored: dict[str, MethodResult] = {}
    with runner.beside(learner_jobs, "learning", learner_done) as pace:
        pace()
        step("each adapter alone, and its head alone on the frozen base model (test split)")
        alone = scores.alone(
            {"kind": "alone", "tasks": list(data), "batch_size": eval_batch_size},
            lambda: adapters_alone(catalog, list(data), output_dir, eval_batch_size),
        )
        for task, a in alone.items():
            print(f"  {task}: adapter {a.single:.4f}, head alone {a.head_alone:.4f} ({a.metric})")
        results.append(single_row(alone))

        for name, config in STATIC.items():
            pace()
            step(f"{name} (configs/{config})")
            described = {"kind": "static", "config": read_yaml(configs / config), "overrides": merge_overrides}
            results.append(scores.row(name, described, lambda: run_static(name, configs / config, merge_overrides)))

        ranked = {**merge_overrides, "eval_precision": ranking_precision}
        on_test = {"split": "test", "eval_precision": "32-true"}
        for name, config in SWEEPS.items():
            pace()
            step(f"{name} (configs/{config}): ranked on validation, best scored on test")
            described = {"kind": "sweep", "config": read_yaml(configs / config), "ranked": ranked, "test": on_test}
            results.append(scores.row(name, described, lambda: run_grid_sweep(name, configs / config, ranked, on_test)))

        # Those learned already are scored while the last ones learn.
        for name in [name for name in LEARNERS if name in learned]:
            pace()
            scored[name] = _score(name, learned[name], learned_overrides, scores)

    for name in LEARNERS:
        if name not in scored:
            scored[name] = _score(name, learned[name], learned_overrides, scores)
    results.extend(scored[name] for name in LEARNERS)

    if scores.reused:
        print(f"  {len(scores.reused)} cached scores reused (inputs unchanged; --rescore true to score them again)")
    step("report")
    table = text_table(results, metrics)
    specs = load_task_catalog(catalog)
    vectors = task_vector_stats([LoraAdapter(specs[task].adapter, name=task) for task in metrics], base_model)
    write_json_atomic(demo_dir / "task_vectors.json", vectors.to_dict(), root=output_dir)
    chart = demo_dir / "results.png"
    write_bytes_atomic(chart, results_png(results, metrics, vectors), root=output_dir)
    seconds = time.perf_counter() - started
    usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
    # The fits ran as processes beside this one: their memory counts with its own.
    peak_rss_mb = max(usage.ru_maxrss / 1024, children.ru_maxrss / 1024, runner.peak_rss_mb)
    facts = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores, no GPU used",
        "load average (1 min) at start / end": f"{load_at_start[0]:.2f} / {os.getloadavg()[0]:.2f}",
        "fine-tuned this run": ", ".join(to_train) or "none (cached)",
        "learned this run": ", ".join(caches) or "none (cached: their inputs were unchanged)",
        "scores reused (inputs unchanged)": ", ".join(scores.reused) or "none",
        "learners' trainer.precision": learner_precision,
        "sweeps ranked in (test scores: 32-true)": ranking_precision,
        "wall time": f"{seconds:.0f} s (CPU time, user + system, its fits' processes included: {cpu_seconds:.0f} s)",
        "peak memory (RSS)": f"{peak_rss_mb:.0f} MB (with the fits that ran beside it)",
    }
    report = demo_dir / "REPORT.md"
    write_report(report, results, metrics, data, chart, facts, vectors, alone)
    write_json_atomic(demo_dir / "results.json", [_as_json(r) for r in results], root=output_dir)
    return DemoOutcome(results, f"{table}\n\n{verdict(results)}", report, chart, seconds, peak_rss_mb)


class _Steps:
    """Numbered progress lines between the steps' own progress bars."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.perf_counter()

    def __call__(self, title: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        # No blank line between steps: the demo's console fits on one screen, progress bars aside.
        print(f"[{self.done}/{self.total}] {title}   ({elapsed:.0f} s so far)", flush=True)


def _max_steps(config: Path) -> int:
    """The ``trainer.max_steps`` a learner's config sets (0 where it sets none)."""
    return int((read_yaml(config).get("trainer") or {}).get("max_steps") or 0)


def _score(name: str, learned: tuple[dict, float], overrides: dict, scores: _Scores) -> MethodResult:
    """Learner ``name``'s merge (its outcome and learning seconds) scored on the test split."""
    outcome, seconds = learned
    described = {"kind": "learned", "merge_spec": file_digest(Path(outcome["merge_spec"])), "overrides": overrides}
    return scores.row(
        name, described, lambda: score_learned(name, Path(LEARNERS[name]).stem, outcome, overrides, seconds)
    )


class _Scores:
    """The demo's rows, each read from ``cache`` when it holds one for the same inputs (unless
    ``rescore``), else computed and recorded; ``reused`` names those read."""

    def __init__(self, cache: ScoredCache, rescore: bool) -> None:
        self.cache = cache
        self.rescore = rescore
        self.reused: list[str] = []

    def row(self, name: str, described: dict, compute: Callable[[], MethodResult]) -> MethodResult:
        """Row ``name`` of the step ``described``: recorded, or ``compute``'s."""
        return self._cached(name, described, compute, MethodResult.as_record, MethodResult.from_record)

    def alone(self, described: dict, compute: Callable[[], dict[str, TaskAlone]]) -> dict[str, TaskAlone]:
        """The adapters-alone table of the step ``described``: recorded, or ``compute``'s."""
        return self._cached(
            "adapters alone",
            described,
            compute,
            lambda alone: {"tasks": {task: vars(a) for task, a in alone.items()}},
            lambda record: {task: TaskAlone(**fields) for task, fields in record["tasks"].items()},
        )

    def _cached(
        self,
        name: str,
        described: dict,
        compute: Callable[[], Any],
        to_record: Callable[[Any], dict],
        from_record: Callable[[dict], Any],
    ) -> Any:
        key = self.cache.key(described)
        record = None if self.rescore else self.cache.load(name, key)
        if record is not None:
            self.reused.append(name)
            return from_record(record)
        value = compute()
        self.cache.save(name, key, to_record(value))
        return value


def _as_json(row: MethodResult) -> dict:
    return {**row.as_record(), "average": row.average}
