"""GradientCE (``gradient``): supervised cross-entropy on validation data for ``weighted_delta_n``,
each task's term normalized by its own adapter's cross-entropy."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lmerge.errors import ConfigError
from lmerge.learn.base import Batch, MergeLearner
from lmerge.learn.baselines import baseline_losses


class GradientCE(MergeLearner):
    """Minimize the (weighted) sum of the tasks' cross-entropies."""

    objective_name = "ce"

    def __init__(
        self,
        catalog: str,
        adapters: list[str],
        tasks: list[str] | None = None,
        lr: float = 1e-2,
        ce_task_weighting: Literal["baseline_normalized", "equal", "manual"] = "baseline_normalized",
        ce_baseline_floor: float = 1e-6,
        ce_baseline_batches: int = 32,
        ce_manual_task_weights: dict[str, float] | None = None,
        min_optimizer_steps_before_early_stop: int = 20,
        early_stopping_warmup_steps: int = 20,
        enforce_validation_only_selection: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            adapters: The adapters to merge: catalog task names or adapter directories.
            tasks: The tasks trained on; default: the adapters that are catalog tasks.
            lr: Adam learning rate.
            ce_task_weighting: ``baseline_normalized``: CE_t / max(CE of the task's own adapter, floor);
                ``equal``: the plain sum; ``manual``: ``ce_manual_task_weights``.
            ce_baseline_floor: Smallest denominator of the baseline normalization.
            ce_baseline_batches: Batches per task that estimate the baseline CE.
            ce_manual_task_weights: Task -> weight, for ``manual``.
            min_optimizer_steps_before_early_stop: Steps before early stopping may stop the run.
            early_stopping_warmup_steps: Steps before patience is tracked.
            enforce_validation_only_selection: Refuse to train on a split other than validation.
            **kwargs: Shared learner options (see ``MergeLearner``).
        """
        super().__init__(
            catalog,
            adapters,
            tasks,
            lr=lr,
            min_optimizer_steps_before_early_stop=min_optimizer_steps_before_early_stop,
            early_stopping_warmup_steps=early_stopping_warmup_steps,
            **kwargs,
        )
        if ce_task_weighting == "manual":
            weights = ce_manual_task_weights or {}
            missing = [t for t in self.task_specs if t not in weights]
            if missing:
                raise ConfigError(f"model.ce_manual_task_weights: no weight for task {missing[0]!r}")
        self.task_weights: dict[str, float] = dict(ce_manual_task_weights or {})

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if self.hparams.enforce_validation_only_selection and datamodule.fit_split != "validation":
            raise ConfigError(
                f"data.fit_split is {datamodule.fit_split!r}: gradient learns on validation data only "
                "(set model.enforce_validation_only_selection false to allow it)"
            )
        if self.hparams.ce_task_weighting == "baseline_normalized":
            baselines = baseline_losses(self, self.hparams.ce_baseline_batches)
            self.task_weights = {t: 1.0 / max(b, self.hparams.ce_baseline_floor) for t, b in baselines.items()}
        elif self.hparams.ce_task_weighting == "equal":
            self.task_weights = dict.fromkeys(self.task_specs, 1.0)

    def task_objective(self, task: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.kind.loss(logits, batch) * self.task_weights[task]
