"""Evaluate what is already on disk: a saved merged adapter (an lmerge run bundle or any PEFT
LoRA directory), or each task's own adapter alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmerge.adapters.lora import HEADS_DIR, LoraAdapter
from lmerge.data import TaskSpec
from lmerge.errors import ConfigError
from lmerge.evaluation.baseline_key import config_digest
from lmerge.evaluation.evaluate import Evaluation, Evaluator
from lmerge.evaluation.record import plan_views, record_evaluation
from lmerge.outputs import check_inputs_outside, safe_component
from lmerge.yaml_files import read_json


@dataclass
class SavedEvaluation:
    """An evaluation of a saved adapter and where it was recorded."""

    evaluation: Evaluation
    tag: str
    recorded: dict[str, Any]


def evaluate_saved_adapter(
    path: str | Path, evaluator: Evaluator, output_root: str | Path, tag: str | None = None
) -> SavedEvaluation:
    """Fold the adapter at ``path`` into the evaluation model and score every task, with each
    task's head from the adapter's ``heads/`` when it has one, else from the task's adapter.

    A run bundle is recorded under its own method and adapters; another directory under
    ``merged/adapter/<directory name>``. The adapter's directory is an input: nothing is
    written into it; the results go under the output root only.
    """
    path = Path(path)
    adapter = LoraAdapter(path)
    metadata_file = path / "merge_metadata.json"
    metadata = _read_metadata(metadata_file) if metadata_file.is_file() else {"method": "adapter"}
    names = [a["name"] for a in metadata.get("adapters", [])] or [safe_component(path.resolve().name, "adapter")]
    tag = safe_component(tag or metadata.get("tag", names[0]), "tag")
    method = safe_component(metadata["method"], "method")
    # Everything is read and checked before anything is computed or written.
    check_inputs_outside(output_root, [path])
    heads = _heads(path, evaluator.tasks)
    planned = Evaluation(evaluator.split, evaluator.namespace, {task.name: {} for task in evaluator.tasks})
    plan_views(output_root, method, names, tag, planned)
    evaluator.prepare_baselines(_merged_adapters(metadata) if evaluator.harness else None)
    with evaluator.folded(adapter):
        evaluation = evaluator.evaluate(heads)
    views = plan_views(output_root, method, names, tag, evaluation)
    identity = [adapter.sha256, adapter.config, tag, evaluation.split, evaluation.namespace, list(evaluation.tasks)]
    run_id = config_digest(identity)[:16]
    run_dir = path if metadata_file.is_file() else None
    recorded = record_evaluation(views, metadata, names, run_dir, run_id)
    return SavedEvaluation(evaluation, tag, recorded)


def _read_metadata(path: Path) -> dict[str, Any]:
    """A run bundle's ``merge_metadata.json`` (read strictly), checked to name its method and adapters."""
    metadata = read_json(path, "merge metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("method"), str):
        raise ConfigError(f"{path}: not an lmerge merge_metadata.json (no 'method')")
    adapters = metadata.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, dict) and "name" in a for a in adapters):
        raise ConfigError(f"{path}: 'adapters' must be a list of {{name: ...}} records")
    return metadata


def _merged_adapters(metadata: dict[str, Any]) -> list[LoraAdapter] | None:
    """The adapters a run bundle merged, for the harness baselines; None (the catalog tasks'
    adapters) for another directory, or when one of them is no longer where the bundle says."""
    adapters = metadata.get("adapters") or []
    if not adapters or not all(Path(str(a.get("path"))).is_dir() for a in adapters):
        return None
    return [LoraAdapter(a["path"], name=a["name"]) for a in adapters]


def _heads(path: Path, tasks: list[TaskSpec]) -> dict[str, dict]:
    heads = {}
    for task in tasks:
        head = task.task_kind.bundle_head(task, path / HEADS_DIR)
        if head is not None:
            heads[task.name] = head
    return heads
