"""Regret smooth-max (``regret_smoothmax``): convex coefficients (softmax) that minimize a
smooth maximum of the tasks' relative regrets against their own adapters."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.learn.base import Batch, MergeLearner
from lmerge.learn.baselines import baseline_losses


class RegretSmoothMax(MergeLearner):
    """Objective ``tau * logsumexp(regret_t / tau)``, ``regret_t = (CE_t - base_t) / (base_t + eps)``."""

    objective_name = "regret"

    def __init__(
        self,
        catalog: str,
        adapters: list[str],
        tasks: list[str] | None = None,
        tau: float = 0.1,
        regret_eps: float = 1e-6,
        baseline_batches: int = 32,
        lr: float = 5e-2,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            adapters: The adapters to merge: catalog task names or adapter directories.
            tasks: The tasks trained on; default: the adapters that are catalog tasks.
            tau: Temperature of the smooth maximum (-> 0: the worst task alone; large: the mean).
            regret_eps: Added to each baseline CE in the regret's denominator.
            baseline_batches: Batches per task that estimate each task's own-adapter CE.
            lr: Adam learning rate of the softmax logits.
            **kwargs: Shared learner options (see ``MergeLearner``); the coefficients are global (task-wise)
                unless ``granularity`` says otherwise (``rank_wise``: softmax over adapters per layer, plus an
                offset per rank direction of each module).
        """
        kwargs.setdefault("granularity", "task_wise")
        kwargs["parametrization"] = "softmax"
        kwargs.setdefault("init", 1.0 / len(adapters))
        super().__init__(catalog, adapters, tasks, lr=lr, **kwargs)
        self.baselines: dict[str, float] = {}

    def on_fit_start(self) -> None:
        self.baselines = baseline_losses(self, self.hparams.baseline_batches)

    def task_objective(self, task: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        base = self.baselines[task]
        return (self.kind.loss(logits, batch) - base) / (base + self.hparams.regret_eps)

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        tau = self.hparams.tau
        return tau * torch.logsumexp(torch.stack(list(terms.values())) / tau, 0)
