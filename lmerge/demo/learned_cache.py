"""The demo's learned merges, reused while everything they were learned from is unchanged.

A learner is the demo's slowest step (minutes each on two cores) and, seeded on CPU, gives the same
coefficients every time it sees the same inputs. So, as the adapters are cached by their recipe
and the sweeps by their points' keys, each learner's outcome (its exported merge spec) is recorded
with the key of its inputs, and a later demo scores that spec on the test split instead of
learning it again. The key holds everything the coefficients depend on: the learner's config
settings and extra ``lmerge fit`` flags, every task's catalog fields, data files and adapter (by
content), the base model, lmerge's own source code and the versions of the packages that compute
the steps. Any change, or ``lmerge demo --refit true``, learns it again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmerge.adapters.lora import LoraAdapter
from lmerge.data import TaskSpec
from lmerge.evaluation.baseline_key import (
    COMPUTE_PACKAGES,
    adapter_fingerprint,
    config_digest,
    data_fingerprint,
    model_fingerprint,
    package_version,
    source_digest,
    task_fields,
)
from lmerge.outputs import write_json_atomic
from lmerge.yaml_files import read_yaml


@dataclass(frozen=True)
class LearnedCache:
    """One learner's record (``path``, JSON, inside the outputs' ``root``) and the key of its
    inputs it must hold to be reused."""

    path: Path
    key: str
    root: Path

    def load(self) -> dict[str, Any] | None:
        """The recorded outcome (``merge_spec``, ``coefficients``, ``log_dir``) when it was learned
        from these inputs and its merge spec is still there; else None."""
        if not self.path.is_file():
            return None
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != self.key:
            return None
        outcome = record.get("outcome")
        if not isinstance(outcome, dict) or not isinstance(outcome.get("merge_spec"), str):
            return None
        return outcome if Path(outcome["merge_spec"]).is_file() else None

    def save(self, outcome: dict[str, Any]) -> None:
        """Record ``outcome`` under this key (written to a temporary file and renamed)."""
        write_json_atomic(self.path, {"key": self.key, "outcome": outcome}, root=self.root)


def inputs_digest(tasks: list[TaskSpec], base_model: Path) -> str:
    """The digest of what every demo learner learns from (module doc): the tasks, the base model,
    lmerge's source code and the packages' versions; computed once for all the learners."""
    return config_digest(
        {
            "tasks": {
                task.name: {
                    "fields": task_fields(task),
                    "data": sorted(data_fingerprint(task.dataset).values()),
                    "adapter": adapter_fingerprint(LoraAdapter(task.adapter)) if task.adapter else None,
                }
                for task in tasks
            },
            "base_model": model_fingerprint(str(base_model)),
            "source": source_digest(),
            "packages": {name: package_version(name) for name in COMPUTE_PACKAGES},
        }
    )


def learner_key(config: Path, fit_args: Sequence[str], inputs: str) -> str:
    """The key of one learner: its config's settings and extra flags, and the :func:`inputs_digest`."""
    return config_digest({"config": read_yaml(config), "fit_args": list(fit_args), "inputs": inputs})
