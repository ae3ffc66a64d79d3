"""Search spaces: the ``search`` section turned into Optuna distributions, the grid's points and
the sampler that proposes new ones. ``SEARCH_TYPES`` is the only dispatch on ``search.type``."""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, GPSampler, GridSampler

from lmerge.errors import ConfigError, did_you_mean
from lmerge.methods import MergeMethod
from lmerge.sweep.search import SearchConfig

_SCALAR = (bool, int, float, str)


@dataclass
class Space:
    """What a sweep may evaluate: one distribution per swept parameter, the points queued up
    front (the whole grid; none for bayes) and how many new points the sampler may add."""

    distributions: dict[str, BaseDistribution]
    points: list[dict[str, Any]]
    budget: int
    """Evaluations the sampler may bring the study to (bayes); 0 for a grid, whose points are all queued."""
    make_sampler: Callable[[int], BaseSampler] = field(repr=False)
    """The sampler to ask with, given how many trials the study already holds."""
    probes: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Points that bound the space (the grid itself, or each range's ends): checked by the method up front."""

    @property
    def names(self) -> list[str]:
        return list(self.distributions)

    def contains(self, params: dict[str, Any]) -> bool:
        """Whether ``params`` sets every swept parameter to a value this space can hold."""
        for name, dist in self.distributions.items():
            if name not in params:
                return False
            value = params[name]
            if isinstance(dist, CategoricalDistribution):
                if not any(same_value(value, choice) for choice in dist.choices):
                    return False
            elif isinstance(value, bool) or not isinstance(value, int | float) or not dist.low <= value <= dist.high:
                return False
            elif isinstance(dist, IntDistribution) and value != int(value):
                return False
        return True


class _QueuedGridSampler(GridSampler):
    """A grid whose points are all queued trials: the queue, not the sampler, says when the
    grid is done (GridSampler's own stop rule reads a grid id that queued trials do not carry)."""

    def after_trial(self, *args: Any) -> None:
        return None


def grid_space(search: SearchConfig, method: MergeMethod, nonnegative: bool) -> Space:
    """Every combination of ``search.grid`` (negative lambda-like values dropped when ``nonnegative``)."""
    if not search.grid:
        raise ConfigError("search.grid: empty; give values per parameter, e.g. {lambda: [0.1, 0.3]}")
    choices: dict[str, list[Any]] = {}
    for name, values in search.grid.items():
        key = f"search.grid.{name}"
        _check_name(name, method, key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key}: expected a non-empty list of values, got {values!r}")
        for value in values:
            if not isinstance(value, _SCALAR):
                raise ConfigError(f"{key}: values must be numbers, strings or booleans, got {value!r}")
        if nonnegative and name == method.lambda_param:
            dropped = [v for v in values if _negative(v)]
            values = [v for v in values if not _negative(v)]
            if dropped:
                _note(f"{key}: constraint_nonnegative leaves out {', '.join(map(str, dropped))}")
            if not values:
                raise ConfigError(f"{key}: no value is >= 0, and constraint_nonnegative is set")
        choices[name] = list(dict.fromkeys(values))
    names = list(choices)
    points = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices.values())]
    return Space(
        distributions={name: CategoricalDistribution(values) for name, values in choices.items()},
        points=points,
        budget=0,
        # Every point is queued up front, so the sampler only names the study's search space.
        make_sampler=lambda _trials: _QueuedGridSampler(choices, seed=search.seed),
        probes=points,
    )


def bayes_space(search: SearchConfig, method: MergeMethod, nonnegative: bool) -> Space:
    """A Gaussian-process search over ``search.space`` (lambda-like lower bounds raised to 0
    when ``nonnegative``), ``search.budget`` evaluations."""
    if not search.space:
        raise ConfigError(
            "search.space: empty; give a range per parameter, e.g. {lambda: {type: float, min: 0, max: 1}}"
        )
    distributions = {}
    ends: dict[str, list[Any]] = {}
    for name, spec in search.space.items():
        key = f"search.space.{name}"
        _check_name(name, method, key)
        distributions[name] = _distribution(spec, key, nonnegative and name == method.lambda_param)
        dist = distributions[name]
        ends[name] = list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]
    probes = [dict(zip(ends, combo, strict=True)) for combo in itertools.product(*ends.values())]

    def make_sampler(trials: int) -> BaseSampler:
        # Seeded by the seed and the study's size: the same seed replays the same sweep, a resumed
        # sweep or a second worker does not draw the first random points again, and seeds s and
        # s + 1 draw unrelated points (a plain seed + trials would shift one sequence by a step).
        return GPSampler(
            seed=int(np.random.SeedSequence([search.seed, trials]).generate_state(1)[0]),
            n_startup_trials=search.init_points,
            deterministic_objective=True,
        )

    return Space(distributions, [], search.budget, make_sampler, probes)


SEARCH_TYPES: dict[str, Callable[[SearchConfig, MergeMethod, bool], Space]] = {
    "grid": grid_space,
    "bayes": bayes_space,
}


def build_space(search: SearchConfig, method: MergeMethod, nonnegative: bool) -> Space:
    """The space of ``search`` for ``method``."""
    if search.type not in SEARCH_TYPES:
        raise ConfigError(f"search.type: {search.type!r} is not one of {', '.join(SEARCH_TYPES)}")
    return SEARCH_TYPES[search.type](search, method, nonnegative)


_SPEC_KEYS = {
    "float": {"type", "min", "max", "log"},
    "int": {"type", "min", "max", "log"},
    "categorical": {"type", "choices"},
}


def _distribution(spec: Any, key: str, nonnegative: bool) -> BaseDistribution:
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected {{type: float, min: ..., max: ...}}, got {spec!r}")
    kind = spec.get("type", "float")
    if kind not in _SPEC_KEYS:
        raise ConfigError(f"{key}.type: {kind!r} is not one of {', '.join(_SPEC_KEYS)}")
    unknown = sorted(set(spec) - _SPEC_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown key for type {kind} (valid: {', '.join(sorted(_SPEC_KEYS[kind]))})"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, _SCALAR) for c in choices):
            raise ConfigError(f"{key}.choices: expected a non-empty list of numbers, strings or booleans")
        if nonnegative:
            choices = [c for c in choices if not _negative(c)]
            if not choices:
                raise ConfigError(f"{key}.choices: no value is >= 0, and constraint_nonnegative is set")
        return CategoricalDistribution(list(dict.fromkeys(choices)))
    number = int if kind == "int" else float
    bounds = {}
    for end in ("min", "max"):
        value = spec.get(end)
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind == "int" and value != int(value)):
            raise ConfigError(f"{key}.{end}: expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        bounds[end] = number(value)
    low, high = bounds["min"], bounds["max"]
    if nonnegative:
        if high < 0:
            raise ConfigError(f"{key}.max: {high} is below 0, and constraint_nonnegative is set")
        low = max(low, number(0))
    if low > high:
        raise ConfigError(f"{key}: min {low} is greater than max {high}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{key}.min: a log scale needs min > 0, got {low}")
    if kind == "int":
        return IntDistribution(low, high, log=log)
    return FloatDistribution(low, high, log=log)


def _check_name(name: str, method: MergeMethod, key: str) -> None:
    if name not in method.param_names:
        valid = ", ".join(method.param_names) or "none"
        hint = did_you_mean(name, method.param_names)
        raise ConfigError(f"{key}: not a parameter of method {method.name!r}{hint} (valid: {valid})")


def _negative(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value < 0


def same_value(a: Any, b: Any) -> bool:
    """Equal values, numbers compared up to rounding (JSON round trips, 0.1 + 0.2)."""
    if (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b


def _note(message: str) -> None:
    print(f"lmerge: note: {message}", file=sys.stderr)
