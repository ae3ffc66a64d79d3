"""Sweeps: grid and Bayesian search over merge parameters, ranked max-min, resumable and shared
by several workers through an Optuna study."""

from importlib import import_module
from typing import Any

# Loaded on first use: ``lmerge merge`` and ``lmerge fit`` need the sweep's config types only,
# not Optuna (the study and the samplers import it).
_EXPORTS = {
    "SearchConfig": "lmerge.sweep.search",
    "SweepConfig": "lmerge.sweep.config",
    "load_sweep_config": "lmerge.sweep.config",
    "SweepResult": "lmerge.sweep.run",
    "run_sweep": "lmerge.sweep.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmerge.sweep' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
