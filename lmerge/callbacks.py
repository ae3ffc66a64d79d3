"""The Lightning callbacks that configs name by class path (``lmerge.callbacks.BestCoefficients``):
the learners' own, and the export that turns what they learned into a merge."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from lmerge.errors import ConfigError, unknown_name
from lmerge.learn.callbacks import (
    BestCoefficients,
    BestStepCoefficients,
    CoefficientLogger,
    StepEarlyStopping,
    is_learner,
)
from lmerge.learn.teacher_cache import TeacherCache
from lmerge.outputs import DEFAULT_OUTPUT_DIR, check_inputs_outside, check_output_root
from lmerge.pipeline import export_learned_merge
from lmerge.tasks.spec import SPLITS, catalog_tasks

__all__ = [
    "BestCoefficients",
    "BestStepCoefficients",
    "CoefficientLogger",
    "MergeExport",
    "StepEarlyStopping",
    "TeacherCache",
    "ThreadBudget",
]

THREADS_FILE_ENV = "LMERGE_THREADS_FILE"
"""An environment variable: where ``lmerge fit`` reads how many threads it may use now
(:class:`ThreadBudget`; set by ``lmerge demo`` for the fits it runs side by side)."""


class MergeExport(Callback):
    """At the end of fit, writes the learned merge into a run bundle
    ``<output_dir>/merged/<learner>/<combo>/runs/run_<time>/``: the ``weighted_delta_n`` merge
    spec (``merge_spec.yaml``, runnable with ``lmerge merge --config``), ``coefficients.json`` and
    ``coefficients.png``; with ``save`` other than none it also runs that merge (saving the
    adapter, and evaluating it on ``eval_tasks``)."""

    def __init__(
        self,
        output_dir: str = DEFAULT_OUTPUT_DIR,
        save: Literal["none", "lora", "full"] = "none",
        eval_tasks: list[str] | None = None,
        split: str = "test",
        catalog: str | None = None,
    ) -> None:
        """``catalog``: the learner's task catalog (``lmerge fit`` links it from ``data.catalog``),
        where ``eval_tasks`` are looked up."""
        # A bad output root, task or split is found before anything is built, not after training.
        self.output_dir = str(check_output_root(output_dir))
        if split not in SPLITS:
            raise ConfigError(f"export.split: {unknown_name('split', split, SPLITS)}")
        if eval_tasks and catalog:
            catalog_tasks(catalog, eval_tasks)
        self.save = save
        self.eval_tasks = eval_tasks
        self.split = split
        self.bundle: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The learner's adapters are known once it is built: checked before training, not after.
        if is_learner(pl_module):
            check_inputs_outside(self.output_dir, [a.path for a in pl_module.adapters])

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not is_learner(pl_module) or trainer.interrupted:
            return
        self.bundle = export_learned_merge(pl_module, self.output_dir, self.save, self.eval_tasks, self.split)


class ThreadBudget(Callback):
    """Keeps torch's intra-op threads at the number the file ``path`` holds, read at a batch's
    start at most once every ``every_seconds``: a process that runs several fits side by side
    (``lmerge demo``) gives a fit the cores that the others leave idle when they end. A missing
    or unreadable file changes nothing. ``lmerge fit`` adds it when ``LMERGE_THREADS_FILE`` names
    the file."""

    def __init__(self, path: str, every_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.every_seconds = every_seconds
        self._next_read = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._follow()

    def on_validation_batch_start(self, *args: Any) -> None:
        self._follow()

    def on_test_batch_start(self, *args: Any) -> None:
        self._follow()

    def _follow(self) -> None:
        now = time.monotonic()
        if now < self._next_read:
            return
        self._next_read = now + self.every_seconds
        try:
            threads = int(self.path.read_text())
        except (OSError, ValueError):
            return
        # Called here, on the thread that runs the fit: torch's thread count is per calling thread.
        if threads >= 1 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
