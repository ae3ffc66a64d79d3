"""Write an evaluation where the specification's output layout puts it: the merge's eval
directory, per-task files with symlinks from each task's folder, and the eval index."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmerge.evaluation.evaluate import Evaluation
from lmerge.outputs import (
    append_index,
    eval_dir,
    index_path,
    link_atomic,
    safe_component,
    task_metrics_link,
    write_json_atomic,
)

# What of a merge's metadata identifies it in the index (the specification's list).
_IDENTITY = ("method", "params", "method_params", "lambda_policy", "transforms", "optimizer", "merge_mode")


def results_name(split: str, namespace: str, tag: str | None = None) -> str:
    """``eval_results[_<tag>]_<split>[_<subset>].json``."""
    parts = ["eval_results", *([tag] if tag else []), split, *([namespace] if namespace != "full" else [])]
    return "_".join(parts) + ".json"


def record_evaluation(
    root: str | Path,
    method: str,
    adapter_names: list[str],
    tag: str,
    evaluation: Evaluation,
    metadata: dict[str, Any],
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the results file, per-task metrics and their symlinks, and append to the index.
    Returns the index entry."""
    tag = safe_component(tag, "tag")
    results = evaluation.to_dict()
    directory = eval_dir(root, method, adapter_names, evaluation.split, evaluation.namespace)
    results_file = directory / results_name(evaluation.split, evaluation.namespace, tag)
    write_json_atomic(results_file, {"merge_tag": tag, **results})
    per_task = {}
    for task, metrics in evaluation.tasks.items():
        target = directory / "per_task" / safe_component(task, "task") / f"{task}_{tag}_metrics.json"
        write_json_atomic(target, {"task": task, "merge_tag": tag, "split": evaluation.split, **metrics})
        others = [name for name in adapter_names if name != task]
        split = evaluation.split if evaluation.namespace == "full" else f"{evaluation.split}_{evaluation.namespace}"
        link = task_metrics_link(root, task, split, others, tag)
        link_atomic(link, target)
        per_task[task] = {"file": str(target), "link": str(link)}
    entry = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "merge_tag": tag,
        "split": evaluation.split,
        "subset": evaluation.namespace,
        "results_file": str(results_file),
        "run_dir": str(run_dir) if run_dir else None,
        "metadata": {key: metadata.get(key) for key in _IDENTITY},
        "adapters": adapter_names,
        "tasks": evaluation.tasks,
        "aggregate": results["aggregate"],
    }
    append_index(index_path(root, method, adapter_names), entry)
    return {"results_file": str(results_file), "per_task": per_task}
