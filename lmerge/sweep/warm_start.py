"""Warm start: earlier sweep results fed to a new sweep without evaluating them again, when they
were measured the same way (same method, adapters, merge mode, split, tasks, subset and constraint)
on the same inputs (the adapters', the tasks' data and the base model's content: ``inputs``)."""

from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution

from lmerge.errors import ConfigError
from lmerge.sweep.ranking import rank_key
from lmerge.sweep.search import SearchConfig
from lmerge.sweep.space import Space, same_value
from lmerge.sweep.study import POINT_ATTR, WARM_ATTR
from lmerge.yaml_files import read_json

WarmPoint = tuple[dict[str, Any], float, dict[str, Any]]


def sweep_files(sources: list[str]) -> list[Path]:
    """The sweep summaries named by ``search.warm_start_sweeps``: files, directories of
    ``sweep_*.json``, or globs; a source that names nothing is an error."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(path.glob("sweep_*.json"))
        else:
            found = sorted(Path(p) for p in glob.glob(source) if Path(p).is_file())
        if not found and not path.is_dir():
            raise ConfigError(f"search.warm_start_sweeps: {source} matches no sweep file")
        files += [f for f in found if f not in files]
    return files


def warm_points(search: SearchConfig, identity: dict[str, Any], space: Space, fixed: dict[str, Any]) -> list[WarmPoint]:
    """The earlier points that fit this sweep, best first, at most ``search.warm_start_max_points``:
    ``(swept params, score, trial attributes)``. Skipped files and points are reported on stderr."""
    candidates: dict[str, WarmPoint] = {}
    for path in sweep_files(search.warm_start_sweeps or []):
        summary = _read(path)
        reason = mismatch(summary.get("identity", {}), identity)
        if reason:
            _note(f"warm start {path}: skipped: {reason}")
            continue
        outside = 0
        for number, point in enumerate(summary["points"]):
            _check_point(point, path, number)
            swept = _fit(point["params"], space, fixed)
            if swept is None:
                outside += 1
                continue
            record = {key: point[key] for key in ("params", "score", "average_delta", "tasks", "tag") if key in point}
            record["warm_start"] = str(path)
            key = json.dumps(swept, sort_keys=True)
            if key not in candidates or rank_key(record) > rank_key(candidates[key][2][POINT_ATTR]):
                candidates[key] = (swept, point["score"], {POINT_ATTR: record, WARM_ATTR: str(path)})
        if outside:
            _note(
                f"warm start {path}: {outside} point(s) skipped: outside this sweep's space or other fixed parameters"
            )
    chosen = sorted(candidates.values(), key=lambda w: rank_key(w[2][POINT_ATTR]), reverse=True)
    return chosen[: search.warm_start_max_points] if search.warm_start_max_points is not None else chosen


def mismatch(theirs: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """Why an earlier sweep cannot warm-start this one (the first differing key), or ``None``."""
    for key, value in ours.items():
        if theirs.get(key) != value:
            return f"{key} differs ({theirs.get(key)!r} there, {value!r} here)"
    return None


def _fit(params: dict[str, Any], space: Space, fixed: dict[str, Any]) -> dict[str, Any] | None:
    """The swept values of ``params`` as this space holds them, or ``None`` when the point lies
    outside the space or was merged with other values of the parameters this sweep fixes."""
    if not space.contains(params):
        return None
    for name, value in fixed.items():
        if name not in space.distributions and not same_value(params.get(name), value):
            return None
    swept = {}
    for name, dist in space.distributions.items():
        value = params[name]
        if isinstance(dist, CategoricalDistribution):
            value = next(choice for choice in dist.choices if same_value(value, choice))
        swept[name] = value
    return swept


def _read(path: Path) -> dict[str, Any]:
    try:
        summary = read_json(path, "sweep summary")
    except ConfigError as exc:
        raise ConfigError(f"search.warm_start_sweeps: {exc}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("points"), list):
        raise ConfigError(f"search.warm_start_sweeps: {path} is not a sweep summary (no points list)")
    return summary


def _check_point(point: Any, path: Path, number: int) -> None:
    """Refuse a point that cannot be ranked: no parameters, or a score or average delta that is
    not a finite number (a NaN would win or lose every comparison silently)."""
    where = f"search.warm_start_sweeps: {path}: points[{number}]"
    if not isinstance(point, dict) or not isinstance(point.get("params"), dict):
        raise ConfigError(f"{where}: expected a point with its params")
    for key in ("score", "average_delta"):
        value = point.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where}.{key}: expected a finite number, got {value!r}")


def _note(message: str) -> None:
    print(f"lmerge: note: {message}", file=sys.stderr)
