"""The demo's test scores, reused while everything they were computed from is unchanged.

Once the adapters, the sweeps' points and the learned merges are cached, what is left of a demo is
scoring each merge on the test split again: about 8 s per row on one core, two minutes in all, for
numbers that cannot change. So each row of the results table (and the adapters-alone table) is
recorded with the key of what it was computed from: the step's config and settings, the
:func:`~lmerge.demo.learned_cache.inputs_digest` (every task's catalog fields, data and adapter by
content, the base model, lmerge's own source code, the packages' versions) and, for a learned
merge, its merge spec's content. A later demo with the same key shows the recorded row, as long
as the outputs it names are still there; any change, or ``lmerge demo --rescore true``, scores it
again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmerge.evaluation.baseline_key import config_digest
from lmerge.outputs import write_json_atomic


@dataclass(frozen=True)
class ScoredCache:
    """The recorded scores of one demo (JSON files in ``folder``, inside the outputs' ``root``),
    each valid for the key it was saved with; ``inputs`` is the digest every key includes."""

    folder: Path
    inputs: str
    root: Path

    def key(self, step: dict[str, Any]) -> str:
        """The key of a step described by ``step`` (its kind, config, settings), with the inputs."""
        return config_digest({"step": step, "inputs": self.inputs})

    def load(self, name: str, key: str) -> dict[str, Any] | None:
        """Row ``name``'s record when it was computed under ``key`` and the output it names
        (``detail``, where there is one) still exists; else None."""
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("row"), dict):
            return None
        detail = record["row"].get("detail")
        return record["row"] if not detail or Path(detail).exists() else None

    def save(self, name: str, key: str, row: dict[str, Any]) -> None:
        """Record row ``name`` (JSON-ready) under ``key`` (written to a temporary file and renamed)."""
        write_json_atomic(self._path(name), {"key": key, "row": row}, root=self.root)

    def _path(self, name: str) -> Path:
        return self.folder / f"{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json"
