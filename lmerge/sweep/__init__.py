"""Sweeps: grid and Bayesian search over merge parameters, ranked max-min, resumable and shared
by several workers through an Optuna study."""

from lmerge.sweep.config import SweepConfig, load_sweep_config
from lmerge.sweep.run import SweepResult, run_sweep
from lmerge.sweep.search import SearchConfig

__all__ = ["SearchConfig", "SweepConfig", "SweepResult", "load_sweep_config", "run_sweep"]
