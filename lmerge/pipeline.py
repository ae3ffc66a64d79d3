"""The one module that chains stages: learn or search a merge's parameters, then merge; and a
learner's export (its coefficients as a merge spec, merged and evaluated).

Every other package runs one stage and knows nothing of the others; this is where a merge
config's ``optimizer`` (a learner, or ``bayes``) and the end of ``lmerge fit`` turn into a merge.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from lmerge.errors import ConfigError, MethodError
from lmerge.evaluation.evaluate import Evaluator
from lmerge.learn.heatmap import coefficient_heatmap, figure_png
from lmerge.merge.config import MergeConfig, load_merge_config, optimizer_spec
from lmerge.merge.runner import MergeResult, check_settings, merge_to_bundle, prepare_merge
from lmerge.outputs import run_bundle, write_bytes_atomic, write_json_atomic

LEARNED_METHODS = ("weighted_delta_n", "weighted_rank")
"""The methods whose parameters a learner (a merge config's ``optimizer``) sets."""


def run_merge(config: MergeConfig, evaluator: Evaluator | None = None) -> MergeResult:
    """Run the config's learner or search first when its ``optimizer`` names one, then merge,
    save, evaluate and record (:func:`lmerge.merge.runner.merge_to_bundle`).
    Raises :class:`lmerge.errors.LMergeError` on any bad input."""
    config, learned = learn_method_params(config)
    return merge_to_bundle(config, evaluator, learned)


def learn_method_params(config: MergeConfig) -> tuple[MergeConfig, dict[str, Any] | None]:
    """The config with the method parameters its ``optimizer`` finds (a learner's coefficients
    or a Bayesian search's best point), and the record of how; unchanged when it names none."""
    name, params = optimizer_spec(config.optimizer)
    if name == "none":
        return config, None
    if name == "bayes":
        # Optuna loads only when a search runs.
        from lmerge.sweep.run import search_method_params

        method_params, record = search_method_params(config, params)
        return dataclasses.replace(config, method_params=method_params), record
    if config.method not in LEARNED_METHODS:
        raise ConfigError(
            f"optimizer {name}: it learns weighted_delta_n coefficients (weighted_rank with granularity "
            "rank_wise); set method: weighted_delta_n"
        )
    from lmerge.learn.from_config import train_learner

    check_settings(config)  # what the merge after training needs, before the training
    method_params, record = train_learner(
        name, params, config.catalog, config.adapters, config.merge_mode, config.method
    )
    return dataclasses.replace(config, method_params=method_params), record


def export_learned_merge(
    learner: Any,
    output_dir: str,
    save: str = "none",
    eval_tasks: list[str] | None = None,
    split: str = "test",
) -> Path:
    """Write the learner's merge spec, coefficients and heatmap into a run bundle; with ``save``
    other than none, run the exported merge too. Returns the bundle's path."""
    values = learner.coefficients.values()
    names = [a.name for a in learner.adapters]
    _check_coefficients(values, learner.coefficients.group_names, names)
    spec = learner.merge_spec()
    learner_name = type(learner).__name__.lower()
    record = {
        "learner": type(learner).__name__,
        "groups": learner.coefficients.group_names,
        "adapters": names,
        "values": values,
        "steps": learner.global_step,
        "hyperparameters": dict(learner.hparams),
    }
    overrides: dict[str, Any] = {"output_dir": output_dir, "save": {"format": save}, "split": split}
    if eval_tasks:
        overrides["eval_tasks"] = eval_tasks
    merges = save != "none" or bool(eval_tasks)
    if merges:
        # The merge that follows the export, checked before the export writes anything.
        prepare_merge(MergeConfig(**{**spec, **overrides}))
    with run_bundle(output_dir, learner_name, names) as bundle:
        header = f"# lmerge merge --config <this file>\n# A merge learned by {type(learner).__name__}.\n"
        text = header + yaml.safe_dump(spec, sort_keys=False)
        write_bytes_atomic(bundle.work / "merge_spec.yaml", text.encode(), root=output_dir)
        write_json_atomic(bundle.work / "coefficients.json", record, root=output_dir)
        figure = coefficient_heatmap(learner.coefficients.display_values(), learner.coefficients.group_names, names)
        write_bytes_atomic(bundle.work / "coefficients.png", figure_png(figure), root=output_dir)
    print(f"learned merge: {bundle.final / 'merge_spec.yaml'}")
    if merges:
        result = run_merge(load_merge_config(bundle.final / "merge_spec.yaml", **overrides))
        print(f"merged with the learned coefficients: {result.run_dir}")
        if result.evaluation:
            print(result.evaluation.table())
    return bundle.final


def _check_coefficients(values: list[list[float]], groups: list[str], adapters: list[str]) -> None:
    """Refuse to export coefficients that are not finite numbers (a diverged training run),
    naming the first group and adapter, before anything is written."""
    for group, row in zip(groups, values, strict=True):
        for adapter, value in zip(adapters, row, strict=True):
            if not math.isfinite(value):
                raise MethodError(
                    f"learned coefficients: {value} for adapter {adapter!r} in group {group!r}; "
                    "training diverged (lower the learning rate), nothing exported"
                )
