"""``SweepConfig``: the unified merge schema plus the sweep fields, and its YAML loader."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmerge.errors import ConfigError
from lmerge.merge.config import MergeConfig, _build, config_section, migrate_legacy, optimizer_spec
from lmerge.sweep.search import SearchConfig
from lmerge.yaml_files import read_yaml


@dataclass
class SweepConfig(MergeConfig):
    """A merge config whose method parameters are searched: every point is merged, evaluated on
    ``eval_tasks`` and ranked by its worst interference delta."""

    search: SearchConfig = field(default_factory=SearchConfig)
    """What to try: a grid, e.g. ``--search.grid.lambda [0.1,0.3]``, or ``type: bayes`` over a ``space``."""
    constraint_nonnegative: bool = False
    """Keep the method's lambda-like parameter (``lambda``, ``scale``) >= 0."""
    save_merged: bool = False
    """Save every point's merge (as ``save`` says); default: merge and evaluate in memory only."""
    storage: str | None = None
    """Optuna storage shared by several processes or machines (``sqlite:///...``, ``postgresql://...``,
    or a journal file path); default: a journal file in the sweep directory."""
    rank_by: Literal["all", "eval_tasks", "eval_harness"] = "all"
    """The evaluated tasks whose worst interference delta is a point's score: ``all``, the catalog's
    ``eval_tasks`` only, or the lm-evaluation-harness tasks of ``eval_harness`` only."""

    def __post_init__(self) -> None:
        self.search = config_section(SearchConfig, self.search, "search")
        if self.eval_tasks is None and self.catalog:
            # The specification's sweeps evaluate the merged tasks themselves unless told otherwise.
            self.eval_tasks = list(self.adapters)
        super().__post_init__()
        if not self.eval_tasks and not self.eval_harness:
            raise ConfigError(
                "eval_tasks: a sweep ranks points by their evaluation; give eval_tasks and catalog, or eval_harness"
            )
        if self.rank_by != "all" and not getattr(self, self.rank_by):
            raise ConfigError(f"rank_by: {self.rank_by} ranks by tasks that this sweep does not evaluate; set it")
        name, _ = optimizer_spec(self.optimizer)
        if name != "none":
            raise ConfigError(
                f"optimizer: {name!r} cannot run inside a sweep (the sweep searches method_params itself); "
                "use lmerge merge for a learner or for optimizer: bayes"
            )
        if self.tag is not None:
            raise ConfigError("tag: each sweep point is named after its parameters; leave tag out")

    def merge_config(self, method_params: dict[str, Any]) -> MergeConfig:
        """The plain merge config of one point."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(MergeConfig)}
        values.update(method_params=method_params, search=None, optimizer=None)
        if not self.save_merged:
            values["save"] = dataclasses.replace(self.save, format="none")
        return MergeConfig(**values)


def load_sweep_config(path: str | Path, **overrides: Any) -> SweepConfig:
    """Read a sweep config YAML (legacy keys migrated, e.g. a top-level ``grid``), apply
    ``overrides``, and check it."""
    data = migrate_legacy(read_yaml(path), str(path))
    data.update(overrides)
    return _build(SweepConfig, data, "", source=str(path))
