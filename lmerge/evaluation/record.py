"""Write an evaluation where the specification's output layout puts it: the merge's eval
directory, per-task files with symlinks from each task's folder, and the eval index.

A merge's evaluation is committed with its run bundle (:meth:`lmerge.outputs.Staged.record`):
its index entry appears in the same step as the bundle, and the files beside it (the views) are
written before the run counts as finished. An evaluation of a saved adapter has no new bundle: its
views are written and its entry appended under the index's lock, and the views are put back as
they were if the entry cannot be appended.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmerge.evaluation.evaluate import Evaluation
from lmerge.outputs import (
    check_index,
    eval_dir,
    index_lock,
    index_path,
    inside_root,
    link_atomic,
    read_index,
    remove_file,
    safe_component,
    task_metrics_link,
    write_bytes_atomic,
    write_json_atomic,
)

# What of a merge's metadata identifies it in the index (the specification's list).
_IDENTITY = ("method", "params", "method_params", "lambda_policy", "transforms", "optimizer", "merge_mode")


def results_name(split: str, namespace: str, tag: str | None = None) -> str:
    """``eval_results[_<tag>]_<split>[_<subset>].json``."""
    parts = ["eval_results", *([tag] if tag else []), split, *([namespace] if namespace != "full" else [])]
    return "_".join(parts) + ".json"


@dataclass
class Views:
    """Where one evaluation's files go under the output root, every path checked before any is written."""

    root: Path
    tag: str
    evaluation: Evaluation
    index: Path
    results_file: Path
    per_task: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    """Task -> (its metrics file, the symlink to it from the task's folder)."""

    def write(self) -> dict[str, Any]:
        """Write the results file, the per-task files and their links; returns where they are."""
        split = self.evaluation.split
        write_json_atomic(self.results_file, {"merge_tag": self.tag, **self.evaluation.to_dict()}, root=self.root)
        for task, (target, link) in self.per_task.items():
            metrics = {"task": task, "merge_tag": self.tag, "split": split, **self.evaluation.tasks[task]}
            write_json_atomic(target, metrics, root=self.root)
            link_atomic(link, target, root=self.root)
        return {
            "results_file": str(self.results_file),
            "per_task": {
                task: {"file": str(target), "link": str(link)} for task, (target, link) in self.per_task.items()
            },
        }


def plan_views(root: str | Path, method: str, adapter_names: list[str], tag: str, evaluation: Evaluation) -> Views:
    """The paths of an evaluation's files, checked (names, root, the index it is appended to)
    before anything is written."""
    root = Path(root)
    tag = safe_component(tag, "tag")
    directory = eval_dir(root, method, adapter_names, evaluation.split, evaluation.namespace)
    views = Views(
        root,
        tag,
        evaluation,
        index_path(root, method, adapter_names),
        inside_root(root, directory / results_name(evaluation.split, evaluation.namespace, tag)),
    )
    split = evaluation.split if evaluation.namespace == "full" else f"{evaluation.split}_{evaluation.namespace}"
    for task in evaluation.tasks:
        target = inside_root(root, directory / "per_task" / safe_component(task, "task") / f"{task}_{tag}_metrics.json")
        others = [name for name in adapter_names if name != task]
        views.per_task[task] = (target, task_metrics_link(root, task, split, others, tag))
    check_index(views.index, root=root)
    return views


def index_entry(
    views: Views,
    metadata: dict[str, Any],
    adapter_names: list[str],
    run_dir: Path | None,
    run_id: str | None,
    results_file: Path | None = None,
) -> dict[str, Any]:
    """The index entry of an evaluation (``results_file``: default, the views' results file)."""
    evaluation = views.evaluation
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "merge_tag": views.tag,
        "split": evaluation.split,
        "subset": evaluation.namespace,
        "results_file": str(results_file or views.results_file),
        "run_dir": str(run_dir) if run_dir else None,
        "metadata": {key: metadata.get(key) for key in _IDENTITY},
        "adapters": adapter_names,
        "tasks": evaluation.tasks,
        "aggregate": evaluation.to_dict()["aggregate"],
    }


def record_evaluation(
    views: Views, metadata: dict[str, Any], adapter_names: list[str], run_dir: Path | None, run_id: str
) -> dict[str, Any]:
    """Record an evaluation that has no new run bundle (a saved adapter's): its views and its
    index entry, under the index's lock; the views are put back if the entry cannot be appended.
    Returns where the views are."""
    with index_lock(views.index, root=views.root):
        entries = read_index(views.index)  # a damaged index is refused before anything is written
        paths = [views.results_file, *(p for pair in views.per_task.values() for p in pair)]
        before = {path: _snapshot(path) for path in paths}
        try:
            written = views.write()
            entry = index_entry(views, metadata, adapter_names, run_dir, run_id)
            write_json_atomic(views.index, [*entries, entry], root=views.root)
        except BaseException:
            for path, old in before.items():
                _restore(path, old, views.root)
            raise
    return written


def _snapshot(path: Path) -> tuple[str, bytes] | None:
    """What ``path`` is now: a link's target, a file's bytes, or None when it does not exist."""
    if path.is_symlink():
        return "link", os.readlink(path).encode()
    if path.is_file():
        return "file", path.read_bytes()
    return None


def _restore(path: Path, old: tuple[str, bytes] | None, root: Path) -> None:
    with contextlib.suppress(Exception):  # best effort: the original failure is what the user sees
        if old is None:
            remove_file(path, root=root)
        elif old[0] == "file":
            write_bytes_atomic(path, old[1], root=root)
        else:
            link_atomic(path, path.parent / old[1].decode(), root=root)
