"""The ``search`` section of a sweep: what to try (a grid or a Bayesian search space) and how much."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from lmerge.errors import ConfigError


@dataclass
class SearchConfig:
    """How a sweep picks the points it evaluates."""

    type: str = "grid"
    """``grid``: every combination of ``grid``; ``bayes``: a Gaussian process with expected
    improvement over ``space``, ``budget`` evaluations."""
    grid: dict[str, Any] | None = None
    """Values to try per method parameter, e.g. ``{lambda: [0.1, 0.3, 0.5]}``."""
    space: dict[str, Any] | None = None
    """Bayes search space per method parameter, e.g. ``{lambda: {type: float, min: 0.0, max: 1.0}}``
    (types ``float``, ``int`` with ``min``/``max`` and optional ``log``; ``categorical`` with ``choices``)."""
    budget: int = 20
    """Bayes: number of evaluations (points from warm start are free)."""
    init_points: int = 6
    """Bayes: random points before the Gaussian process takes over."""
    seed: int = 0
    """Bayes: seed of the random points and of the acquisition optimizer."""
    warm_start_sweeps: list[str] | str | None = None
    """Earlier sweep results fed to the search without re-evaluation: ``sweep_*.json`` files,
    directories holding them, or globs."""
    warm_start_max_points: int | None = None
    """At most this many warm-start points (the best ones); default: all."""

    def __post_init__(self) -> None:
        # search.type is checked where it is dispatched (lmerge.sweep.space.build_space), which
        # keeps Optuna out of every command's start-up.
        self.grid = _parse_values(self.grid, "search.grid")
        self.space = _parse_values(self.space, "search.space")
        if self.budget < 1:
            raise ConfigError(f"search.budget: must be at least 1, got {self.budget}")
        if self.init_points < 1:
            raise ConfigError(f"search.init_points: must be at least 1, got {self.init_points}")
        if self.warm_start_max_points is not None and self.warm_start_max_points < 0:
            raise ConfigError(f"search.warm_start_max_points: must be >= 0, got {self.warm_start_max_points}")
        if isinstance(self.warm_start_sweeps, str):
            self.warm_start_sweeps = [self.warm_start_sweeps]


def _parse_values(section: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    """Values given as flags arrive as YAML text (``--search.grid.lambda [0.1,0.3]``): parse them."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{key}: expected a mapping of parameter names, got {section!r}")
    parsed = {}
    for name, value in section.items():
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}.{name}: cannot read {value!r}") from None
        parsed[str(name)] = value
    return parsed
