"""``run_sweep``: search a merge's parameters, evaluating every point in memory with one evaluator,
through a study that several processes may share and a killed process resumes."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmerge.data import subset_namespace
from lmerge.errors import ConfigError, LMergeError
from lmerge.evaluation.baseline_key import config_digest, scores_fingerprint
from lmerge.evaluation.evaluate import Evaluator
from lmerge.merge.config import MergeConfig
from lmerge.merge.runner import evaluator_for, merge_to_bundle, prepare_merge
from lmerge.methods import get_method
from lmerge.outputs import inside_root, merged_dir
from lmerge.sweep import report
from lmerge.sweep.config import SweepConfig
from lmerge.sweep.ranking import best_point, point_scores, rank_key
from lmerge.sweep.search import SearchConfig
from lmerge.sweep.space import Space, build_space
from lmerge.sweep.study import SweepStudy, connect_database, journal_file, journal_storage
from lmerge.sweep.warm_start import warm_points
from lmerge.tasks.resolve import resolve_adapters

_POLL_SECONDS = 0.5


@dataclass
class SweepResult:
    """A finished sweep: every point of its study, the best one, and where it was written."""

    points: list[dict[str, Any]]
    """Each point: ``params`` (all method parameters), ``score``, ``average_delta``, ``tasks``
    (per task: metric, merged, single, interference_delta), ``tag``, ``run_dir``, ``warm_start``."""
    best: dict[str, Any] | None
    path: Path
    """The sweep summary ``sweep_<timestamp>.json``."""
    plot: Path | None
    best_config: Path | None
    """The best point as an ``lmerge merge`` config."""
    evaluated: int
    """Points this call evaluated (the others came from earlier runs, other workers or warm start)."""
    swept: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The final table, best point first."""
        return report.table(self.points, self.swept)


def sweep_dir(root: str | Path, method: str, names: list[str]) -> Path:
    """``<root>/merged/<method>/<task_combo>/sweeps``."""
    return inside_root(root, merged_dir(root, method, names) / "sweeps")


def run_sweep(config: SweepConfig, *, progress: bool = True) -> SweepResult:
    """Run (or resume, or join) the sweep ``config`` describes and write its summary, plot and
    best config. Raises :class:`lmerge.errors.LMergeError` on bad input."""
    method = get_method(config.method)
    adapters = resolve_adapters(config.adapters, config.catalog)
    names = [a.name for a in adapters]
    fixed = method.normalize_params(config.method_params, len(adapters))
    space = build_space(config.search, method, config.constraint_nonnegative)
    for probe in space.probes:
        try:
            method.normalize_params({**config.method_params, **probe}, len(adapters))
        except LMergeError as exc:
            raise ConfigError(f"search: point {probe} is not valid for {method.name}: {exc}") from None
    # The whole merge (transforms, lambda policy, layers, output names) at every bound of the
    # space, before the first byte of the sweep is written.
    for probe in space.probes or [{}]:
        prepare_merge(config.merge_config({**config.method_params, **probe}))
    identity = {
        "method": method.name,
        "adapters": names,
        "merge_mode": config.merge_mode,
        "split": config.split,
        "eval_tasks": list(config.eval_tasks or []),
        "subset": subset_namespace(config.eval_subset),
        "constraint_nonnegative": config.constraint_nonnegative,
    }
    # Only where set, so that sweeps without them keep the identity (and study) they had.
    if config.eval_harness:
        identity["eval_harness"] = dataclasses.asdict(config.eval_harness)
    if config.rank_by != "all":
        identity["rank_by"] = config.rank_by
    evaluator = evaluator_for(config, adapters, baselines=False)
    # What the points' scores were measured on, by content: a sweep resumed or warm-started after
    # an adapter, a task's data or the base model changed measures its points again.
    identity["inputs"] = scores_fingerprint(
        evaluator.tasks, adapters, base_model=evaluator.base_model, precision=config.eval_precision
    )
    warm = warm_points(config.search, identity, space, fixed)
    directory = sweep_dir(config.output_dir, method.name, names)
    name = study_name(config, identity, fixed)
    database = connect_database(config.storage)
    journal = None if database else journal_file(config.storage, directory / f"{name}.journal", config.output_dir)
    # Checked and connected: from here on the sweep writes (baselines, its journal, its locks).
    evaluator.prepare_baselines(adapters)
    storage = database or journal_storage(journal, None if config.storage else config.output_dir)
    study = SweepStudy(directory, name, storage, space, config.output_dir)
    try:
        warmed = study.seed(warm)
        if warm:
            _note(f"warm start: {len(warm)} earlier point(s) match, {warmed} new to this study")
        evaluated = _work(config, space, study, evaluator, progress)
        points = study.points()
    finally:
        study.close()
    return _write(config, directory, name, identity, space, points, evaluated)


def search_method_params(config: MergeConfig, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``optimizer: bayes`` of a plain merge config: a bayes sweep over ``config.search``
    (``overrides`` replace its keys); returns the best point's method parameters and a record of the search."""
    if not config.search:
        raise ConfigError("search: optimizer bayes needs a search space, e.g. {space: {lambda: {min: 0, max: 1}}}")
    if not config.eval_tasks and not config.eval_harness:
        raise ConfigError(
            "eval_tasks: optimizer bayes ranks points by their evaluation; give eval_tasks and catalog, or eval_harness"
        )
    search = {**config.search, **overrides, "type": "bayes"}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(MergeConfig)}
    values.update(search=search, optimizer=None, tag=None)
    sweep_config = SweepConfig(**values)
    result = run_sweep(sweep_config)
    record = {
        "name": "bayes",
        "sweep": str(result.path),
        "search": dataclasses.asdict(sweep_config.search),
        "best": result.best,
        "points": result.points,
    }
    return dict(result.best["params"]), record


def study_name(config: SweepConfig, identity: dict[str, Any], fixed: dict[str, Any]) -> str:
    """The study's name: a digest of everything that makes two runs the same sweep (not the budget
    or the warm start, so a larger budget or more warm-start files resume the same study)."""
    search: SearchConfig = config.search
    key = {
        **identity,
        "fixed": {k: v for k, v in fixed.items() if k not in (search.grid or search.space or {})},
        "lambda_policy": config.lambda_policy,
        "transforms": config.transforms,
        "eval_subset": config.eval_subset,
        "search": {"type": search.type, "grid": search.grid, "space": search.space, "seed": search.seed},
        "init_points": search.init_points,
    }
    return f"study_{search.type}_{config_digest(key)[:12]}"


def _work(config: SweepConfig, space: Space, study: SweepStudy, evaluator: Evaluator, progress: bool) -> int:
    """Claim and evaluate points until the study has none left; returns how many this worker did."""
    from tqdm.auto import tqdm

    done = study.points()
    best = best_point(done)
    total = max(space.budget, study.evaluations())
    finished = sum(1 for p in done if not p.get("warm_start"))
    bar = tqdm(
        total=total, initial=finished, desc="sweep", unit="point", file=sys.stderr, disable=None if progress else True
    )
    evaluated = 0
    try:
        while True:
            trial = study.claim()
            if trial is None:
                if not study.others_running():
                    break
                time.sleep(_POLL_SECONDS)
                continue
            earlier = study.finished(trial.params)
            if earlier is not None:
                study.repeat(trial, earlier)
                bar.update(1)
                continue
            try:
                record = _evaluate(config, trial.params, evaluator)
            except BaseException:
                study.give_back(trial)
                raise
            study.complete(trial, record["score"], record)
            evaluated += 1
            if best is None or rank_key(record) > rank_key(best):
                best = record
            bar.update(1)
            bar.set_postfix(best=f"{best['score']:+.4f}")
    finally:
        bar.close()
    return evaluated


def _evaluate(config: SweepConfig, swept: dict[str, Any], evaluator: Evaluator) -> dict[str, Any]:
    """Merge and evaluate one point (in memory unless ``save_merged``); its record."""
    result = merge_to_bundle(config.merge_config({**config.method_params, **swept}), evaluator=evaluator)
    score, average = point_scores(result.evaluation, config.rank_by)
    tasks = {
        task: {key: values[key] for key in ("metric", "merged", "single", "interference_delta")}
        for task, values in result.evaluation.tasks.items()
    }
    return {
        "params": result.params,
        "score": score,
        "average_delta": average,
        "tasks": tasks,
        "tag": result.tag,
        "run_dir": str(result.run_dir),
    }


def _write(
    config: SweepConfig,
    directory: Path,
    name: str,
    identity: dict[str, Any],
    space: Space,
    points: list[dict[str, Any]],
    evaluated: int,
) -> SweepResult:
    """Write the summary, the plot and the best config of the study's ``points``."""
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    path = directory / f"sweep_{stamp}.json"
    suffix = 1
    while path.exists():
        path = directory / f"sweep_{stamp}_{suffix}.json"
        suffix += 1
    best = best_point(points)
    swept = space.names
    plot_path = path.with_suffix(".png") if points else None
    if plot_path:
        report.plot(plot_path, points, swept, config.output_dir)
    best_config = path.with_name(path.stem + "_best.yaml") if best else None
    if best_config:
        report.best_merge_config(config, best, best_config)
    summary = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "study": name,
        "storage": config.storage or str(directory / f"{name}.journal"),
        "identity": identity,
        "search": dataclasses.asdict(config.search),
        "method_params": config.method_params,
        "lambda_policy": config.lambda_policy,
        "transforms": config.transforms,
        "eval_subset": config.eval_subset,
        "swept": swept,
        "points": points,
        "best": best,
        "plot": str(plot_path) if plot_path else None,
        "best_config": str(best_config) if best_config else None,
    }
    report.write_summary(path, summary, config.output_dir)
    return SweepResult(points, best, path, plot_path, best_config, evaluated, swept)


def _note(message: str) -> None:
    print(f"lmerge: note: {message}", file=sys.stderr)
