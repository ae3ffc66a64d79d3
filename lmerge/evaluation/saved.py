"""Evaluate what is already on disk: a saved merged adapter (an lmerge run bundle or any PEFT
LoRA directory), or each task's own adapter alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmerge.adapters.lora import HEADS_DIR, LoraAdapter
from lmerge.data import TaskSpec
from lmerge.errors import ConfigError
from lmerge.evaluation.evaluate import Evaluation, Evaluator
from lmerge.evaluation.record import record_evaluation, results_name
from lmerge.outputs import safe_component, write_json_atomic


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
    ``merged/adapter/<directory name>``.
    """
    path = Path(path)
    adapter = LoraAdapter(path)
    metadata_file = path / "merge_metadata.json"
    metadata = _read_metadata(metadata_file) if metadata_file.is_file() else {"method": "adapter"}
    names = [a["name"] for a in metadata.get("adapters", [])] or [safe_component(path.resolve().name, "adapter")]
    tag = safe_component(tag or metadata.get("tag", names[0]), "tag")
    heads = _heads(path, evaluator.tasks)  # read (and checked) before anything is computed or written
    evaluator.prepare_baselines(_merged_adapters(metadata) if evaluator.harness else None)
    with evaluator.folded(adapter):
        evaluation = evaluator.evaluate(heads)
    if metadata_file.is_file():
        write_json_atomic(path / results_name(evaluation.split, evaluation.namespace), evaluation.to_dict())
    recorded = record_evaluation(
        output_root, metadata["method"], names, tag, evaluation, metadata, path if metadata_file.is_file() else None
    )
    return SavedEvaluation(evaluation, tag, recorded)


def _read_metadata(path: Path) -> dict[str, Any]:
    """A run bundle's ``merge_metadata.json``, checked to name its method and adapters."""
    try:
        metadata = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None
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
